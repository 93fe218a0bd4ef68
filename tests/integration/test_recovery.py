"""Recovery with default settings: an interrupted transition completes within seconds of its
host's worker being up again, not after the visibility timeout (an hour by default).

Real redis-server, real worker processes (SIGKILLed mid-managedSave), real KVM guests.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import wait_for_worker
from tests.support.journal import journal, real_state, record, saving
from tests.support.services import RedisServer, free_port, new_workdir, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERED_WITHIN = 120  # seconds after the new worker answers pings (the bound)


def test_worker_killed_mid_save_is_finished_by_the_next_worker_with_default_settings(
        start_worker, client_app, host_name, guests, redis_clean):
    first = start_worker(pool="threads", concurrency=4)  # no DORMANT_* setting changed
    guest = guests.create("idle")
    rid = f"recover-{uuid.uuid4().hex[:8]}"
    sent = client_app.send_task("dormant.suspend", args=[guest.uuid],
                                kwargs={"request_id": rid}, queue=f"dormant.{host_name}")
    wait_until(lambda: saving(guest.domain), timeout=30, interval=0.01,
               message="managedSave in progress")
    first.kill()  # SIGKILL of the whole worker: its message stays unacked in Redis

    second = start_worker(pool="threads", concurrency=4, wait=False)
    wait_for_worker(second, redis_clean, timeout=60)
    up = time.monotonic()
    result = sent.get(timeout=RECOVERED_WITHIN)
    took = time.monotonic() - up
    print(f"recovered {took:.1f}s after the new worker was up")
    assert took < RECOVERED_WITHIN
    assert "restored 1 interrupted transition(s)" in second.log()
    assert result["outcome"] == "changed" and result["state_after"] == "suspended", result
    assert real_state(guest.domain) == "suspended"
    changed = [e for e in journal(redis_clean, guest.uuid)
               if e["request_id"] == rid and e["outcome"] == "changed"]
    assert len(changed) == 1
    assert record(redis_clean, rid)["status"] == "done"
    wait_until(lambda: not redis_clean.client(0).hlen("unacked"), timeout=10,
               message="the restored message acknowledged: nothing left for the timeout sweep")

    # A second live worker for the same host says why it restores nothing.
    third = start_worker(pool="threads", concurrency=1)
    wait_until(lambda: "is also served by live worker(s)" in third.log(), timeout=30,
               message="the second live worker of a host says so")
    assert second.nodename in third.log()


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-aof-"), persist=True)
    server.start()
    yield server
    server.stop()


def test_a_retry_that_cannot_be_published_runs_once_redis_is_back(
        persistent_redis, start_worker, host_name, guests):
    redis_urls = {"DORMANT_BROKER_URL": persistent_redis.url(0),
                  "DORMANT_RESULT_BACKEND": persistent_redis.url(1),
                  "DORMANT_STATE_URL": persistent_redis.url(2)}
    worker = start_worker(pool="threads", concurrency=2, env=redis_urls, wait=False)
    wait_for_worker(worker, persistent_redis)
    app = persistent_redis.celery_client()
    guest = guests.create("idle")
    rid = f"outage-{uuid.uuid4().hex[:8]}"
    sent = app.send_task("dormant.suspend", args=[guest.uuid], kwargs={"request_id": rid},
                         queue=f"dormant.{host_name}")
    wait_until(lambda: saving(guest.domain), timeout=30, interval=0.01,
               message="managedSave in progress")
    persistent_redis.kill()  # kill -9: the save finishes, recording it fails, so does the retry
    try:
        wait_until(lambda: "could not publish its retry" in worker.log(), timeout=60,
                   message="the retry's publish fails while Redis is down")
        assert real_state(guest.domain) == "suspended"
    finally:
        persistent_redis.start()
    back = time.monotonic()
    result = sent.get(timeout=60)
    took = time.monotonic() - back
    print(f"retried transition finished {took:.1f}s after Redis was back")
    assert took < 30, took  # not the visibility timeout (3600 s)
    assert "reject requeue=False" not in worker.log()
    assert result["outcome"] == "changed" and result["state_after"] == "suspended", result
    assert real_state(guest.domain) == "suspended"
    app.close()


def test_a_message_nobody_holds_is_restored_by_the_hosts_worker(
        start_worker, client_app, host_name, guests, redis_clean):
    """The orphan sweep: an unacknowledged message of this host's queue that the running worker
    does not hold (left behind as when a task's result and acknowledgement both met a broker
    outage) runs within a few sweeps instead of after the visibility timeout (an hour)."""
    worker = start_worker(pool="threads", concurrency=2,
                          env={"DORMANT_ORPHAN_SWEEP_INTERVAL": "1"})
    guest = guests.create("idle")
    broker = redis_clean.client(0)
    parked = f"parked-{uuid.uuid4().hex[:8]}"  # a queue nobody consumes: the message waits
    sent = client_app.send_task("dormant.pause", args=[guest.uuid], queue=parked)
    raw = wait_until(lambda: broker.rpop(parked), timeout=10, message="the parked message")
    payload = json.loads(raw)
    tag = payload["properties"]["delivery_tag"]
    queue = f"dormant.{host_name}"
    # As kombu leaves a delivered message: in `unacked` with its exchange and routing key.
    broker.hset("unacked", tag, json.dumps([payload, queue, queue]))
    broker.zadd("unacked_index", {tag: time.time() - 60})

    result = sent.get(timeout=30)
    assert result["outcome"] == "changed" and result["state_after"] == "paused", result
    assert real_state(guest.domain) == "paused(user)"
    assert f"restored 1 message(s) nobody held (orphaned): {sent.id}" in worker.log()
    wait_until(lambda: not broker.hexists("unacked", tag), timeout=10,
               message="the restored message acknowledged")
