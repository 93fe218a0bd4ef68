"""The idle policy's edges: thresholds, quantiles, vCPU normalisation, resets, gaps, pauses,
too little evidence, and a reference implementation checked against ``decide`` by hypothesis."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.core import settings as dormant_settings
from worker.reclaim import idle
from worker.reclaim.idle import IdlePolicy, decide
from worker.reclaim.sampling import Sample

NOW = 1_800_000_000.0
DEFAULT = IdlePolicy()
NS = 1_000_000_000


@dataclass
class Series:
    """Builds cumulative samples from per-interval rates, like a guest's counters would grow."""

    t: float
    vcpus: int = 1
    cpu: int = 10 * NS
    rx: int = 10_000
    tx: int = 10_000
    rd: int = 10_000
    wr: int = 10_000
    state: str = "running"
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sample()

    def sample(self) -> None:
        self.samples.append(Sample(self.t, self.state, self.cpu, self.vcpus, self.rx, self.tx,
                                   self.rd, self.wr))

    def run(self, count: int, *, step: float = 300, cpu_ns_per_s: float = 0.0, rx: float = 0,
            tx: float = 0, rd: float = 0, wr: float = 0, state: str = "running") -> Series:
        """``count`` intervals of ``step`` seconds at these rates (bytes/s, CPU ns per s)."""
        for _ in range(count):
            self.t += step
            self.cpu += int(cpu_ns_per_s * step)
            self.rx += int(rx * step)
            self.tx += int(tx * step)
            self.rd += int(rd * step)
            self.wr += int(wr * step)
            self.state = state
            self.sample()
        return self

    def restart(self) -> Series:
        """A restore or restart: the next sample starts every counter from (nearly) zero."""
        self.cpu, self.rx, self.tx, self.rd, self.wr = NS // 10, 100, 100, 100, 100
        return self


def pct(percent_of_one_cpu: float) -> float:
    """CPU ns per second for a guest using ``percent_of_one_cpu`` % of one host CPU in total."""
    return percent_of_one_cpu / 100 * NS


def day(count: int = 288, /, **rates: Any) -> list[Sample]:
    """``count`` 5-minute samples ending at NOW (a day by default)."""
    return Series(t=NOW - (count - 1) * 300).run(count - 1, **rates).samples


# -- the plain cases --------------------------------------------------------------------------
def test_a_quiet_guest_is_idle_with_its_numbers() -> None:
    d = decide("i", day(cpu_ns_per_s=pct(0.5), rx=100, tx=50, rd=10, wr=10), DEFAULT, now=NOW)
    assert d.idle, d.reason
    assert d.reason.startswith("idle:")
    n = d.numbers
    assert (n["samples"], n["intervals"], n["span_s"]) == (288, 287, 287 * 300.0)
    assert n["cpu_percent_at_quantile"] == pytest.approx(0.5)
    assert n["rx_bps_at_quantile"] == pytest.approx(100)
    assert n["tx_bps_at_quantile"] == pytest.approx(50)
    assert n["disk_bps_at_quantile"] == pytest.approx(20)
    assert n["cpu_fraction_under"] == n["rx_fraction_under"] == 1.0
    json.dumps(d.as_dict())  # JSON-able as promised


@pytest.mark.parametrize(("rates", "word"), [
    ({"cpu_ns_per_s": pct(50)}, "CPU"),
    ({"rx": 5000}, "rx"),
    ({"tx": 5000}, "tx"),
    ({"rd": 15000, "wr": 15000}, "disk"),
])
def test_each_busy_metric_alone_keeps_a_guest(rates: dict[str, float], word: str) -> None:
    d = decide("i", day(**rates), DEFAULT, now=NOW)
    assert not d.idle
    assert d.reason.startswith("not idle: " + word), d.reason
    assert d.reason.count("<") == 1  # only the failing metric is named


# -- exactly at the limit is not under -----------------------------------------------------------
@pytest.mark.parametrize(("limit", "under"), [
    ({"cpu_ns_per_s": pct(3)}, {"cpu_ns_per_s": pct(3) - 1}),
    ({"rx": 2000}, {"rx": 1999}),
    ({"tx": 1000}, {"tx": 999}),
    ({"rd": 10000, "wr": 10000}, {"rd": 10000, "wr": 9999}),
])
def test_a_rate_exactly_at_the_limit_is_not_under_it(limit: dict[str, float],
                                                     under: dict[str, float]) -> None:
    at = decide("i", day(**limit), DEFAULT, now=NOW)
    assert not at.idle, at.reason
    fraction = [v for k, v in at.numbers.items() if k.endswith("fraction_under") and v < 1]
    assert fraction == [0.0]
    assert decide("i", day(**under), DEFAULT, now=NOW).idle


def test_the_quantile_itself_is_enough() -> None:
    """97 of 100 intervals under 3 % is idle, 96 are not."""
    policy = replace(DEFAULT, window=100 * 600, max_gap=600)

    def with_busy(busy: int) -> idle.Decision:
        s = Series(t=NOW - 100 * 600).run(busy, step=600, cpu_ns_per_s=pct(50))
        return decide("i", s.run(100 - busy, step=600).samples, policy, now=NOW)

    assert with_busy(3).idle
    assert with_busy(3).numbers["cpu_fraction_under"] == 0.97
    assert with_busy(3).numbers["cpu_percent_at_quantile"] == 0.0
    four = with_busy(4)
    assert not four.idle
    assert "in 96.0% of intervals (needs 97.0%)" in four.reason
    assert four.numbers["cpu_percent_at_quantile"] == pytest.approx(50)


def test_the_quantile_survives_float_rounding() -> None:
    """0.55 * 100 is 55.00000000000001 in floats; 55 of 100 intervals still make 55 %."""
    policy = replace(DEFAULT, window=100 * 600, max_gap=600, cpu_quantile=0.55)
    s = Series(t=NOW - 100 * 600).run(45, step=600, cpu_ns_per_s=pct(50)).run(55, step=600)
    d = decide("i", s.samples, policy, now=NOW)
    assert d.idle, d.reason
    assert d.numbers["cpu_percent_at_quantile"] == 0.0  # the 55th smallest of 100


# -- vCPU normalisation -----------------------------------------------------------------------
def test_cpu_is_per_allocated_vcpu() -> None:
    """8 % of one host CPU in total is 2 % per vCPU for 4 vCPUs (idle), 8 % for one (busy);
    4 vCPUs each busy 8 % of the time use 32 % of one CPU, which is 8 % per vCPU (busy)."""
    four_small = Series(t=NOW - 288 * 300, vcpus=4).run(288, cpu_ns_per_s=pct(8)).samples
    d = decide("i", four_small, DEFAULT, now=NOW)
    assert d.idle
    assert d.numbers["cpu_percent_at_quantile"] == pytest.approx(2.0)
    one = decide("i", day(cpu_ns_per_s=pct(8)), DEFAULT, now=NOW)
    assert not one.idle
    assert one.numbers["cpu_percent_at_quantile"] == pytest.approx(8.0)
    four_busy = Series(t=NOW - 288 * 300, vcpus=4).run(288, cpu_ns_per_s=pct(32)).samples
    d = decide("i", four_busy, DEFAULT, now=NOW)
    assert not d.idle
    assert d.numbers["cpu_percent_at_quantile"] == pytest.approx(8.0)


def test_a_vcpu_hot_plug_counts_the_fewer_vcpus() -> None:
    """An interval across a change of vCPU count is judged per the fewer (never flattered)."""
    samples = Series(t=NOW - 287 * 300, vcpus=4).run(287, cpu_ns_per_s=pct(8)).samples
    samples[-1] = samples[-1]._replace(vcpus=1)
    d = decide("i", samples, DEFAULT, now=NOW)
    assert d.numbers["cpu_fraction_under"] == round(286 / 287, 4)
    assert d.numbers["cpu_percent_max"] == pytest.approx(8.0)
    assert d.numbers["cpu_percent_at_quantile"] == pytest.approx(2.0)


# -- resets, gaps, pauses, missing data --------------------------------------------------------
def test_a_counter_reset_is_skipped_not_negative_usage() -> None:
    s = Series(t=NOW - 288 * 300).run(100, cpu_ns_per_s=pct(1)).restart()
    d = decide("i", s.run(188, cpu_ns_per_s=pct(1)).samples, DEFAULT, now=NOW)
    assert d.idle, d.reason
    assert (d.numbers["skipped_reset"], d.numbers["intervals"]) == (1, 287)
    assert d.numbers["cpu_percent_at_quantile"] == pytest.approx(1.0)  # nothing negative


@pytest.mark.parametrize("counter", ["cpu", "rx", "tx", "rd", "wr"])
def test_any_counter_going_backwards_is_a_reset(counter: str) -> None:
    s = Series(t=NOW - 30 * 300).run(15, cpu_ns_per_s=pct(1), rx=10, tx=10, rd=10, wr=10)
    setattr(s, counter, 0)
    s.run(15)
    d = decide("i", s.samples, replace(DEFAULT, window=30 * 300), now=NOW)
    assert d.numbers["skipped_reset"] == 1
    assert d.numbers["intervals"] == 29


def test_busy_work_after_a_restore_still_counts() -> None:
    s = Series(t=NOW - 288 * 300).run(100).restart()
    d = decide("i", s.run(188, cpu_ns_per_s=pct(60)).samples, DEFAULT, now=NOW)
    assert not d.idle
    assert d.numbers["skipped_reset"] == 1


def test_a_sampling_gap_is_not_evidence() -> None:
    # 70 quiet 5-minute intervals, a 12-hour hole (beat was down), 70 more: 11.7 h of evidence.
    s = Series(t=NOW - 140 * 300 - 12 * 3600).run(70).run(1, step=12 * 3600).run(70)
    d = decide("i", s.samples, DEFAULT, now=NOW)
    assert d.numbers["skipped_gap"] == 1
    assert d.numbers["span_s"] == 140 * 300
    assert not d.idle
    assert "shorter than 43200 s" in d.reason and "1 sampling gaps" in d.reason


def test_a_short_gap_within_max_gap_is_evidence() -> None:
    s = Series(t=NOW - 86400).run(100).run(1, step=900).run(180)
    d = decide("i", s.samples, DEFAULT, now=NOW)
    assert d.idle, d.reason
    assert d.numbers["skipped_gap"] == 0


def test_busy_hidden_in_a_gap_is_neither_busy_nor_idle() -> None:
    s = Series(t=NOW - 86400).run(200).run(1, step=3600, cpu_ns_per_s=pct(90)).run(20)
    d = decide("i", s.samples, DEFAULT, now=NOW)
    assert d.idle, d.reason
    assert d.numbers["cpu_percent_max"] < 3


def test_paused_periods_are_neither_activity_nor_idleness() -> None:
    # Busy while running, paused most of the day: the pause does not make it look idle.
    s = Series(t=NOW - 86400).run(40, cpu_ns_per_s=pct(50)).run(200, state="paused").run(48)
    d = decide("i", s.samples, DEFAULT, now=NOW)
    assert not d.idle
    assert d.numbers["skipped_not_running"] == 201  # both ends must be running
    assert d.numbers["intervals"] == 87
    # Quiet while running and paused for a stretch: still idle if the running part suffices.
    s = Series(t=NOW - 86400).run(200).run(30, state="paused").run(58)
    d = decide("i", s.samples, DEFAULT, now=NOW)
    assert d.idle, d.reason
    assert d.numbers["skipped_not_running"] == 31


def test_a_guest_paused_all_day_is_not_idle() -> None:
    d = decide("i", day(state="paused"), DEFAULT, now=NOW)
    assert not d.idle
    assert "too few usable intervals (0 < 12" in d.reason
    assert "287 not running" in d.reason


@pytest.mark.parametrize("state", ["suspended", "shutoff", "busy", "crashed"])
def test_other_states_are_not_running(state: str) -> None:
    d = decide("i", day(state=state), DEFAULT, now=NOW)
    assert not d.idle
    assert d.numbers["skipped_not_running"] == 287


def test_too_few_samples_is_not_idle() -> None:
    d = decide("i", day(5), replace(DEFAULT, min_span_fraction=0), now=NOW)
    assert not d.idle
    assert d.reason.startswith("not idle: too few usable intervals (4 < 12 needed")
    assert decide("i", day(13), replace(DEFAULT, min_span_fraction=0), now=NOW).idle
    for samples in ([], day(1)):
        d = decide("i", samples, DEFAULT, now=NOW)
        assert not d.idle and d.numbers["intervals"] == 0


def test_too_short_a_span_is_not_idle() -> None:
    d = decide("i", day(100), DEFAULT, now=NOW)  # 99 * 300 s < 12 h
    assert not d.idle
    assert "observed running span 29700 s is shorter than 43200 s" in d.reason
    assert d.numbers["span_needed_s"] == 43200
    assert decide("i", day(146), DEFAULT, now=NOW).idle  # 145 * 300 s > 12 h


def test_missing_cpu_time_is_not_idle() -> None:
    samples = [s._replace(cpu_ns=None) for s in day()]
    d = decide("i", samples, DEFAULT, now=NOW)
    assert not d.idle
    assert "no CPU time" in d.reason
    assert d.numbers["skipped_no_cpu"] == 287
    # One sample without it only costs its two intervals.
    samples = day()
    samples[100] = samples[100]._replace(cpu_ns=None)
    d = decide("i", samples, DEFAULT, now=NOW)
    assert d.idle and d.numbers["skipped_no_cpu"] == 2


def test_samples_outside_the_window_are_ignored() -> None:
    busy_yesterday = Series(t=NOW - 2 * 86400).run(288, cpu_ns_per_s=pct(80)).run(288).samples
    d = decide("i", busy_yesterday, DEFAULT, now=NOW)
    assert d.idle, d.reason
    assert d.numbers["samples"] == 289  # the window is closed at its start: NOW - 86400 counts
    # Samples from after ``now`` (another host's clock ahead) are not used either.
    future = Series(t=NOW - 86400).run(288).run(10, cpu_ns_per_s=pct(80)).samples
    assert decide("i", future, DEFAULT, now=NOW).idle


def test_order_and_duplicates_do_not_matter() -> None:
    samples = day(cpu_ns_per_s=pct(1))
    expected = decide("i", samples, DEFAULT, now=NOW)
    shuffled = samples[1::2] + samples[::2]
    assert decide("i", shuffled, DEFAULT, now=NOW) == expected
    doubled = decide("i", sorted(samples + samples[:10]), DEFAULT, now=NOW)
    assert doubled.numbers["skipped_same_time"] == 10
    assert doubled.idle


# -- configuration ------------------------------------------------------------------------------
def test_policy_from_settings() -> None:
    policy = IdlePolicy.from_settings(dormant_settings.load({}))
    assert policy == IdlePolicy()  # the defaults agree: 3 sample intervals of 300 s = 900 s gap
    policy = IdlePolicy.from_settings(dormant_settings.load({
        "DORMANT_SAMPLE_INTERVAL": "60", "DORMANT_IDLE_WINDOW": "3600",
        "DORMANT_IDLE_MIN_SAMPLES": "5", "DORMANT_IDLE_CPU_PERCENT": "5",
        "DORMANT_IDLE_MIN_SPAN_FRACTION": "0.8",
    }))
    assert (policy.max_gap, policy.window, policy.min_samples, policy.cpu_percent,
            policy.min_span_fraction) == (180, 3600, 5, 5, 0.8)
    explicit = dormant_settings.load({"DORMANT_IDLE_MAX_GAP": "1200"})
    assert IdlePolicy.from_settings(explicit).max_gap == 1200


@pytest.mark.parametrize("bad", [
    {"cpu_quantile": 0}, {"net_quantile": 1.5}, {"window": 0}, {"max_gap": -1},
    {"min_samples": 0}, {"cpu_percent": -1}, {"min_span_fraction": 2},
])
def test_nonsense_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        IdlePolicy(**bad)  # type: ignore[arg-type]


# -- a reference implementation, exactly as specified, in exact arithmetic ----------------------
def reference(samples: list[Sample], p: IdlePolicy, now: float) -> tuple[bool, dict[str, int]]:
    rows = sorted((s for s in samples if now - p.window <= s.t <= now), key=lambda s: s.t)
    skips = dict.fromkeys(("not_running", "same_time", "gap", "no_cpu", "reset"), 0)
    cpu, rx, tx, disk, span = [], [], [], [], Fraction(0)
    for a, b in itertools.pairwise(rows):
        dt = Fraction(b.t) - Fraction(a.t)
        if a.state != "running" or b.state != "running":
            skips["not_running"] += 1
        elif dt <= 0:
            skips["same_time"] += 1
        elif dt > Fraction(p.max_gap):
            skips["gap"] += 1
        elif a.cpu_ns is None or b.cpu_ns is None:
            skips["no_cpu"] += 1
        elif (b.cpu_ns < a.cpu_ns or b.rx < a.rx or b.tx < a.tx
              or b.rd + b.wr < a.rd + a.wr):
            skips["reset"] += 1
        else:
            span += dt
            v = min(a.vcpus, b.vcpus)
            cpu.append(Fraction(b.cpu_ns - a.cpu_ns) / (dt * NS * v) * 100)
            rx.append((b.rx - a.rx) / dt)
            tx.append((b.tx - a.tx) / dt)
            disk.append((b.rd + b.wr - a.rd - a.wr) / dt)
    n = len(cpu)

    def share(values: list[Fraction], limit: float, q: float) -> bool:
        return sum(1 for v in values if v < Fraction(limit)) >= Fraction(repr(q)) * n

    idle_ = (n >= p.min_samples and span >= Fraction(repr(p.min_span_fraction)) * Fraction(p.window)
             and share(cpu, p.cpu_percent, p.cpu_quantile)
             and share(rx, p.net_rx_bps, p.net_quantile)
             and share(tx, p.net_tx_bps, p.net_quantile)
             and share(disk, p.disk_bps, p.disk_quantile))
    return idle_, {**skips, "intervals": n}


STEPS = st.sampled_from([0, 60, 60, 60, 60, 120, 179, 180, 181, 600])
RATES = {  # per-second increments around each limit of the policy below
    "cpu": st.sampled_from([0, pct(1), pct(3) - 1, pct(3), pct(3) + 1, pct(50)]),
    "rx": st.sampled_from([0, 100, 1999, 2000, 2001, 10**6]),
    "tx": st.sampled_from([0, 100, 999, 1000, 1001]),
    "disk": st.sampled_from([0, 100, 19999, 20000, 20001]),
}
STEP = st.fixed_dictionaries({
    "dt": STEPS,
    "state": st.sampled_from(["running"] * 8 + ["paused", "shutoff"]),
    "vcpus": st.sampled_from([1, 1, 1, 2, 4]),
    "reset": st.sampled_from([False] * 12 + [True]),
    "no_cpu": st.sampled_from([False] * 20 + [True]),
    **RATES,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=0, max_size=40),
       quantile=st.sampled_from([0.5, 0.9, 0.95, 0.97, 1.0]),
       min_samples=st.integers(1, 10), shuffle=st.booleans())
def test_decide_agrees_with_the_reference(steps: list[dict], quantile: float, min_samples: int,
                                          shuffle: bool) -> None:
    policy = IdlePolicy(window=1800, max_gap=180, min_samples=min_samples,
                        min_span_fraction=0.25, cpu_quantile=quantile, net_quantile=quantile,
                        disk_quantile=quantile)
    t, cpu, rx, tx, rd, wr = NOW - 2000, 5 * NS, 10**6, 10**6, 10**6, 10**6
    samples: list[Sample] = []
    for s in steps:
        t += s["dt"]
        if s["reset"]:
            cpu, rx, tx, rd, wr = 0, 0, 0, 0, 0
        cpu += int(s["cpu"] * s["vcpus"] * s["dt"])
        rx += s["rx"] * s["dt"]
        tx += s["tx"] * s["dt"]
        rd += s["disk"] * s["dt"]
        samples.append(Sample(t, s["state"], None if s["no_cpu"] else cpu, s["vcpus"],
                              rx, tx, rd, wr))
    if shuffle:
        samples.reverse()
    d = decide("i", samples, policy, now=NOW)
    expected_idle, counts = reference(samples, policy, NOW)
    got = {k.removeprefix("skipped_"): v for k, v in d.numbers.items()
           if k.startswith("skipped_") or k == "intervals"}
    assert got == counts
    assert d.idle == expected_idle, d.reason
    assert d.reason.startswith("idle:" if d.idle else "not idle:")
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in d.numbers.values())


def test_decide_is_fast_enough_for_a_fleet() -> None:
    """Sanity bound only (the benchmark measures): a day of samples decides in well under 1 ms."""
    import time

    samples = day(cpu_ns_per_s=pct(1), rx=10)
    start = time.perf_counter()
    for _ in range(200):
        decide("i", samples, DEFAULT, now=NOW)
    assert (time.perf_counter() - start) / 200 < 0.002


CLEAN_STEP = st.fixed_dictionaries({"dt": st.sampled_from([60, 61, 120, 179, 180]), **RATES})


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(CLEAN_STEP, min_size=2, max_size=40),
       vcpus=st.sampled_from([1, 2, 3, 4, 16]),
       quantile=st.sampled_from([0.5, 0.9, 0.95, 0.97, 1.0]))
def test_the_fast_path_agrees_with_the_reference(steps: list[dict], vcpus: int,
                                                 quantile: float) -> None:
    """Always running, steady sampling, no resets: the columnar fast path decides."""
    policy = IdlePolicy(window=7200, max_gap=180, min_samples=2, min_span_fraction=0.0,
                        cpu_quantile=quantile, net_quantile=quantile, disk_quantile=quantile)
    series = Series(t=NOW - sum(s["dt"] for s in steps), vcpus=vcpus)
    for s in steps:
        series.run(1, step=s["dt"], cpu_ns_per_s=s["cpu"] * vcpus, rx=s["rx"], tx=s["tx"],
                   rd=s["disk"])
    d = decide("i", series.samples, policy, now=NOW)
    expected_idle, counts = reference(series.samples, policy, NOW)
    assert counts["intervals"] == len(steps) == d.numbers["intervals"]
    assert d.idle == expected_idle, d.reason
    worst = max(s["cpu"] for s in steps) / NS * 100
    assert d.numbers["cpu_percent_max"] == pytest.approx(worst, abs=1e-4)
