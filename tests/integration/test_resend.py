"""A message lost on its way costs a delay, not the request: dormant's senders send it again.

Real parts: the private redis-server as broker, results and state, ``celery -A tasks worker``
processes, tiny KVM guests. A message is "lost" the way a broker failover loses one, but
deterministically: it is deleted from its queue before any worker took it.
"""

from __future__ import annotations

import pytest

from tests.support.journal import journal, real_state
from tests.support.services import test_env, wait_until
from worker.api.client import Client
from worker.core import settings
from worker.store import keys

pytestmark = pytest.mark.integration


def test_the_client_sends_an_unanswered_request_again_with_the_same_request_id(
        start_worker, redis_clean, host_name, guests) -> None:  # type: ignore[no-untyped-def]
    guest = guests.create("idle")
    env = test_env(redis_clean, host_name, DORMANT_RESEND_AFTER="1")
    broker = redis_clean.client(0)
    with Client.from_settings(settings.load(env)) as client:
        sent = client.send("dormant.pause", args=[guest.uuid], kwargs={"request_id": "lost-1"},
                           queue=f"dormant.{host_name}")
        assert broker.llen(f"dormant.{host_name}") == 1
        broker.delete(f"dormant.{host_name}")  # what a failover does to a message
        start_worker(pool="threads", concurrency=2)
        answer = client.wait(sent, 60, what="pause")
    assert answer["outcome"] in {"changed", "duplicate"} and answer["request_id"] == "lost-1"
    assert answer["task_id"] != sent.id  # a copy answered
    assert real_state(guest.domain) == "paused(user)"
    assert [e["outcome"] for e in journal(redis_clean, guest.uuid)] == ["changed"]


def test_a_forwarded_transition_lost_on_its_way_is_sent_again_by_the_outbox(
        start_worker, redis_clean, host_name, guests, client_app) -> None:  # type: ignore[no-untyped-def]
    """The control worker forwards to the host serving the guest; that message is lost; the
    control worker's outbox sends it again (same task id, so the caller's wait is answered)."""
    guest = guests.create("idle")
    other = f"{host_name}-b"
    start_worker(pool="threads", concurrency=2, env={"DORMANT_RESEND_AFTER": "1",
                                                     "DORMANT_REGISTRY_INTERVAL": "3600"})
    state, broker = redis_clean.client(2), redis_clean.client(0)
    wait_until(lambda: state.get(keys.where(guest.uuid)) == host_name, timeout=30,
               message="the control worker published the guest")
    state.set(keys.where(guest.uuid), other, ex=600)  # another host serves it (not started)
    sent = client_app.send_task("dormant.pause", args=[guest.uuid],
                                kwargs={"request_id": "fwd-1"}, queue="dormant.control")
    wait_until(lambda: broker.llen(f"dormant.{other}") >= 1, timeout=30,
               message="forwarded to the other host's queue")
    broker.delete(f"dormant.{other}")
    assert state.hexists(keys.OUTBOX_ENTRIES, sent.id)
    start_worker(pool="threads", concurrency=2, host=other)
    answer = sent.get(timeout=60)
    assert answer["request_id"] == "fwd-1" and answer["host"] == other
    assert real_state(guest.domain) == "paused(user)"
    assert [e["outcome"] for e in journal(redis_clean, guest.uuid)] == ["changed"]
    wait_until(lambda: not state.hexists(keys.OUTBOX_ENTRIES, sent.id), timeout=30,
               message="the answered message left the outbox")
