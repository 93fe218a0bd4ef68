"""Each transition really changes a KVM guest; repeating it answers ``already`` without a
libvirt call; bad requests fail at once with a typed error and are journaled, not retried.

The guest's state is always read with libvirt by the test itself, never through dormant.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from tests.support.journal import base_state, journal, real_state, record

pytestmark = [pytest.mark.integration, pytest.mark.both_brokers]

# (task, kwargs, the real state it leads to)
SEQUENCE = [
    ("dormant.pause", {}, "paused(user)"),
    ("dormant.unpause", {}, "running"),
    ("dormant.suspend", {}, "suspended"),
    ("dormant.resume", {}, "running"),
    ("dormant.ensure", {"target": "suspended"}, "suspended"),
    ("dormant.ensure", {"target": "paused"}, "paused(user)"),
    ("dormant.ensure", {"target": "running"}, "running"),
]


def _save_image(name: str) -> str:
    return f"/var/lib/libvirt/qemu/save/{name}.save"


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_each_transition_changes_the_guest_and_a_repeat_answers_already(
        pool, start_worker, client_app, host_name, guests, redis_clean):
    start_worker(pool=pool, concurrency=2)
    guest = guests.create("idle")
    queue = f"dormant.{host_name}"

    for n, (task, kwargs, expected) in enumerate(SEQUENCE):
        first = client_app.send_task(task, args=[guest.uuid], kwargs=dict(kwargs),
                                     queue=queue).get(timeout=60)
        assert base_state(real_state(guest.domain)) == base_state(expected), (task, kwargs)
        assert first["outcome"] == "changed" and first["steps"], first
        assert first["instance"] == guest.uuid and first["name"] == guest.name
        assert first["host"] == host_name and first["attempts"] == 1
        # Plain states, libvirt's reason apart (a user pause reads paused + user).
        assert first["state_after"] == base_state(expected)
        assert first["reason_after"] == ("user" if expected == "paused(user)" else "")
        image_mtime = (os.stat(_save_image(guest.name)).st_mtime_ns
                       if expected == "suspended" else None)
        libvirt_reason = guest.domain.state()

        # The same request again, by name this time: nothing to do, no libvirt call made.
        again = client_app.send_task(task, args=[guest.name], kwargs=dict(kwargs),
                                     queue=queue).get(timeout=60)
        assert again["outcome"] == "already", again
        assert again["steps"] == [] and again["state_before"] == base_state(expected)
        assert guest.domain.state() == libvirt_reason  # e.g. running/restored stays so
        if image_mtime is not None:  # a second managedSave would have rewritten the image
            assert os.stat(_save_image(guest.name)).st_mtime_ns == image_mtime

        entries = journal(redis_clean, guest.uuid)
        assert [e["outcome"] for e in entries[-2:]] == ["changed", "already"]
        assert len(entries) == 2 * (n + 1)
        assert entries[-1]["steps"] == [] and entries[-1]["task_id"] == again["task_id"]
        assert entries[-2]["request_id"] == first["request_id"] == first["task_id"]


def _fails_fast(client_app, queue, task, args, kwargs=None):
    """Send, wait for the failure; return (exception, seconds from send to failure, result)."""
    sent = time.monotonic()
    result = client_app.send_task(task, args=args, kwargs=kwargs or {}, queue=queue)
    with pytest.raises(Exception) as caught:
        result.get(timeout=10)
    assert not isinstance(caught.value, CeleryTimeout)
    return caught.value, time.monotonic() - sent, result


def test_bad_requests_fail_at_once_with_a_typed_error_and_are_journaled(
        start_worker, client_app, host_name, guests, redis_clean):
    start_worker(pool="threads", concurrency=2)
    guest = guests.create("idle")
    queue = f"dormant.{host_name}"
    ghost = str(uuid.uuid4())
    # Warm up (state store and libvirt connections open lazily): time the failures, not that.
    client_app.send_task("dormant.status", args=[guest.uuid], queue=queue).get(timeout=30)

    cases = [
        # (args, kwargs, error class, words the message must contain, journal key)
        # An unknown instance is journaled in the fleet journal only (no key of its own).
        ([ghost], {}, "UnknownInstance", ["unknown instance", ghost], None),
        (["no-such-guest-here"], {}, "UnknownInstance",
         ["unknown instance", "no-such-guest-here"], None),
        (["../etc/passwd"], {}, "InvalidInput", ["malformed instance", "../etc/passwd"], None),
        (["4dea22b3-1d52-d8f3-2516-782e98ab3fa"], {}, "InvalidInput",
         ["malformed instance"], None),
        ([guest.uuid], {"request_id": "x" * 500}, "InvalidInput", ["malformed request_id"], None),
    ]
    for args, kwargs, kind, words, key in cases:
        rid = kwargs.get("request_id") or f"bad-{uuid.uuid4().hex[:8]}"
        exc, seconds, result = _fails_fast(client_app, queue, "dormant.pause", args,
                                           {"request_id": rid, **kwargs})
        assert type(exc).__name__ == kind, (args, exc)
        for word in words:
            assert word in str(exc), (word, str(exc))
        assert seconds < 1.0, (args, seconds)
        assert result.state == "FAILURE" and (result.retries or 0) == 0
        stream = journal(redis_clean, key)
        mine = [e for e in stream if e.get("task_id") == result.id]
        assert len(mine) == 1, mine
        assert mine[0]["attempts"] == 1 and mine[0]["error_type"] == kind
        assert mine[0]["outcome"] in {"failed", "rejected"}
    state = redis_clean.client(2)
    assert not state.exists(f"dormant:journal:{ghost}", "dormant:journal:no-such-guest-here")

    # Invalid transitions on a real guest, each set up with libvirt directly.
    setups = [
        ("dormant.resume", guest.domain.suspend, "paused(user)", "cannot resume"),
        ("dormant.unpause", lambda: guest.domain.managedSave(0), "suspended", "cannot unpause"),
        ("dormant.pause", lambda: guest.domain.managedSaveRemove(0), "shutoff",
         "start it with libvirt"),
    ]
    for task, setup, state, words in setups:  # type: ignore[assignment]
        setup()
        assert real_state(guest.domain) == state
        exc, seconds, result = _fails_fast(client_app, queue, task, [guest.uuid])
        assert type(exc).__name__ == "InvalidTransition", exc
        assert words in str(exc) and state in str(exc), str(exc)
        assert seconds < 1.0
        assert (result.retries or 0) == 0
        [entry] = [e for e in journal(redis_clean, guest.uuid) if e["task_id"] == result.id]
        assert entry["outcome"] == "failed" and entry["attempts"] == 1
        assert entry["error_class"] == "permanent"
        assert entry["state_before"] == base_state(state)
        assert record(redis_clean, result.id)["status"] == "failed"
        assert real_state(guest.domain) == state  # nothing was done


def test_a_guest_restored_paused_reads_as_paused_and_can_be_unpaused(
        start_worker, client_app, host_name, guests):
    """libvirt leaves a START_PAUSED restore "paused (migration)" with no job running: that
    is a settled pause, not a job in progress (it used to read as busy forever)."""
    import libvirt

    from worker.core.states import State
    from worker.hypervisor import connected

    start_worker(pool="threads", concurrency=2)
    guest = guests.create("idle")
    guest.domain.managedSave(0)
    guest.domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    assert guest.domain.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION]
    queue = f"dormant.{host_name}"

    status = client_app.send_task("dormant.status", args=[guest.uuid], queue=queue).get(timeout=30)
    assert status["state"] == "paused"
    with connected("qemu:///system") as hv:
        [stat] = [s for s in hv.stats() if s.uuid == guest.uuid]
    assert stat.state is State.PAUSED
    done = client_app.send_task("dormant.unpause", args=[guest.uuid], queue=queue).get(timeout=30)
    assert done["outcome"] == "changed" and real_state(guest.domain) == "running"
