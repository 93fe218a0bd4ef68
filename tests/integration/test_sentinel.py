"""Redis behind Sentinel, for real: a master, a replica and three ``redis-sentinel`` processes
(tests/support/sentinel.py), the master SIGKILLed.

The state store follows the promoted replica and says "unavailable" (transient, retried) in
between, never anything else; a server demoted to a replica answers READONLY, which is the same
transient error; a worker whose broker, results and state all sit behind the sentinels keeps
running through the failover and finishes what it was sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import unavailable
from tests.support.sentinel import MASTER_NAME, SentinelGroup, sentinel_env
from tests.support.services import WorkerProcess, unique, wait_until
from worker.api.client import Client
from worker.core import settings
from worker.core.errors import StateStoreUnavailable
from worker.store.connection import connect
from worker.store.sentinel import SentinelOptions
from worker.transition.guards import Store

pytestmark = pytest.mark.integration


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    started = SentinelGroup(down_after_ms=2000)  # a quick failover keeps the suite short
    try:
        started.start()
    except (FileNotFoundError, TimeoutError) as exc:
        started.stop()
        unavailable(str(exc))
    yield started
    started.stop()


def test_the_state_store_follows_the_promoted_replica(group: SentinelGroup) -> None:
    client = connect(group.url(2), sentinel=SentinelOptions(master=MASTER_NAME))
    store = Store(client, lock_ttl=30, result_ttl=60)
    first = store.begin("r1", "guest-1", "token-1")
    assert not isinstance(first, tuple)
    client.execute_command("WAIT", 1, 2000)  # what DORMANT_STATE_WAIT_REPLICAS=1 does

    old, _killed = group.kill_master()
    errors: set[str] = set()

    def written() -> bool:
        try:
            client.set("dormant:probe", "1")
        except StateStoreUnavailable:
            errors.add("StateStoreUnavailable")
            return False
        return True

    wait_until(written, timeout=60, interval=0.1, message="a write after the failover")
    assert errors == {"StateStoreUnavailable"}  # nothing but the transient error meanwhile
    assert group.master().port != old.port
    assert client.get("dormant:lock:guest-1") is not None  # the acknowledged lock survived


def test_readonly_from_a_demoted_master_is_the_transient_error(group: SentinelGroup) -> None:
    old, _killed = group.kill_master()
    group.wait_failover(old)
    group.bring_back(old)  # starts as a master, Sentinel makes it a replica
    stale = connect(old.url(2))  # a client that still has the old master's address
    with pytest.raises(StateStoreUnavailable, match="read only replica"):
        Store(stale, lock_ttl=30, result_ttl=60).begin("r2", "guest-2", "token-2")


def test_a_worker_behind_the_sentinels_rides_out_a_failover(
        group: SentinelGroup, guests, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host = unique("test-host-")
    env = sentinel_env(group, host, DORMANT_RETRY_BACKOFF="1", DORMANT_RETRY_BACKOFF_MAX="2")
    worker = WorkerProcess(name=unique("w"), env=env, log_path=tmp_path / "worker.log",
                           args=["-P", "threads", "-c", "4"])
    worker.start()
    fleet = [guests.create("idle") for _ in range(2)]
    with Client.from_settings(settings.load(env)) as client:
        wait_until(lambda: client.app.control.ping(destination=[worker.nodename], timeout=0.5),
                   timeout=60, interval=0.2, message="worker answers ping")
        sent = []
        for i in range(12):
            if i == 6:
                old, killed = group.kill_master()
            target = ("paused", "running")[(i // 2) % 2]
            while True:  # the caller's own publish may meet the failover: it sends again
                try:
                    sent.append(client.ensure(fleet[i % 2].uuid, target,
                                              request_id=f"ride-{i}-{host}"))
                    break
                except Exception:  # kombu's or redis-py's outage, whichever
                    time.sleep(0.2)
        answers = [client.wait(result, 120) for result in sent]
        after = time.monotonic() - killed
    assert worker.alive(), worker.log()[-5000:]  # never a crash of the worker
    worker.stop()
    assert {a["outcome"] for a in answers} <= {"changed", "already", "duplicate"}
    assert group.master().port != old.port
    assert after < 60
