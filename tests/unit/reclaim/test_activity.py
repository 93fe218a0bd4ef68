"""The compact activity encoding: codes exact at the thresholds, records that round-trip, and
the idle decision on stored samples equal to the decision on the raw ones -- same verdict, same
reason, same counts and span; values at the quantiles within each grid's error -- on built
windows, on generated ones, and on windows recorded from real guests."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.reclaim.test_idle import NOW, NS, STEP, Series, day, pct
from worker.reclaim import activity, sampling, window
from worker.reclaim.activity import NONE, Record, Sample, Times
from worker.reclaim.idle import Decision, IdlePolicy, decide
from worker.reclaim.quantise import (
    CPU_GRID,
    DISK_GRID,
    GRIDS,
    NET_GRID,
    NO_CPU,
    NOT_RUNNING,
    RESET,
    Grid,
    Thresholds,
    representatives,
)

DEFAULT = IdlePolicy()
APPROXIMATE = {  # numbers that are a bucket's middle when decided from stored rows
    "cpu_percent_at_quantile": "cpu", "cpu_percent_max": "cpu", "rx_bps_at_quantile": "rx",
    "tx_bps_at_quantile": "tx", "disk_bps_at_quantile": "disk"}


# -- codes ------------------------------------------------------------------------------------
@settings(max_examples=500, deadline=None)
@given(grid=st.sampled_from(list(GRIDS.values())),
       limit=st.floats(1e-3, 1e7, allow_nan=False),
       ratio=st.floats(0, 1e9, allow_nan=False))
def test_a_code_is_under_exactly_when_the_rate_is(grid: Grid, limit: float, ratio: float) -> None:
    rate = limit * ratio
    code = grid.code(rate, limit)
    assert 0 <= code <= grid.top
    assert (code < grid.limit_code) == (rate < limit)
    value = representatives(grid, limit)[code]
    assert (value < limit) == (rate < limit)  # what decide counts, from the stored code
    low, high = grid.span
    if low <= ratio <= high:
        assert value == pytest.approx(rate, rel=grid.relative_error * 1.0001)


@pytest.mark.parametrize("grid", list(GRIDS.values()))
def test_codes_grow_with_the_rate_and_the_threshold_is_a_boundary(grid: Grid) -> None:
    limit = 3.0
    assert grid.code(0.0, limit) == 0
    assert grid.code(math.nextafter(limit, 0), limit) == grid.limit_code - 1
    assert grid.code(limit, limit) == grid.limit_code
    codes = [grid.code(limit * 10 ** (e / 50), limit) for e in range(-500, 500)]
    assert codes == sorted(codes)
    assert grid.code(1e300, limit) == grid.top and grid.code(1e-300, limit) == 1
    assert grid.code(5.0, 0.0) == grid.limit_code  # nothing is under a zero threshold


def test_the_grids_cover_what_guests_do_within_a_few_per_cent() -> None:
    assert CPU_GRID.top < NOT_RUNNING < NO_CPU < RESET <= 255
    assert DISK_GRID.top < activity.EXPLICIT_BIT
    for grid, (low, high), error in ((CPU_GRID, (1e-5, 90), 0.034), (NET_GRID, (1e-6, 8e5), 0.057),
                                     (DISK_GRID, (1e-4, 8e3), 0.077)):
        assert grid.span[0] <= low and grid.span[1] >= high
        assert grid.relative_error < error


def test_thresholds_travel_as_float32() -> None:
    th = Thresholds(3.0, 2000.0, 1000.0, 20000.0)
    assert Thresholds.unpack(th.pack()) == th and len(th.pack()) == Thresholds.SIZE == 16
    assert th.same_as(Thresholds.of(IdlePolicy()))
    assert not th.same_as(replace(th, cpu_percent=5.0))


# -- records ----------------------------------------------------------------------------------
SAMPLES = st.builds(
    Sample, t=st.integers(1_700_000_000_000, 1_900_000_000_000).map(lambda ms: ms / 1000),
    state=st.sampled_from(["running", "running", "paused"]),
    cpu_ns=st.none() | st.integers(0, 2**62), vcpus=st.integers(1, 64),
    rx=st.integers(0, 2**62), tx=st.integers(0, 2**62), rd=st.integers(0, 2**61),
    wr=st.integers(0, 2**61))


@settings(max_examples=200, deadline=None)
@given(samples=st.lists(SAMPLES, min_size=1, max_size=30), seqs=st.lists(
    st.integers(0, 5), min_size=30, max_size=30), host=st.text(max_size=40))
def test_a_record_round_trips(samples: list[Sample], seqs: list[int], host: str) -> None:
    samples.sort(key=lambda s: s.t)
    rec = activity.new_record(host, samples[0].t, Thresholds())
    seq = 10
    for s, step in zip(samples, seqs, strict=False):
        seq += step
        rec = activity.append(rec, s, seq if step < 5 else NONE)
    back = Record.unpack(rec.pack())
    assert back.pack() == rec.pack()
    assert (back.host, back.first_seen, len(back), back.explicit) == (
        rec.host, rec.first_seen, len(rec), rec.explicit)
    assert back.last is not None and rec.last is not None
    assert (back.last.t, back.last.cpu_ns, back.last.rx, back.last.rd + back.last.wr) == (
        rec.last.t, rec.last.cpu_ns, rec.last.rx, rec.last.rd + rec.last.wr)
    assert back.seqs() == rec.seqs()


def test_a_day_of_rows_is_one_jemalloc_class_under_1280_bytes() -> None:
    """288 rows (289 with the window's edge) + header + a 39-character host name fit in the
    1,280-byte allocation Redis makes for a value of up to 1,274 bytes."""
    rec = activity.new_record("h" * 39, NOW, Thresholds())
    for i in range(289):
        rec = activity.append(rec, Sample(NOW + 300 * i, "running", i, 1, i, i, i, i), 7 + i)
    assert not rec.explicit
    assert len(rec.pack()) <= 1274


def test_rows_refer_to_their_host_tick_and_explicit_times_are_the_exception() -> None:
    ticks = Times()
    rec = activity.new_record("h", NOW, Thresholds())
    for i in range(5):
        seq = ticks.add(activity.millis(NOW + 60 * i))
        if i != 2:  # the guest missed tick 2
            rec = activity.append(rec, Sample(NOW + 60 * i, "running", i, 1, 0, 0, 0, 0), seq)
    assert [t for t, _ in rec.explicit] == [activity.millis(NOW + 180)]  # the row after it
    assert rec.stamps(ticks) == [activity.millis(NOW + 60 * i) for i in (0, 1, 3, 4)]
    view = window.view(rec, ticks)
    assert list(view.times) == [NOW + 60 * i for i in (0, 1, 3, 4)]
    trimmed = activity.drop_before(rec, ticks, activity.millis(NOW + 100))
    assert window.view(trimmed, ticks.trimmed(activity.millis(NOW + 100))).times == [
        NOW + 180, NOW + 240]


def test_rows_whose_tick_is_gone_are_left_out() -> None:
    ticks, rec = Times(), activity.new_record("h", NOW, Thresholds())
    for i in range(4):
        rec = activity.append(rec, Sample(NOW + i, "running", i, 1, 0, 0, 0, 0),
                              ticks.add(activity.millis(NOW + i)))
    assert list(window.view(rec, ticks.trimmed(activity.millis(NOW + 2))).times) == [
        NOW + 2, NOW + 3]


def test_new_thresholds_recode_the_stored_rows() -> None:
    rec = activity.from_samples("h", day(cpu_ns_per_s=pct(2)), Thresholds())
    assert decide("i", window.view(rec, Times()), DEFAULT, now=NOW).idle  # 2 % < 3 %
    stricter = replace(DEFAULT, cpu_percent=1.0)
    moved = activity.requantised(rec, Thresholds.of(stricter))
    d = decide("i", window.view(moved, Times()), stricter, now=NOW)
    assert not d.idle and d.numbers["cpu_percent_at_quantile"] == pytest.approx(2, rel=0.04)


# -- the decision, raw and stored ---------------------------------------------------------------
def through_storage(samples: list[Sample], policy: IdlePolicy, now: float,
                    **store: Any) -> Decision:
    """Store ``samples`` one at a time as the sampler does (fakeredis), load, decide."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    for s in sorted(samples, key=lambda s: s.t):
        if s.t <= now:  # the sampler cannot have stored the future
            sampling.store(client, "h", [("u", "u", s)], window=policy.window, now=s.t,
                           thresholds=Thresholds.of(policy), **store)
    stored = sampling.load(client, ["u"], since=now - policy.window, host="h")["u"]
    return decide("u", stored, policy, now=now)


def assert_same(raw: Decision, stored: Decision, policy: IdlePolicy) -> None:
    assert (stored.idle, stored.reason) == (raw.idle, raw.reason)
    th = Thresholds.of(policy)
    limits = {"cpu": th.cpu_percent, "rx": th.rx_bps, "tx": th.tx_bps, "disk": th.disk_bps}
    for key, value in raw.numbers.items():
        if key not in APPROXIMATE:
            assert stored.numbers[key] == value, key
            continue
        grid, limit = GRIDS[APPROXIMATE[key]], limits[APPROXIMATE[key]]
        low, high = (limit * edge for edge in grid.span)
        got = stored.numbers[key]
        if value > high:  # beyond the grid: its top bucket
            assert got >= high / (1 + grid.relative_error), key
            continue
        # below the grid everything is its lowest bucket
        assert abs(got - value) <= grid.relative_error * value + low + 1e-3, key


SCENARIOS = {
    "quiet day": day(cpu_ns_per_s=pct(0.5), rx=100, tx=50, rd=10, wr=10),
    "busy cpu": day(cpu_ns_per_s=pct(50)),
    "busy rx": day(rx=5000),
    "at the limit": day(cpu_ns_per_s=pct(3), rx=2000),
    "just under": day(cpu_ns_per_s=pct(3) - 1, rx=1999, tx=999, rd=10000, wr=9999),
    "4 vcpus": Series(t=NOW - 288 * 300, vcpus=4).run(288, cpu_ns_per_s=pct(8)).samples,
    "reset": Series(t=NOW - 288 * 300).run(100, cpu_ns_per_s=pct(1)).restart()
    .run(188, cpu_ns_per_s=pct(1)).samples,
    "gap": Series(t=NOW - 140 * 300 - 12 * 3600).run(70).run(1, step=12 * 3600).run(70).samples,
    "paused hours": Series(t=NOW - 86400).run(40, cpu_ns_per_s=pct(50))
    .run(200, state="paused").run(48).samples,
    "suspended all day": day(state="suspended"),
    "too few": day(5),
    "too short": day(100),
    "no cpu time": [s._replace(cpu_ns=None) for s in day()],
    "older than the window": Series(t=NOW - 2 * 86400).run(288, cpu_ns_per_s=pct(80))
    .run(288).samples,
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_stored_rows_decide_as_the_raw_samples(name: str) -> None:
    samples = SCENARIOS[name]
    assert_same(decide("u", samples, DEFAULT, now=NOW), through_storage(samples, DEFAULT, NOW),
                DEFAULT)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=0, max_size=40),
       quantile=st.sampled_from([0.5, 0.9, 0.95, 0.97, 1.0]), min_samples=st.integers(1, 10),
       jitter=st.lists(st.integers(-40, 40), min_size=40, max_size=40))
def test_stored_rows_decide_as_the_raw_samples_whatever_happens(
        steps: list[dict[str, Any]], quantile: float, min_samples: int, jitter: list[int]
) -> None:
    """The idle policy's own property test (resets, gaps, pauses, missing CPU time, rates at
    and around every limit), through the storage: sample times with millisecond jitter."""
    policy = IdlePolicy(window=1800, max_gap=180, min_samples=min_samples,
                        min_span_fraction=0.25, cpu_quantile=quantile, net_quantile=quantile,
                        disk_quantile=quantile)
    t, cpu, rx, tx, rd, wr = NOW - 2000, 5 * NS, 10**6, 10**6, 10**6, 10**6
    samples: list[Sample] = []
    for s, ms in zip(steps, jitter, strict=False):
        t += s["dt"]
        if s["reset"]:
            cpu, rx, tx, rd, wr = 0, 0, 0, 0, 0
        cpu += int(s["cpu"] * s["vcpus"] * s["dt"])
        rx += s["rx"] * s["dt"]
        tx += s["tx"] * s["dt"]
        rd += s["disk"] * s["dt"]
        samples.append(Sample(t + ms / 1000, s["state"], None if s["no_cpu"] else cpu,
                              s["vcpus"], rx, tx, rd, wr))
    samples.sort(key=lambda s: s.t)
    samples = [s._replace(t=round(s.t, 3)) for s in samples]  # the old form kept milliseconds
    assert_same(decide("u", samples, policy, now=NOW), through_storage(samples, policy, NOW),
                policy)


def test_the_recheck_extends_the_stored_window_with_a_fresh_reading() -> None:
    samples = day(cpu_ns_per_s=pct(1))
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    sampling.store(client, "h", [("u", "u", s) for s in samples], window=86400, now=NOW)
    stored = sampling.load(client, ["u"], since=0, host="h")["u"]
    last = samples[-1]
    fresh = last._replace(t=NOW + 301.25, cpu_ns=last.cpu_ns + int(301.25 * pct(1)))
    raw = decide("u", [*samples, fresh], DEFAULT, now=fresh.t)
    assert_same(raw, decide("u", stored.extended(fresh), DEFAULT, now=fresh.t), DEFAULT)


RECORDED = Path(__file__).parent / "data" / "recorded_windows.json"


def recorded_windows() -> dict[str, list[Sample]]:
    """Real samples of tiny KVM guests (tests/support/record_windows.py): idle, busy, paused,
    managed-saved and restored (counters restart), a 6 s sampling gap; once a second."""
    data = json.loads(RECORDED.read_text())
    return {kind: [Sample(*s) for s in samples] for kind, samples in data["guests"].items()}


@pytest.mark.parametrize("kind", ["idle", "busy", "idle-paused-saved", "busy-paused"])
@pytest.mark.parametrize("window", [120.0, 60.0, 30.0])
def test_recorded_windows_decide_the_same_stored_as_raw(kind: str, window: float) -> None:
    """What the old store returned (the raw counters, times to the millisecond) and what the
    new one returns decide the same, at every moment of the recording."""
    samples = [s._replace(t=round(s.t, 3)) for s in recorded_windows()[kind]]
    policy = IdlePolicy(window=window, max_gap=3.0, min_samples=10, min_span_fraction=0.5)
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    decided: Counter[bool] = Counter()
    for i, s in enumerate(samples):
        sampling.store(client, "kvm", [("u", "u", s)], window=window, now=s.t,
                       thresholds=Thresholds.of(policy))
        if i % 5 == 4:
            stored = sampling.load(client, ["u"], since=s.t - window, host="kvm")["u"]
            raw = decide("u", samples[:i + 1], policy, now=s.t)
            assert_same(raw, decide("u", stored, policy, now=s.t), policy)
            decided[raw.idle] += 1
    # The recording shows what it is meant to: the idle guest idle, the busy one never.
    if kind == "idle":
        assert decided[True] > 0
    if kind.startswith("busy"):
        assert decided[True] == 0
