"""A state Redis at maxmemory (noeviction) refuses writes: transitions wait, nothing is half-done.

The worker's state store is a private redis-server of its own (the broker and results stay on
the harness's), given a maxmemory of 1 byte at the worst moments: before a transition starts,
and while libvirt is in the middle of a managed save. Writes are refused with Redis's OOM
error; the worker retries (StateStoreFull, transient), counts it in a metric and logs it; once
maxmemory is lifted the transition finishes, and the journal and libvirt say it happened once.
"""

from __future__ import annotations

import time
import urllib.request
import uuid

import pytest

from tests.support.journal import journal, real_state, record, saving
from tests.support.services import RedisServer, free_port, new_workdir, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def state_redis():  # type: ignore[no-untyped-def]
    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-state-full-"))
    server.start()
    server.client().config_set("maxmemory-policy", "noeviction")
    yield server
    server.stop()


def _full(server: RedisServer, full: bool) -> None:
    server.client().config_set("maxmemory", 1 if full else 0)


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _env(state_redis: RedisServer, port: int) -> dict[str, str]:
    return {"DORMANT_STATE_URL": state_redis.url(2), "DORMANT_METRICS_PORT": str(port),
            "DORMANT_LOCK_TTL": "5", "DORMANT_MAX_RETRIES": "40",
            "DORMANT_RETRY_BACKOFF": "1", "DORMANT_RETRY_BACKOFF_MAX": "2",
            "DORMANT_EVENTS": "false"}  # no external entries: the journal is dormant's alone


def test_a_transition_waits_while_the_state_store_is_full_then_happens_once(
        state_redis, guests, start_worker, client_app, host_name):  # type: ignore[no-untyped-def]
    port = free_port()
    worker = start_worker(pool="threads", concurrency=2, env=_env(state_redis, port))
    guest = guests.create("idle")
    _full(state_redis, True)
    rid = f"full-{uuid.uuid4().hex[:8]}"
    result = client_app.send_task("dormant.pause", args=[guest.uuid],
                                  kwargs={"request_id": rid}, queue=f"dormant.{host_name}")
    try:
        wait_until(lambda: _metric(port, "dormant_state_store_full_total") >= 3, timeout=60,
                   interval=0.2, message="three refused writes, each retried")
        wait_until(lambda: result.state == "RETRY", timeout=30, interval=0.05,
                   message="the task waiting for its next attempt")
        assert "StateStoreFull" in repr(result.info)
        assert real_state(guest.domain) == "running"  # nothing was done meanwhile
        assert "state store full: Redis refuses writes at maxmemory" in worker.log()
    finally:
        _full(state_redis, False)
    answer = result.get(timeout=60)
    assert answer["outcome"] == "changed" and answer["attempts"] > 1
    assert real_state(guest.domain) == "paused(user)"
    assert [e["outcome"] for e in journal(state_redis, guest.uuid)] == ["changed"]
    assert (record(state_redis, rid) or {})["status"] == "done"


@pytest.mark.slow
def test_a_save_finished_while_the_state_store_was_full_is_recorded_once_it_accepts_writes(
        state_redis, guests, start_worker, client_app, host_name):  # type: ignore[no-untyped-def]
    """Redis fills while libvirt writes the image: the save completes, its result cannot be
    recorded; the retries find Redis full, then (once writes are accepted) the pending intent
    and the guest already suspended: one 'changed' entry, saying it was running before."""
    port = free_port()
    start_worker(pool="threads", concurrency=2, env=_env(state_redis, port))
    guest = guests.create("idle")
    rid = f"full-{uuid.uuid4().hex[:8]}"
    result = client_app.send_task("dormant.suspend", args=[guest.uuid],
                                  kwargs={"request_id": rid}, queue=f"dormant.{host_name}")
    wait_until(lambda: saving(guest.domain), timeout=60, interval=0.005,
               message="the save under way")
    _full(state_redis, True)
    try:
        wait_until(lambda: real_state(guest.domain) == "suspended", timeout=60,
                   message="libvirt finishes the save")
        wait_until(lambda: result.state == "RETRY", timeout=60, interval=0.05,
                   message="the unrecorded result is retried")
        assert (record(state_redis, rid) or {}).get("status") == "pending"  # not half-done
    finally:
        _full(state_redis, False)

    answer = result.get(timeout=120)
    assert answer["outcome"] == "changed" and answer["state_before"] == "running"
    assert real_state(guest.domain) == "suspended"
    entries = [e for e in journal(state_redis, guest.uuid) if e["outcome"] != "retrying"]
    assert [(e["outcome"], e["state_before"]) for e in entries] == [("changed", "running")]
    assert (record(state_redis, rid) or {})["status"] == "done"


def test_one_redis_for_broker_and_state_at_maxmemory_loses_nothing_and_the_worker_lives(
        redis_clean, guests, start_worker, client_app, host_name):  # type: ignore[no-untyped-def]
    """The deployment's layout: broker, results and state in one Redis, full for a few
    seconds while messages wait in the queue. kombu cannot record the deliveries, acks and
    results of that moment: Celery stopped the worker and lost the message it had taken. The
    worker holds them until Redis accepts writes; then everything is answered once and
    nothing stays unacknowledged. (Callers cannot enqueue while it is full: their send fails,
    which they see.)"""
    worker = start_worker(pool="threads", concurrency=8, env={"DORMANT_EVENTS": "false"})
    fleet = [guests.create("idle") for _ in range(3)]
    server = redis_clean.client(0)
    server.config_set("maxmemory-policy", "noeviction")
    sent = [client_app.send_task(
        "dormant.ensure", args=[fleet[i % 3].uuid, ("paused", "running")[i // 3 % 2]],
        kwargs={"request_id": f"one-{i}-{uuid.uuid4().hex[:6]}"}, queue=f"dormant.{host_name}")
        for i in range(60)]
    wait_until(lambda: sum(r.ready() for r in sent) >= 3, timeout=60, interval=0.01,
               message="the first answers")
    server.config_set("maxmemory", 1)
    try:
        queued = server.llen(f"dormant.{host_name}")
        time.sleep(3)  # the outage
    finally:
        server.config_set("maxmemory", 0)
    answers = [r.get(timeout=180) for r in sent]
    log = worker.log()
    assert queued > 0  # messages were waiting when Redis filled
    assert "state store full: Redis refuses" in log or "broker full: Redis refuses" in log
    assert {a["outcome"] for a in answers} <= {"changed", "already"}
    assert "Unrecoverable error" not in log and worker.alive()
    assert server.hlen("unacked") == 0 and server.llen(f"dormant.{host_name}") == 0
    done = [e["request_id"] for g in fleet for e in journal(redis_clean, g.uuid)
            if e["outcome"] in {"changed", "already"}]
    assert sorted(done) == sorted(a["request_id"] for a in answers)  # each exactly once
