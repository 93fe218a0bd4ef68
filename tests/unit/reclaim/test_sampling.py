"""Sampling on fakeredis and libvirt's test driver: store/load, trimming, expiry, first
sightings, the per-host index, guests moving host, the old form, round trips per call.
(The encoding itself: tests/unit/test_activity.py.)"""

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


def times(activity) -> list[float]:  # type: ignore[no-untyped-def]
    return list(activity.times)


def test_store_then_load_in_time_order(fake_redis: fakeredis.FakeRedis,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingPipelines(fake_redis, monkeypatch)
    items = [("u1", "one", sample(T0 + 60)), ("u2", "two", sample(T0 + 60, cpu=5))]
    assert sampling.store(fake_redis, "h1", items, window=WINDOW, now=T0 + 60) == 2
    assert sampling.store(fake_redis, "h1", [("u1", "one", sample(T0 + 120, cpu=3_000))],
                          window=WINDOW, now=T0 + 120) == 1
    writes = counter.executed
    assert writes <= 2 * 3  # a fixed number of round trips per store, whatever the guests
    loaded = sampling.load(fake_redis, ["u1", "u2", "nobody"], since=T0 - WINDOW, host="h1")
    assert counter.executed == writes + 2  # one round trip (+1: "nobody" has no record)
    assert times(loaded["u1"]) == [T0 + 60, T0 + 120]
    assert list(loaded["u1"].running()) == [True, True]
    assert loaded["u1"].last == sample(T0 + 120, cpu=3_000)._replace(rd=70, wr=0)
    assert times(loaded["u2"]) == [T0 + 60]
    assert len(loaded["nobody"]) == 0
    assert times(sampling.load(fake_redis, ["u1"], since=T0 + 61)["u1"]) == [T0 + 120]
    assert sampling.load(fake_redis, [], since=0) == {}


def test_a_sample_older_than_the_newest_stored_is_dropped(fake_redis: fakeredis.FakeRedis
                                                          ) -> None:
    sampling.store(fake_redis, "h", [("u", "n", sample(T0 + 60))], window=WINDOW, now=T0 + 60)
    assert sampling.store(fake_redis, "h", [("u", "n", sample(T0))], window=WINDOW,
                          now=T0 + 60) == 0
    assert times(sampling.load(fake_redis, ["u"], since=0, host="h")["u"]) == [T0 + 60]


def test_one_store_may_hold_many_samples_of_each_guest(fake_redis: fakeredis.FakeRedis) -> None:
    """What a simulation or a backfill writes: a day of samples per guest in one call."""
    day = [(u, u, sample(T0 + 300 * i, cpu=1_000 * i)) for i in range(288) for u in ("a", "b")]
    assert sampling.store(fake_redis, "h", day, window=86400, now=T0 + 300 * 287) == 576
    loaded = sampling.load(fake_redis, ["a", "b"], since=0, host="h")
    assert times(loaded["a"]) == times(loaded["b"]) == [T0 + 300 * i for i in range(288)]
    assert fake_redis.strlen(keys.activity_times("h")) == 5 + 8 * 288  # times once per host


def test_store_trims_to_the_window_and_keeps_its_start(fake_redis: fakeredis.FakeRedis) -> None:
    for t in (T0, T0 + 100, T0 + 200):
        sampling.store(fake_redis, "h", [("u", "n", sample(t))], window=1000, now=t)
    # At now = T0 + 1100 the window starts at T0 + 100: T0 goes, T0 + 100 stays.
    sampling.store(fake_redis, "h", [("u", "n", sample(T0 + 1100))], window=1000, now=T0 + 1100)
    assert times(sampling.load(fake_redis, ["u"], since=0, host="h")["u"]) == [
        T0 + 100, T0 + 200, T0 + 1100]


def test_keys_expire_one_window_after_the_last_write(fake_redis: fakeredis.FakeRedis) -> None:
    sampling.store(fake_redis, "h", [("u", "n", sample(T0))], window=WINDOW, now=T0)
    for key in (keys.activity("u"), keys.activity_times("h"), keys.activity_guests("h")):
        assert 0 < fake_redis.ttl(key) <= WINDOW, key


def test_first_seen_is_set_once(fake_redis: fakeredis.FakeRedis) -> None:
    sampling.store(fake_redis, "h", [("u", "n", sample(T0))], window=WINDOW, now=T0)
    sampling.store(fake_redis, "h", [("u", "n", sample(T0 + 300)), ("v", "m", sample(T0 + 300))],
                   window=WINDOW, now=T0 + 300)
    assert sampling.first_seen(fake_redis, ["u", "v", "w"]) == {
        "u": T0, "v": T0 + 300, "w": None}
    assert sampling.first_seen(fake_redis, []) == {}
    loaded = sampling.load(fake_redis, ["u", "v"], since=0, host="h")
    assert (loaded["u"].first_seen, loaded["v"].first_seen) == (T0, T0 + 300)


def test_first_seen_restarts_after_a_whole_window_unsampled(fake_redis: fakeredis.FakeRedis
                                                            ) -> None:
    sampling.store(fake_redis, "h", [("u", "n", sample(T0))], window=1000, now=T0)
    sampling.store(fake_redis, "h", [("u", "n", sample(T0 + 5000))], window=1000, now=T0 + 5000)
    assert sampling.first_seen(fake_redis, ["u"]) == {"u": T0 + 5000}


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
    assert times(sampling.load(raw, ["u"], since=0, host="h")["u"]) == [T0]
    assert times(sampling.load(raw, ["u"], since=0)["u"]) == [T0]  # host read from the record
    assert sampling.first_seen(raw, ["u"]) == {"u": T0}
    assert sampling.sampled(raw, "h", since=0) == ["u"]


def test_a_guest_that_moves_host_keeps_its_evidence(fake_redis: fakeredis.FakeRedis) -> None:
    """Rows written on the old host keep their times (explicit ones) on the new host."""
    policy = IdlePolicy(window=WINDOW, min_samples=5, max_gap=180, min_span_fraction=0.5)
    for i in range(10):
        sampling.store(fake_redis, "a", [("u", "n", sample(T0 + 60 * i, cpu=1_000 * i))],
                       window=WINDOW, now=T0 + 60 * i)
    for i in range(10, 40):
        sampling.store(fake_redis, "b", [("u", "n", sample(T0 + 60 * i, cpu=1_000 * i))],
                       window=WINDOW, now=T0 + 60 * i)
    stored = sampling.load(fake_redis, ["u"], since=0, host="b")["u"]
    assert times(stored) == [T0 + 60 * i for i in range(40)]
    raw = [sample(T0 + 60 * i, cpu=1_000 * i) for i in range(40)]
    now = T0 + 60 * 39
    assert decide("u", stored, policy, now=now).reason == decide("u", raw, policy, now=now).reason


def test_samples_in_the_old_form_are_read_then_converted(fake_redis: fakeredis.FakeRedis) -> None:
    """Before this storage, samples were a sorted set of JSON per instance."""
    for i in range(5):
        member = f'[{T0 + 60 * i},"r",{1000 * i},2,10,20,30,40]'
        fake_redis.zadd(keys.samples("u"), {member: T0 + 60 * i})
    fake_redis.set(keys.first_seen("u"), repr(T0 - 3600))
    assert times(sampling.load(fake_redis, ["u"], since=0, host="h")["u"]) == [
        T0 + 60 * i for i in range(5)]
    assert sampling.first_seen(fake_redis, ["u"]) == {"u": T0 - 3600}
    sampling.store(fake_redis, "h", [("u", "n", sample(T0 + 300, cpu=5000))], window=WINDOW,
                   now=T0 + 300)
    assert not fake_redis.exists(keys.samples("u"), keys.first_seen("u"))
    loaded = sampling.load(fake_redis, ["u"], since=0, host="h")["u"]
    assert times(loaded) == [T0 + 60 * i for i in range(6)]
    assert loaded.first_seen == T0 - 3600


def test_collect_reads_every_domain_once(hypervisor: Hypervisor, make_domain,  # type: ignore[no-untyped-def]
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    running, stopped = make_domain(), make_domain(start=False)
    calls = []
    original = hypervisor.stats
    monkeypatch.setattr(hypervisor, "stats", lambda **kw: calls.append(1) or original(**kw))
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
    assert len(samples) == 20 and not samples.has_cpu_time()
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


def test_collect_of_some_guests_reads_only_theirs(hypervisor: Hypervisor, make_domain,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-check before a suspend reads one guest's stats, whatever the host holds."""
    wanted, other = make_domain(), make_domain()
    monkeypatch.setattr(hypervisor, "stats", lambda **kw: pytest.fail("every domain was read"))
    items = sampling.collect(hypervisor, now=T0, of=[wanted.UUIDString(), "no-such-guest"])
    assert [(u, n) for u, n, _s in items] == [(wanted.UUIDString(), wanted.name())]
    assert items[0][2].state == "running"
    assert other.UUIDString() not in {u for u, _n, _s in items}
