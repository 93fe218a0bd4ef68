"""store.Store on fakeredis: idempotency, the fenced per-instance lock, the journal, deadlines."""

from __future__ import annotations

import time

import fakeredis
import pytest

from tests.support.services import wait_until
from worker.core.errors import InstanceBusy, StaleLock, StateStoreUnavailable
from worker.store import keys
from worker.transition.guards import Done, Held, Store

INSTANCE = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
OTHER = "11111111-2222-3333-4444-555555555555"


def _finish_ok(store: Store, held: Held, request_id: str, **extra: object) -> dict[str, object]:
    result = {"outcome": "changed", "request_id": request_id, **extra}
    store.finish(held, instance=held.instance, request_id=request_id, entry=result,
                 record={**result, "status": "done"}, host="hv1")
    return result


def test_begin_takes_the_lock_with_increasing_fences(store: Store) -> None:
    first = store.begin("r1", INSTANCE, "tok-a")
    assert isinstance(first, Held)
    assert first.fence == 1 and first.value == "1:tok-a" and first.previous is None
    assert store.redis.get(keys.lock(INSTANCE)) == "1:tok-a"
    assert 0 < store.redis.pttl(keys.lock(INSTANCE)) <= 30_000
    _finish_ok(store, first, "r1")
    second = store.begin("r2", INSTANCE, "tok-b")
    assert isinstance(second, Held) and second.fence == 2
    # Fences count per instance.
    elsewhere = store.begin("r3", OTHER, "tok-c")
    assert isinstance(elsewhere, Held) and elsewhere.fence == 1


def test_begin_reports_busy_while_held(store: Store) -> None:
    held = store.begin("r1", INSTANCE, "tok-a")
    assert isinstance(held, Held)
    busy = store.begin("r2", INSTANCE, "tok-b")
    assert isinstance(busy, tuple) and busy[0] == "busy"
    assert 0 < busy[1] <= 30_000
    assert store.redis.get(keys.fence(INSTANCE)) == "1"  # a busy answer bumps no fence


def test_acquire_waits_then_raises_instance_busy(store: Store) -> None:
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    started = time.monotonic()
    with pytest.raises(InstanceBusy, match=INSTANCE):
        store.acquire("r2", INSTANCE, wait=0.2)
    waited = time.monotonic() - started
    assert 0.2 <= waited < 2.0


def test_acquire_gets_a_lock_that_is_released_meanwhile(store: Store) -> None:
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    other = Store(store.redis, lock_ttl=30, result_ttl=3600)
    # The lock now belongs to a worker that died: nobody renews it (this process's keeper
    # renews only its own token), it lapses, and the waiter gets it with a newer fence.
    store.redis.set(keys.lock(INSTANCE), f"{held.fence}:dead-worker", px=100)
    got = other.acquire("r2", INSTANCE, wait=5)
    assert isinstance(got, Held) and got.fence == held.fence + 1


def test_done_after_finish_returns_the_record(store: Store) -> None:
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    result = _finish_ok(store, held, "r1", state_after="paused")
    again = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(again, Done)
    assert again.result == {**result, "status": "done"}
    assert store.request("r1") == {**result, "status": "done"}
    assert 0 < store.redis.ttl(keys.request("r1")) <= 3600
    # A finished request answers even while another request holds the instance.
    other = store.acquire("r2", INSTANCE, wait=0)
    assert isinstance(other, Held)
    assert isinstance(store.begin("r1", INSTANCE, "tok"), Done)


def test_lock_is_released_after_finish(store: Store) -> None:
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    _finish_ok(store, held, "r1")
    assert store.redis.get(keys.lock(INSTANCE)) is None
    assert isinstance(store.acquire("r2", INSTANCE, wait=0), Held)


def test_finish_without_record_releases_and_journals(store: Store) -> None:
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    store.finish(held, instance=INSTANCE, request_id="r1", entry={"outcome": "retrying"},
                 record=None)
    assert store.redis.get(keys.lock(INSTANCE)) is None
    assert store.request("r1") is None
    assert [e["outcome"] for e in store.journal(INSTANCE)] == ["retrying"]


def test_finish_refuses_a_stale_holder_and_writes_nothing(store: Store) -> None:
    stale = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(stale, Held)
    # The lock expires while held and a newer transition takes the instance.
    store.redis.delete(keys.lock(INSTANCE))
    newer = Store(store.redis, lock_ttl=30, result_ttl=3600).acquire("r2", INSTANCE, wait=0)
    assert isinstance(newer, Held) and newer.fence == stale.fence + 1
    with pytest.raises(StaleLock, match="fence 1"):
        store.finish(stale, instance=INSTANCE, request_id="r1", entry={"outcome": "changed"},
                     record={"outcome": "changed", "status": "done"}, deadline=123.0,
                     host="hv1")
    assert store.request("r1") is None
    assert store.journal(INSTANCE) == [] and store.journal() == []
    assert store.redis.zscore(keys.DEADLINES, INSTANCE) is None
    assert store.redis.get(keys.where(INSTANCE)) is None
    # The newer holder keeps its lock.
    assert store.redis.get(keys.lock(INSTANCE)) == newer.value


def test_a_non_holder_never_overwrites_a_finished_request(store: Store) -> None:
    """A stale or lock-less attempt recording a failure must not replace a done record."""
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    result = _finish_ok(store, held, "r1")
    store.finish(None, instance=INSTANCE, request_id="r1", entry={"outcome": "failed"},
                 record={"outcome": "failed", "status": "failed"})
    assert store.request("r1") == {**result, "status": "done"}
    # The failed attempt is still journaled.
    assert [e["outcome"] for e in store.journal(INSTANCE)] == ["changed", "failed"]


def test_record_intent_needs_the_lock(store: Store) -> None:
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    store.record_intent(held, "r1", {"state_before": "running"})
    assert store.request("r1") == {"status": "pending", "state_before": "running"}
    # A redelivery of the same request (after the lock lapsed) sees the intent.
    store.redis.delete(keys.lock(INSTANCE))
    again = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(again, Held)
    assert again.previous == {"status": "pending", "state_before": "running"}
    # The old holder lost the lock: it may not record anything any more.
    with pytest.raises(StaleLock):
        store.record_intent(held, "r1", {"state_before": "paused"})
    assert store.request("r1") == {"status": "pending", "state_before": "running"}


def test_journal_is_oldest_first_per_instance_and_fleet_wide(store: Store) -> None:
    for i in range(5):
        held = store.acquire(f"r{i}", INSTANCE if i % 2 == 0 else OTHER, wait=0)
        assert isinstance(held, Held)
        _finish_ok(store, held, f"r{i}", n=i)
    store.journal_only({"outcome": "rejected", "n": 5})
    store.journal_only({"outcome": "failed", "n": 6}, INSTANCE)
    assert [e["n"] for e in store.journal(INSTANCE)] == [0, 2, 4, 6]
    assert [e["n"] for e in store.journal(OTHER)] == [1, 3]
    assert [e["n"] for e in store.journal()] == [0, 1, 2, 3, 4, 5, 6]
    assert [e["n"] for e in store.journal(count=3)] == [4, 5, 6]  # the newest three
    assert store.journal("no-such-instance") == []


def test_finish_refreshes_the_registry(store: Store) -> None:
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    _finish_ok(store, held, "r1")
    assert store.redis.get(keys.where(INSTANCE)) == "hv1"
    assert 0 < store.redis.ttl(keys.where(INSTANCE)) <= 600


def test_deadline_set_and_cleared_through_finish(store: Store) -> None:
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    store.finish(held, instance=INSTANCE, request_id="r1", entry={}, record={"status": "done"},
                 deadline=1000.5, host="hv1")
    assert store.redis.zscore(keys.DEADLINES, INSTANCE) == 1000.5
    assert store.redis.hgetall(keys.deadline(INSTANCE)) == {
        "at": "1000.5", "request_id": "r1", "host": "hv1"}
    held = store.acquire("r2", INSTANCE, wait=0)
    assert isinstance(held, Held)
    store.finish(held, instance=INSTANCE, request_id="r2", entry={}, record={"status": "done"},
                 deadline="clear", host="hv1")
    assert store.redis.zscore(keys.DEADLINES, INSTANCE) is None
    assert store.redis.exists(keys.deadline(INSTANCE)) == 0


def test_claim_due_deadlines_returns_each_due_deadline_once(store: Store) -> None:
    for instance, at in ((INSTANCE, 100.0), (OTHER, 200.0), ("late", 900.0)):
        held = store.acquire(f"r-{instance}", instance, wait=0)
        assert isinstance(held, Held)
        store.finish(held, instance=instance, request_id=f"r-{instance}", entry={},
                     record={"status": "done"}, deadline=at, host="hv1")
    assert store.claim_due_deadlines(50.0) == []
    claimed = store.claim_due_deadlines(250.0)
    assert sorted(c["instance"] for c in claimed) == sorted([INSTANCE, OTHER])
    assert {c["request_id"] for c in claimed} == {f"r-{INSTANCE}", f"r-{OTHER}"}
    assert all(c["host"] == "hv1" for c in claimed)
    assert store.claim_due_deadlines(250.0) == []
    assert [c["instance"] for c in store.claim_due_deadlines(1000.0)] == ["late"]
    assert store.claim_due_deadlines(1e12) == []


def test_two_claimers_split_the_due_deadlines(fake_redis: fakeredis.FakeRedis) -> None:
    a = Store(fake_redis, lock_ttl=30, result_ttl=3600)
    b = Store(fake_redis, lock_ttl=30, result_ttl=3600)
    for i in range(20):
        fake_redis.zadd(keys.DEADLINES, {f"i{i}": float(i)})
    seen = [c["instance"] for c in a.claim_due_deadlines(100.0, limit=7)]
    seen += [c["instance"] for c in b.claim_due_deadlines(100.0)]
    seen += [c["instance"] for c in a.claim_due_deadlines(100.0)]
    assert sorted(seen) == sorted(f"i{i}" for i in range(20))


def test_keeper_renews_a_held_lock(fake_redis: fakeredis.FakeRedis) -> None:
    """A holder keeps its lock past the TTL while alive (a long managedSave)."""
    short = Store(fake_redis, lock_ttl=1.0, result_ttl=60)
    held = short.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    # Watch it for more than three TTLs: it must never lapse.
    watch_until = time.monotonic() + 3.5
    wait_until(lambda: fake_redis.get(keys.lock(INSTANCE)) != held.value
               or time.monotonic() >= watch_until, timeout=5, message="lock watch")
    assert fake_redis.get(keys.lock(INSTANCE)) == held.value
    short.finish(held, instance=INSTANCE, request_id="r1", entry={}, record=None)
    assert fake_redis.get(keys.lock(INSTANCE)) is None


def test_a_finish_that_fails_stops_renewing_the_lock() -> None:
    """If the result cannot be written (Redis down), the lock must lapse by its TTL, not be
    kept alive forever by this process's keeper while the retry waits for it."""
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    short = Store(client, lock_ttl=0.3, result_ttl=60)
    held = short.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    server.connected = False
    with pytest.raises(StateStoreUnavailable):
        short.finish(held, instance=INSTANCE, request_id="r1", entry={}, record=None)
    server.connected = True
    wait_until(lambda: client.get(keys.lock(INSTANCE)) is None, timeout=3,
               message="the abandoned lock to lapse")
    assert isinstance(short.acquire("r1", INSTANCE, wait=0), Held)


def test_store_outage_is_a_transient_error() -> None:
    server = fakeredis.FakeServer()
    store = Store(fakeredis.FakeRedis(server=server, decode_responses=True), lock_ttl=30,
                  result_ttl=60)
    server.connected = False
    with pytest.raises(StateStoreUnavailable):
        store.acquire("r1", INSTANCE, wait=0)
    with pytest.raises(StateStoreUnavailable):
        store.journal(INSTANCE)
    with pytest.raises(StateStoreUnavailable):
        store.journal_only({"outcome": "rejected"})
    with pytest.raises(StateStoreUnavailable):
        store.claim_due_deadlines(0.0)


def test_begin_retried_with_the_same_token_gets_its_own_lock(store: Store) -> None:
    """redis-py resends a script whose reply was lost; the lock it took is the caller's."""
    first = store.begin("r1", INSTANCE, "tok-a")
    again = store.begin("r1", INSTANCE, "tok-a")
    assert isinstance(first, Held) and isinstance(again, Held)
    assert again.value == first.value == "1:tok-a"
    # Another token (and a token that merely ends the same way) is still busy.
    assert isinstance(store.begin("r2", INSTANCE, "tok-b"), tuple)
    assert isinstance(store.begin("r2", INSTANCE, "a"), tuple)


def test_the_lock_excludes_concurrent_holders(fake_redis: fakeredis.FakeRedis) -> None:
    """Threads competing for one instance never hold it together; fences only grow."""
    import threading

    inside: list[int] = []
    fences: list[int] = []
    overlaps: list[int] = []
    guard = threading.Lock()

    def worker(n: int) -> None:
        store = Store(fake_redis, lock_ttl=30, result_ttl=60)
        for i in range(10):
            held = store.acquire(f"w{n}-{i}", INSTANCE, wait=10)
            assert isinstance(held, Held)
            with guard:
                if inside:
                    overlaps.append(n)
                inside.append(n)
                fences.append(held.fence)
            fake_redis.incr("work-done-while-holding")  # a real round trip inside
            with guard:
                inside.remove(n)
            store.finish(held, instance=INSTANCE, request_id=f"w{n}-{i}", entry={"n": n},
                         record={"status": "done"})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert overlaps == []
    assert sorted(fences) == fences == list(range(1, 61))
    assert len(Store(fake_redis, lock_ttl=30, result_ttl=60).journal(INSTANCE, count=100)) == 60
