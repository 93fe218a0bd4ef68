"""Recovery with default settings: an interrupted transition completes within seconds of its
host's worker being up again, not after the visibility timeout (an hour by default).

Real redis-server, real worker processes (SIGKILLed mid-managedSave), real KVM guests.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import wait_for_worker
from tests.support.journal import journal, real_state, record, saving
from tests.support.services import wait_until

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
    assert not redis_clean.client(0).hlen("unacked")  # nothing left for the timeout sweep

    # A second live worker for the same host says why it restores nothing.
    third = start_worker(pool="threads", concurrency=1)
    wait_until(lambda: "is also served by live worker(s)" in third.log(), timeout=30,
               message="the second live worker of a host says so")
    assert second.nodename in third.log()
