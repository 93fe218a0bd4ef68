"""Pause with a deadline: the guest is unpaused automatically after ``max_seconds``, even when
the worker that paused it died — a durable record checked by every control worker's timer,
not a countdown and not a beat task."""

from __future__ import annotations

import time

import pytest

from tests.support.journal import STATE_DB, journal, real_state
from tests.support.services import wait_until
from worker.store import keys

pytestmark = pytest.mark.integration

FAST_CHECKS = {"DORMANT_DEADLINE_CHECK_INTERVAL": "1"}


@pytest.mark.slow
def test_paused_guest_is_unpaused_after_its_deadline_although_its_worker_died(
        start_worker, client_app, host_name, guests, redis_clean):
    pausing = start_worker(pool="threads", concurrency=2, env=FAST_CHECKS)
    guest = guests.create("idle")
    state = redis_clean.client(STATE_DB)

    paused = client_app.send_task("dormant.pause", args=[guest.uuid],
                                  kwargs={"request_id": "backup-1", "max_seconds": 3},
                                  queue=f"dormant.{host_name}").get(timeout=30)
    assert paused["outcome"] == "changed" and real_state(guest.domain) == "paused(user)"
    deadline = paused["unpause_at"]
    assert deadline == pytest.approx(paused["finished_at"] + 3, abs=0.01)
    assert state.zscore(keys.DEADLINES, guest.uuid) == pytest.approx(deadline)
    pausing.kill()  # SIGKILL: nothing in any process remembers the deadline but Redis

    # No beat runs: the next worker's own timer finds the due deadline.
    taker = start_worker(pool="threads", concurrency=2, env=FAST_CHECKS)
    wait_until(lambda: real_state(guest.domain) == "running", timeout=30,
               message="guest unpaused by its deadline")
    assert f"auto-unpause of {guest.uuid} sent" in taker.log()
    assert "expire_pauses" not in taker.log()  # no task per tick

    [unpause] = [e for e in journal(redis_clean, guest.uuid) if e["action"] == "unpause"]
    assert unpause["outcome"] == "changed" and unpause["request_id"] == "deadline:backup-1"
    assert unpause["started_at"] >= deadline  # not a moment early
    assert state.zscore(keys.DEADLINES, guest.uuid) is None


def test_unpausing_by_hand_clears_the_deadline(
        start_worker, client_app, host_name, guests, redis_clean):
    start_worker(pool="threads", concurrency=2)
    guest = guests.create("idle")
    state = redis_clean.client(STATE_DB)
    queue = f"dormant.{host_name}"

    before = time.time()
    client_app.send_task("dormant.pause", args=[guest.uuid], kwargs={"max_seconds": 600},
                         queue=queue).get(timeout=30)
    assert state.zscore(keys.DEADLINES, guest.uuid) >= before + 600
    client_app.send_task("dormant.unpause", args=[guest.uuid], queue=queue).get(timeout=30)
    assert state.zscore(keys.DEADLINES, guest.uuid) is None
    # A later pause without a deadline is not unpaused by the old one.
    client_app.send_task("dormant.pause", args=[guest.uuid], queue=queue).get(timeout=30)
    assert state.zscore(keys.DEADLINES, guest.uuid) is None
    assert real_state(guest.domain) == "paused(user)"
