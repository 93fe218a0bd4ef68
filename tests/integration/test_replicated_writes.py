"""The writes a failover must not lose wait for a replica (``DORMANT_STATE_WAIT_REPLICAS``).

A real master and a real replica (``--replicaof``), no sentinel needed: the lock and fence that
``begin`` takes and the result that ``finish`` records are on the replica by the time the call
returns; with the replica frozen (SIGSTOP, our own process) the same calls fail with the
transient ``StateStoreUnavailable`` after the WAIT timeout, and a transition whose result met a
frozen replica is answered from its record on the retry, not redone. Transitions run on
libvirt's in-process test driver (the hypervisor is not what is tested here).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt
import pytest

from tests.conftest import unavailable
from tests.support.sentinel import pid_of
from tests.support.services import RedisServer, free_port, new_workdir, wait_until
from worker.core.errors import StateStoreUnavailable
from worker.hypervisor import Hypervisor
from worker.store import keys
from worker.store.connection import connect
from worker.transition.context import Context, Request
from worker.transition.guards import Held, Store
from worker.transition.runner import run
from worker.transition.table import Action

pytestmark = pytest.mark.integration
TEST_URI = "test:///default"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    master = RedisServer(port=free_port(), workdir=new_workdir("dormant-wait-m-"))
    replica = RedisServer(port=free_port(), workdir=new_workdir("dormant-wait-r-"),
                          extra_args=["--replicaof", "127.0.0.1", str(master.port),
                                      "--repl-diskless-sync-delay", "0"])
    try:
        master.start()
        replica.start()
    except (FileNotFoundError, TimeoutError) as exc:
        unavailable(str(exc))
    wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up",
               timeout=30, message="replica in sync")
    yield master, replica
    replica.stop()
    master.stop()


@contextmanager
def frozen(replica: RedisServer) -> Iterator[None]:
    pid = pid_of(replica)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _store(master: RedisServer, **kw: Any) -> Store:
    return Store(connect(master.url(2)), lock_ttl=30, result_ttl=600,
                 wait_replicas=1, wait_timeout=kw.pop("wait_timeout", 2.0), **kw)


def test_lock_fence_and_result_are_on_the_replica_when_the_calls_return(pair) -> None:  # type: ignore[no-untyped-def]
    master, replica = pair
    store, on_replica = _store(master), replica.client(2)
    instance, rid = str(uuid.uuid4()), f"r-{uuid.uuid4().hex[:6]}"
    held = store.begin(rid, instance, "token-a", fingerprint="x", pending={"a": 1})
    assert isinstance(held, Held)
    assert on_replica.get(keys.lock(instance)) == held.value
    assert on_replica.get(keys.fence(instance)) == str(held.fence)
    store.finish(held, instance=instance, request_id=rid, entry={"outcome": "changed"},
                 record={"status": "done", "fingerprint": "x"})
    assert '"done"' in (on_replica.get(keys.request(rid)) or "")


def test_a_replica_that_does_not_acknowledge_is_a_transient_error(pair) -> None:  # type: ignore[no-untyped-def]
    master, replica = pair
    store = _store(master, wait_timeout=0.3)
    instance, rid = str(uuid.uuid4()), f"r-{uuid.uuid4().hex[:6]}"
    with frozen(replica):
        started = time.monotonic()
        with pytest.raises(StateStoreUnavailable, match="acknowledged by 0 of 1 replica"):
            store.begin(rid, instance, "token-a")
        assert time.monotonic() - started >= 0.3
        # The unacknowledged lock lapses at once, so the retry need not wait for its TTL.
        wait_until(lambda: master.client(2).get(keys.lock(instance)) is None, timeout=0.5,
                   message="the unacknowledged lock lapsed")
    held = store.begin(rid, instance, "token-b")  # once the replica answers, it goes on
    assert isinstance(held, Held)
    with frozen(replica), pytest.raises(StateStoreUnavailable) as unreplicated:
        store.finish(held, instance=instance, request_id=rid, entry={"outcome": "changed"},
                     record={"status": "done"})
    assert "acknowledged by 0 of 1" in unreplicated.value.details["replicated"]
    assert '"done"' in (master.client(2).get(keys.request(rid)) or "")  # on the master


def test_a_master_left_without_replicas_goes_on_until_one_returns(pair) -> None:  # type: ignore[no-untyped-def]
    """After a failover the promoted master may have no replica at all: nothing could be
    promoted without its writes, so it goes on (and waits for the replica once it is back)."""
    master, replica = pair
    store = _store(master, wait_timeout=0.5)
    replica.stop()
    wait_until(lambda: master.client().info("replication")["connected_slaves"] == 0,
               timeout=30, message="the master has lost its replica")
    try:
        for n in range(3):
            started = time.monotonic()
            held = store.begin(f"alone-{n}", str(uuid.uuid4()), "token")
            assert isinstance(held, Held)
            if n:  # only the first write found out, by waiting once
                assert time.monotonic() - started < 0.4
    finally:
        replica.start()
        wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up",
                   timeout=30, message="replica in sync again")
    instance = str(uuid.uuid4())
    for _ in range(2):  # the first write learns the replica is back, the second waits for it
        held = store.begin(f"back-{uuid.uuid4().hex[:6]}", instance, uuid.uuid4().hex)
        assert isinstance(held, Held)
        store.finish(held, instance=instance, request_id="x", entry={}, record=None)
    held = store.begin("back-last", instance, "token-z")
    assert isinstance(held, Held)
    assert replica.client(2).get(keys.lock(instance)) == held.value


class FreezesBeforeFinish(Store):
    """The replica stops answering just as the transition records its result."""

    replica: RedisServer

    def finish(self, held: Held | None, **kw: Any) -> None:
        if held is None or kw.get("record") is None:
            return super().finish(held, **kw)
        with frozen(self.replica):
            return super().finish(held, **kw)


def test_a_result_the_replica_missed_is_retried_and_answered_from_its_record(pair) -> None:  # type: ignore[no-untyped-def]
    master, replica = pair
    store = FreezesBeforeFinish(connect(master.url(2)), lock_ttl=30, result_ttl=600,
                                wait_replicas=1, wait_timeout=0.3)
    store.replica = replica
    conn = libvirt.open(TEST_URI)
    name = f"wait-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(f"<domain type='test'><name>{name}</name><memory unit='MiB'>64"
                         "</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>")
    dom.create()
    hv = Hypervisor(TEST_URI)
    ctx = Context(hypervisor=hv, store=store, host="hv1", lock_wait=1, verify_timeout=2)
    try:
        req = Request(action=Action.PAUSE, instance=dom.UUIDString(), request_id=name,
                      task_id="t1", final_attempt=False)
        with pytest.raises(StateStoreUnavailable):
            run(ctx, req)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        journal = [e["outcome"] for e in store.journal(dom.UUIDString())]
        assert journal == ["changed"]  # no "retrying" entry after the recorded result
        again = run(ctx, Request(action=Action.PAUSE, instance=dom.UUIDString(),
                                 request_id=name, task_id="t2", attempt=2))
        assert again["outcome"] == "duplicate" and again["original_task_id"] == "t1"
    finally:
        hv.close()
        dom.destroy()
        dom.undefine()
        conn.close()
