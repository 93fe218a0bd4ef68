"""The lock keeper (worker/transition/keeper.py): it renews what this process holds and stops
renewing a lock that is no longer its own, so a lost lock never holds up the others."""

from __future__ import annotations

import time

import fakeredis

from tests.support.services import free_port, wait_until
from worker.store import keys
from worker.store.connection import connect
from worker.transition.guards import Held, Store
from worker.transition.keeper import keeper

INSTANCE = "5c1f3a0e-8d7b-4e6a-9f21-0b3c4d5e6f70"


def _renewed(store: Store, key: str) -> bool:
    return any(s is store and k == key for (_id, k), (s, _v, _t) in keeper.held().items())


def test_a_lock_taken_by_another_holder_is_no_longer_renewed(
        fake_redis: fakeredis.FakeRedis) -> None:
    store = Store(fake_redis, lock_ttl=0.6, result_ttl=60)
    held = store.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    key = keys.lock(INSTANCE)
    assert _renewed(store, key)
    fake_redis.set(key, "9:someone-else")  # it lapsed and was taken meanwhile
    wait_until(lambda: not _renewed(store, key), timeout=5, message="keeper lets go")
    assert fake_redis.get(key) == "9:someone-else"
    assert fake_redis.pttl(key) == -1  # the keeper never touched the other holder's lock


def test_an_unreachable_store_neither_holds_up_the_others_nor_stays_for_ever(
        fake_redis: fakeredis.FakeRedis) -> None:
    """A lock whose Redis went away (a test's, or a store replaced): every renewal fails
    after the client's own retries; past its TTL it is dropped, and meanwhile the other
    locks are renewed in time."""
    gone = Store(connect(f"redis://127.0.0.1:{free_port()}/0"), lock_ttl=0.5, result_ttl=60)
    keeper.add(gone, keys.lock("gone"), "1:token")
    alive = Store(fake_redis, lock_ttl=1.0, result_ttl=60)
    held = alive.acquire("r1", INSTANCE, wait=0)
    assert isinstance(held, Held)
    wait_until(lambda: not _renewed(gone, keys.lock("gone")), timeout=10,
               message="the unreachable store's lock dropped")
    watch_until = time.monotonic() + 3.5  # more than three TTLs of the live lock
    wait_until(lambda: fake_redis.get(keys.lock(INSTANCE)) != held.value
               or time.monotonic() >= watch_until, timeout=10, message="lock watch")
    assert fake_redis.get(keys.lock(INSTANCE)) == held.value
    alive.finish(held, instance=INSTANCE, request_id="r1", entry={}, record=None)
    assert not _renewed(alive, keys.lock(INSTANCE))
