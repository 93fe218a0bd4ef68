"""Sampling on fakeredis and libvirt's test driver: encoding, store/load, trimming, expiry,
first sightings, the per-host index, and one round trip per call."""

from __future__ import annotations

import fakeredis
import pytest
import redis

from worker.hypervisor import Hypervisor
from worker.reclaim import sampling
from worker.reclaim.idle import IdlePolicy, decide
from worker.reclaim.sampling import Sample
from worker.store import keys

T0 = 1_800_000_000.0
WINDOW = 3600.0


def sample(t: float, cpu: int | None = 1_000, state: str = "running") -> Sample:
    return Sample(t=t, state=state, cpu_ns=cpu, vcpus=2, rx=10, tx=20, rd=30, wr=40)


class CountingPipelines:
    """Counts pipeline executions (round trips) on a client."""

    def __init__(self, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.executed = 0
        original = client.pipeline

        def pipeline(*args: object, **kwargs: object) -> object:
            pipe = original(*args, **kwargs)  # type: ignore[arg-type]
            execute = pipe.execute

            def counted(*a: object, **k: object) -> object:
                self.executed += 1
                return execute(*a, **k)  # type: ignore[arg-type]

            pipe.execute = counted  # type: ignore[method-assign,assignment]
            return pipe

        monkeypatch.setattr(client, "pipeline", pipeline)


@pytest.mark.parametrize("state", ["running", "paused", "suspended", "shutoff", "pmsuspended",
                                   "crashed", "busy", "missing", "unknown", "something-new"])
def test_encode_decode_round_trip(state: str) -> None:
    s = Sample(t=T0 + 0.1234, state=state, cpu_ns=123_456_789_012, vcpus=4, rx=1, tx=2,
               rd=3, wr=2**40)
    back = sampling.decode(sampling.encode(s))
    assert back == s._replace(t=round(s.t, 3))
    assert sampling.decode(sampling.encode(s).encode()) == back  # bytes from a raw client
    assert len(sampling.encode(s)) < 70  # compact: a day of 5-minute samples is ~20 KB


def test_missing_cpu_survives_the_round_trip() -> None:
    assert sampling.decode(sampling.encode(sample(T0, cpu=None))).cpu_ns is None


def test_store_then_load_sorted_by_time(fake_redis: fakeredis.FakeRedis,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingPipelines(fake_redis, monkeypatch)
    items = [("u1", "one", sample(T0 + 60)), ("u2", "two", sample(T0 + 60, cpu=5))]
    assert sampling.store(fake_redis, "h1", items, window=WINDOW, now=T0 + 60) == 2
    sampling.store(fake_redis, "h1", [("u1", "one", sample(T0))], window=WINDOW, now=T0 + 60)
    sampling.store(fake_redis, "h1", [("u1", "one", sample(T0 + 120, cpu=3_000))],
                   window=WINDOW, now=T0 + 120)
    assert counter.executed == 3  # one round trip per store
    loaded = sampling.load(fake_redis, ["u1", "u2", "nobody"], since=T0 - WINDOW)
    assert counter.executed == 4  # and one per load
    assert [s.t for s in loaded["u1"]] == [T0, T0 + 60, T0 + 120]
    assert loaded["u1"][-1].cpu_ns == 3_000
    assert loaded["u2"] == [sample(T0 + 60, cpu=5)]
    assert loaded["nobody"] == []
    assert [s.t for s in sampling.load(fake_redis, ["u1"], since=T0 + 60)["u1"]] == [
        T0 + 60, T0 + 120]
    assert sampling.load(fake_redis, [], since=0) == {}


def test_store_trims_to_the_window_and_keeps_its_start(fake_redis: fakeredis.FakeRedis) -> None:
    for t in (T0, T0 + 100, T0 + 200):
        sampling.store(fake_redis, "h", [("u", "n", sample(t))], window=1000, now=t)
    # At now = T0 + 1100 the window starts at T0 + 100: T0 goes, T0 + 100 stays.
    sampling.store(fake_redis, "h", [("u", "n", sample(T0 + 1100))], window=1000, now=T0 + 1100)
    assert fake_redis.zcard(keys.samples("u")) == 3
    assert [s.t for s in sampling.load(fake_redis, ["u"], since=0)["u"]] == [
        T0 + 100, T0 + 200, T0 + 1100]


def test_keys_expire_one_window_after_the_last_write(fake_redis: fakeredis.FakeRedis) -> None:
    sampling.store(fake_redis, "h", [("u", "n", sample(T0))], window=WINDOW, now=T0)
    for key in (keys.samples("u"), keys.first_seen("u"), keys.sampled("h")):
        assert 0 < fake_redis.ttl(key) <= WINDOW, key


def test_first_seen_is_set_once(fake_redis: fakeredis.FakeRedis) -> None:
    sampling.store(fake_redis, "h", [("u", "n", sample(T0))], window=WINDOW, now=T0)
    sampling.store(fake_redis, "h", [("u", "n", sample(T0 + 300)), ("v", "m", sample(T0 + 300))],
                   window=WINDOW, now=T0 + 300)
    assert sampling.first_seen(fake_redis, ["u", "v", "w"]) == {
        "u": T0, "v": T0 + 300, "w": None}
    assert sampling.first_seen(fake_redis, []) == {}


def test_the_host_index_lists_what_the_host_sampled(fake_redis: fakeredis.FakeRedis) -> None:
    sampling.store(fake_redis, "h", [("old", "o", sample(T0))], window=1000, now=T0)
    sampling.store(fake_redis, "h", [("new", "n", sample(T0 + 900))], window=1000, now=T0 + 900)
    sampling.store(fake_redis, "other", [("x", "x", sample(T0 + 900))], window=1000,
                   now=T0 + 900)
    assert sampling.sampled(fake_redis, "h", since=0) == ["old", "new"]
    assert sampling.sampled(fake_redis, "h", since=T0 + 500) == ["new"]
    sampling.store(fake_redis, "h", [("new", "n", sample(T0 + 1500))], window=1000,
                   now=T0 + 1500)
    assert sampling.sampled(fake_redis, "h", since=0) == ["new"]  # trimmed with the window


def test_storing_nothing_writes_nothing(fake_redis: fakeredis.FakeRedis) -> None:
    assert sampling.store(fake_redis, "h", [], window=WINDOW, now=T0) == 0
    assert fake_redis.keys("*") == []


def test_a_raw_bytes_client_works_too() -> None:
    raw = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=False)
    sampling.store(raw, "h", [("u", "n", sample(T0))], window=WINDOW, now=T0)
    assert sampling.load(raw, ["u"], since=0) == {"u": [sample(T0)]}
    assert sampling.first_seen(raw, ["u"]) == {"u": T0}
    assert sampling.sampled(raw, "h", since=0) == ["u"]


def test_collect_reads_every_domain_once(hypervisor: Hypervisor, make_domain,  # type: ignore[no-untyped-def]
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    running, stopped = make_domain(), make_domain(start=False)
    calls = []
    original = hypervisor.stats
    monkeypatch.setattr(hypervisor, "stats", lambda: calls.append(1) or original())
    items = sampling.collect(hypervisor, now=T0)
    assert calls == [1]
    by_uuid = {uuid: (name, s) for uuid, name, s in items}
    assert by_uuid[running.UUIDString()][0] == running.name()
    assert by_uuid[running.UUIDString()][1].state == "running"
    assert by_uuid[stopped.UUIDString()][1].state == "shutoff"
    assert all(s.t == T0 and s.vcpus >= 1 for _, _, s in items)


def test_the_test_driver_has_no_cpu_time_so_nothing_is_idle(
        hypervisor: Hypervisor, make_domain, fake_redis: fakeredis.FakeRedis,  # type: ignore[no-untyped-def]
) -> None:
    domain = make_domain()
    for i in range(20):
        sampling.take(hypervisor, fake_redis, "h", window=WINDOW, now=T0 + 60 * i)
    samples = sampling.load(fake_redis, [domain.UUIDString()], since=0)[domain.UUIDString()]
    assert len(samples) == 20 and all(s.cpu_ns is None for s in samples)
    policy = IdlePolicy(window=WINDOW, min_samples=5, max_gap=180)
    d = decide(domain.UUIDString(), samples, policy, now=T0 + 60 * 19)
    assert not d.idle
    assert "no CPU time" in d.reason


def test_a_domain_undefined_during_sampling_is_skipped(hypervisor: Hypervisor, make_domain,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Guests come and go: one that vanishes mid-sample must not cost the host its sample."""
    kept, doomed = make_domain(), make_domain(start=False)
    conn = hypervisor.connection()

    class Racing:
        def __getattr__(self, name: str) -> object:
            return getattr(conn, name)

        def getAllDomainStats(self, *args: object) -> object:
            records = conn.getAllDomainStats(*args)
            doomed.undefine()  # removed after the stats call, before its image is checked
            return records

    monkeypatch.setattr(hypervisor, "connection", lambda: Racing())
    uuids = {uuid for uuid, _name, _s in sampling.collect(hypervisor, now=T0)}
    assert kept.UUIDString() in uuids
    assert doomed.UUIDString() not in uuids
