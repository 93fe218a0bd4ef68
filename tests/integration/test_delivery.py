"""At-least-once delivery made safe, and the wire contract.

* a worker SIGKILLed in the middle of a managedSave: redelivery finishes the job exactly once;
* a pickle message is refused; a plain Celery client (no dormant import) gets JSON results.
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest
from celery import Celery

from tests.support.journal import journal, real_state, record, saving
from tests.support.services import wait_until

pytestmark = pytest.mark.integration

# Short lock TTL so a dead holder's lock lapses quickly; short backoff for HypervisorBusy
# (the redelivered task may find the save still running).
KILL_ENV = {
    "DORMANT_LOCK_TTL": "2",
    "DORMANT_VISIBILITY_TIMEOUT": "4",
    "DORMANT_RETRY_BACKOFF": "1",
    "DORMANT_RETRY_BACKOFF_MAX": "1",
    "DORMANT_MAX_RETRIES": "20",
}


def _check_suspended_once(redis_clean, guest, rid, result):
    assert real_state(guest.domain) == "suspended"
    assert result["outcome"] == "changed" and result["state_before"] == "running", result
    assert result["state_after"] == "suspended" and result["request_id"] == rid
    assert result["steps"] == []  # the redelivered attempt found the save done: no second one
    entries = [e for e in journal(redis_clean, guest.uuid) if e["request_id"] == rid]
    changed = [e for e in entries if e["outcome"] == "changed"]
    assert len(changed) == 1, entries
    assert all(e["outcome"] in {"changed", "retrying"} for e in entries), entries
    assert record(redis_clean, rid)["status"] == "done"
    assert not redis_clean.client(2).keys("dormant:lock:*")  # nothing left locked


@pytest.mark.slow
def test_prefork_child_killed_during_managed_save_is_redelivered_and_suspends_once(
        start_worker, client_app, host_name, guests, redis_clean):
    worker = start_worker(pool="prefork", concurrency=1, env=KILL_ENV)
    guest = guests.create("idle")
    rid = f"kill-{uuid.uuid4().hex[:8]}"
    [child] = worker.children()

    sent = client_app.send_task("dormant.suspend", args=[guest.uuid],
                                kwargs={"request_id": rid}, queue=f"dormant.{host_name}")
    wait_until(lambda: saving(guest.domain), timeout=30, interval=0.01,
               message="managedSave in progress")
    os.kill(child, signal.SIGKILL)

    result = sent.get(timeout=90)
    assert child not in worker.children()  # it really died; a new child finished the job
    assert "WorkerLostError" in worker.log() or "exited with 'signal 9" in worker.log()
    _check_suspended_once(redis_clean, guest, rid, result)


@pytest.mark.slow
def test_threads_worker_killed_during_managed_save_is_redelivered_to_another_worker(
        start_worker, client_app, host_name, guests, redis_clean):
    first = start_worker(pool="threads", concurrency=4, env=KILL_ENV)
    guest = guests.create("idle")
    rid = f"kill-{uuid.uuid4().hex[:8]}"

    sent = client_app.send_task("dormant.suspend", args=[guest.uuid],
                                kwargs={"request_id": rid}, queue=f"dormant.{host_name}")
    wait_until(lambda: saving(guest.domain), timeout=30, interval=0.01,
               message="managedSave in progress")
    first.kill()  # the whole worker: nobody is left to reject or ack the message

    second = start_worker(pool="threads", concurrency=4, env=KILL_ENV)
    result = sent.get(timeout=90)  # the broker redelivers after the visibility timeout
    assert f"dormant.suspend[{sent.id}]" in second.log()
    _check_suspended_once(redis_clean, guest, rid, result)


def test_pickle_message_is_refused_and_changes_nothing(
        start_worker, client_app, host_name, guests, redis_clean):
    worker = start_worker(pool="threads", concurrency=2)
    guest = guests.create("idle")
    evil = Celery("evil", broker=redis_clean.url(0), backend=redis_clean.url(1))
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"],
                     broker_connection_retry_on_startup=True)
    try:
        sent = evil.send_task("dormant.pause", args=[guest.uuid], queue=f"dormant.{host_name}",
                              serializer="pickle")
        assert sent.id
        wait_until(lambda: "application/x-python-serialize" in worker.log(), timeout=20,
                   message="worker refuses the pickle message")
    finally:
        evil.close()
    assert "Refusing to deserialize untrusted content of type pickle" in worker.log()
    assert f"dormant.pause[{sent.id}] received" not in worker.log()
    assert real_state(guest.domain) == "running"
    assert journal(redis_clean, guest.uuid) == [] and journal(redis_clean) == []
    # The worker is still healthy and the queue is empty of the refused message.
    ok = client_app.send_task("dormant.pause", args=[guest.uuid],
                              queue=f"dormant.{host_name}").get(timeout=30)
    assert ok["outcome"] == "changed" and real_state(guest.domain) == "paused(user)"


def test_plain_celery_client_suspends_by_task_name_and_reads_json(
        start_worker, client_app, host_name, guests):
    start_worker(pool="threads", concurrency=2)
    guest = guests.create("idle")
    # client_app is configured with nothing but broker, backend and JSON; no dormant import.
    assert client_app.main == "client" and "dormant.suspend" not in client_app.tasks
    result = client_app.send_task("dormant.suspend", args=[guest.name],
                                  kwargs={"request_id": "nightly-42"},
                                  queue=f"dormant.{host_name}").get(timeout=60)
    assert isinstance(result, dict)
    assert result["instance"] == guest.uuid and result["name"] == guest.name
    assert result["outcome"] == "changed" and result["action"] == "suspend"
    assert result["request_id"] == "nightly-42" and result["host"] == host_name
    assert result["state_before"] == "running" and result["state_after"] == "suspended"
    for field in ("attempts", "task_id", "steps", "duration_ms", "target"):
        assert field in result
    assert real_state(guest.domain) == "suspended"
