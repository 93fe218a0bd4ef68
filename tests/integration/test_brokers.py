"""What differs between the brokers (worker/fleet/broker.py), on real ones: a private
redis-server and a private rabbitmq-server node, real worker processes, real KVM guests.

RabbitMQ keeps every delivery until it is acknowledged and requeues it when the consumer's
channel closes, so a dead worker's transition comes back without any restore by dormant; a
retry's countdown waits in the broker (native delayed delivery) and the retry comes back to
the queue it came from; a node SIGKILLed mid-save loses nothing. Plain Celery callers,
``celery call`` and the ``dormant`` CLI need nothing but the amqp:// URL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import wait_for_worker
from tests.integration.test_cli import dormant
from tests.support import services
from tests.support.journal import journal, real_state, record, saving
from tests.support.services import ROOT, free_port, wait_until
from worker.store import keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERED_WITHIN = 90  # seconds after the new worker answers pings


def _changed_once(redis_clean, guest, rid: str) -> None:
    changed = [e for e in journal(redis_clean, guest.uuid)
               if e["request_id"] == rid and e["outcome"] == "changed"]
    assert len(changed) == 1, journal(redis_clean, guest.uuid)
    assert record(redis_clean, rid)["status"] == "done"


@pytest.mark.parametrize("broker_kind", ["rabbitmq"], indirect=True)
def test_a_worker_killed_mid_save_comes_back_from_the_broker_itself(
        broker_kind, start_worker, client_app, host_name, guests, redis_clean, rabbit_clean):
    first = start_worker(pool="threads", concurrency=4)  # no DORMANT_* setting changed
    guest = guests.create("idle")
    rid = f"recover-{uuid.uuid4().hex[:8]}"
    queue = f"dormant.{host_name}"
    sent = client_app.send_task("dormant.suspend", args=[guest.uuid],
                                kwargs={"request_id": rid}, queue=queue)
    wait_until(lambda: saving(guest.domain), timeout=30, interval=0.01,
               message="managedSave in progress")
    first.kill()  # SIGKILL: its channel closes, the quorum queue requeues the delivery
    wait_until(lambda: rabbit_clean.depth(queue)[0] == 1, timeout=10,
               message="the dead worker's delivery back in the queue, ready")

    second = start_worker(pool="threads", concurrency=4)
    up = time.monotonic()
    result = sent.get(timeout=RECOVERED_WITHIN)
    print(f"recovered {time.monotonic() - up:.1f}s after the new worker was up")
    assert "requeues a dead worker's unacknowledged messages itself" in second.log()
    assert "start-up recovery skipped" not in second.log()  # the 'qos' error
    assert "restored" not in second.log()
    assert result["outcome"] == "changed" and result["state_after"] == "suspended", result
    assert real_state(guest.domain) == "suspended"
    _changed_once(redis_clean, guest, rid)
    listed = wait_until(lambda: (q := rabbit_clean.queues().get(queue)) and
                        q["unacked"] == "0" and q, timeout=30, interval=1,
                        message="nothing left unacknowledged")
    assert listed == {"type": "quorum", "ready": "0", "unacked": "0"}


def _delayed_messages(rabbit) -> int:
    """Messages waiting in native delayed delivery's first levels (up to 15 s)."""
    return sum(rabbit.depth(f"celery_delayed_{level}")[0] for level in range(4))


@pytest.mark.parametrize("broker_kind", ["rabbitmq"], indirect=True)
def test_a_retry_waits_in_the_broker_and_comes_back_to_its_host_queue(
        broker_kind, start_worker, client_app, host_name, guests, redis_clean, rabbit_clean):
    """Only the host queue is consumed: a retry routed anywhere else would never run (Celery
    5.7 alone sends it by the default queue's routing key, to dormant.control)."""
    queue = f"dormant.{host_name}"
    worker = start_worker(pool="threads", concurrency=2, args=["-Q", queue],
                          env={"DORMANT_LOCK_WAIT": "0.5", "DORMANT_RETRY_BACKOFF": "8",
                               "DORMANT_RETRY_BACKOFF_MAX": "8"})
    guest = guests.create("idle")
    redis_clean.client(2).set(keys.lock(guest.uuid), "another-holder", px=4000)
    sent = client_app.send_task("dormant.pause", args=[guest.uuid], queue=queue)
    wait_until(lambda: _delayed_messages(rabbit_clean) >= 1, timeout=20, interval=0.05,
               message="the retry waiting in a celery_delayed_* quorum queue")
    result = sent.get(timeout=60)
    assert result["outcome"] == "changed" and result["attempts"] >= 2, result
    assert real_state(guest.domain) == "paused(user)"
    assert "Direct exchanges are not supported" not in worker.log()
    retrying = [e for e in journal(redis_clean, guest.uuid) if e["outcome"] == "retrying"]
    assert retrying and retrying[0]["error_type"] == "InstanceBusy"


@pytest.mark.parametrize("broker_kind", ["rabbitmq"], indirect=True)
def test_a_node_killed_mid_save_loses_nothing_and_runs_it_once(
        broker_kind, start_worker, client_app, host_name, guests, redis_clean, rabbit_clean):
    start_worker(pool="threads", concurrency=4)
    guest = guests.create("idle")
    rid = f"node-kill-{uuid.uuid4().hex[:8]}"
    sent = client_app.send_task("dormant.suspend", args=[guest.uuid],
                                kwargs={"request_id": rid}, queue=f"dormant.{host_name}")
    wait_until(lambda: saving(guest.domain), timeout=30, interval=0.01,
               message="managedSave in progress")
    rabbit_clean.kill()  # kill -9 of the node: every channel goes with it
    time.sleep(2)  # the outage
    rabbit_clean.start()
    result = sent.get(timeout=120)
    # The save finished while the node was down; its acknowledgement went with the channel,
    # so the broker delivers the message again, and the record answers it.
    assert result["outcome"] in {"changed", "duplicate"}, result
    assert real_state(guest.domain) == "suspended"
    _changed_once(redis_clean, guest, rid)


@pytest.mark.parametrize("broker_kind", ["rabbitmq"], indirect=True)
def test_celery_call_and_the_dormant_cli_need_only_the_amqp_url(
        broker_kind, start_worker, dormant_env, host_name, guests, rabbit_clean):
    guest = guests.create("idle")
    start_worker(pool="threads", concurrency=2)
    queue = f"dormant.{host_name}"
    celery = [sys.executable, "-m", "celery", "-A", "tasks"]
    called = subprocess.run([*celery, "call", "dormant.pause", f"--args={json.dumps([guest.uuid])}",
                             "--kwargs", '{"request_id": "celery-call-1"}', "--queue", queue],
                            cwd=ROOT, env=dormant_env, capture_output=True, text=True,
                            timeout=60, check=True)
    task_id = called.stdout.strip()
    shown = subprocess.run([*celery, "result", task_id], cwd=ROOT, env=dormant_env,
                           capture_output=True, text=True, timeout=60, check=True)
    assert "'outcome': 'changed'" in shown.stdout, shown.stdout
    assert real_state(guest.domain) == "paused(user)"

    done = dormant(dormant_env, "unpause", guest.name, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "changed"
    assert real_state(guest.domain) == "running"


@pytest.mark.both_brokers
def test_dormant_queues_counts_what_waits_on_either_broker(
        broker_kind, start_worker, client_app, dormant_env, host_name, guests, redis_clean):
    worker = start_worker(pool="threads", concurrency=1)
    guest = guests.create("idle")
    queue = f"dormant.{host_name}"

    def depth() -> dict[str, object]:
        proc = dormant(dormant_env, "queues", "--host", host_name, "--json")
        assert proc.returncode == 0, proc.stderr
        rows = {r["queue"]: r for r in json.loads(proc.stdout)}
        # RabbitMQ also holds the countdowns (retries waiting for their backoff).
        assert ("celery_delayed_* (countdowns)" in rows) == (broker_kind == "rabbitmq")
        return rows[queue]  # type: ignore[no-any-return]

    assert client_app.send_task("dormant.status", args=[guest.uuid], queue=queue).get(
        timeout=30)["state"] == "running"  # the queue exists and is consumed
    worker.stop()
    for _ in range(2):
        client_app.send_task("dormant.pause", args=[guest.uuid], queue=queue)
    row = wait_until(lambda: (r := depth())["ready"] == 2 and r, timeout=20, interval=0.5,
                     message="two messages ready")
    assert row["queue"] == queue and row["empty"] is False
    assert row["unacked"] == (0 if broker_kind == "redis" else None)
    again = start_worker(pool="threads", concurrency=1)
    wait_for_worker(again, redis_clean, broker=dormant_env["DORMANT_BROKER_URL"])
    wait_until(lambda: depth()["empty"], timeout=60, interval=0.5, message="queue drained")
    assert real_state(guest.domain) == "paused(user)"


def test_the_cli_says_a_rabbitmq_broker_is_down_quickly(redis_clean, host_name):
    """Nothing listens on the amqp:// URL: exit 3 (unavailable) within seconds, as on Redis."""
    env = services.test_env(redis_clean, host_name,
                            DORMANT_BROKER_URL=f"amqp://dormant:x@127.0.0.1:{free_port()}/dormant")
    started = time.monotonic()
    proc = dormant(env, "pause", "vm1", "--wait")
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("error: BrokerUnavailable: "), proc.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s to notice the broker is down"
