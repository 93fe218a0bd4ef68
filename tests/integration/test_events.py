"""Changes made behind dormant's back reach the journal as ``outcome: external``.

Real parts: a private redis-server, ``celery -A tasks worker`` processes, real libvirtd and
tiny KVM guests changed with ``virsh`` (never through dormant) while the worker watches.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import libvirt
import pytest

from tests.integration.test_cli import COMMAND
from tests.support.guests import remove_domain
from tests.support.journal import (
    STATE_DB,
    URI,
    journal,
    libvirtd_stopped,
    real_state,
    revive,
)
from tests.support.services import ROOT, wait_until
from worker.store import keys
from worker.transition import fencing

pytestmark = [pytest.mark.integration]

NOTICE = 2.0  # seconds within which a change made behind dormant's back is journaled
CONNECTED = "event stream connected"


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-c", URI, *args], check=True, capture_output=True, timeout=60)


def externals(redis_server, uuid: str) -> list[dict[str, Any]]:
    return [e for e in journal(redis_server, uuid, external=True) if e["outcome"] == "external"]


def watching(worker, times: int = 1) -> None:
    """Wait until the worker's event stream has (re)connected ``times`` times."""
    wait_until(lambda: worker.log().count(CONNECTED) >= times, timeout=30, interval=0.1,
               message=f"event stream connected x{times}")


def next_external(redis_server, uuid: str, seen: int, *, timeout: float = NOTICE) -> dict:
    """The first external entry after the ``seen`` ones, journaled within ``timeout``."""
    entries = wait_until(lambda: externals(redis_server, uuid)[seen:], timeout=timeout,
                         interval=0.02, message=f"external entry #{seen + 1} of {uuid}")
    return entries[0]


def history(env: dict[str, str], instance: str) -> list[dict[str, Any]]:
    done = subprocess.run([*COMMAND, "history", instance, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


@pytest.mark.slow
def test_virsh_behind_dormants_back_is_journaled_as_external_within_two_seconds(
        start_worker, guests, redis_clean, dormant_env):
    worker = start_worker(pool="prefork", concurrency=1)
    watching(worker)
    guest = guests.create("idle")
    # Its definition and boot are outside changes too; wait until they are through.
    wait_until(lambda: any(e["state_after"] == "running"
                           for e in externals(redis_clean, guest.uuid)),
               timeout=10, message="the guest's boot journaled")

    steps = [
        (("suspend", guest.name), "paused", "suspended", "paused"),
        (("resume", guest.name), "running", "resumed", "unpaused"),
        (("managedsave", guest.name), "suspended", "stopped", "saved"),
        (("start", guest.name), "running", "started", "restored"),
        (("destroy", guest.name), "shutoff", "stopped", "destroyed"),
        (("undefine", guest.name), "missing", "undefined", "removed"),
    ]
    for command, state, event, detail in steps:
        seen = len(externals(redis_clean, guest.uuid))
        before = externals(redis_clean, guest.uuid)[-1]["state_after"]
        virsh(*command)
        entry = next_external(redis_clean, guest.uuid, seen)
        assert (entry["state_after"], entry["event"], entry["detail"]) == (state, event,
                                                                           detail), entry
        assert entry["state_before"] == before and entry["source"] == "event"
        assert entry["instance"] == guest.uuid and entry["name"] == guest.name
        if state == "paused":
            assert entry["reason_after"] == "user"

    # `dormant history --json` shows them; the undefined guest left the registry at once.
    shown = [e for e in history(dormant_env, guest.uuid) if e["outcome"] == "external"]
    assert [e["state_after"] for e in shown][-6:] == [s[1] for s in steps]
    state = redis_clean.client(STATE_DB)
    assert state.get(keys.where(guest.uuid)) is None
    assert state.get(keys.name(guest.name)) is None


@pytest.mark.slow
def test_a_guest_changed_while_no_worker_ran_is_reconciled_at_the_next_start(
        start_worker, client_app, host_name, guests, libvirt_conn, redis_clean):
    worker = start_worker(pool="threads", concurrency=2)
    watching(worker)
    resumed, gone = guests.create("idle"), guests.create("idle")
    queue = f"dormant.{host_name}"
    client_app.send_task("dormant.pause", args=[resumed.uuid], queue=queue).get(timeout=30)
    client_app.send_task("dormant.suspend", args=[gone.uuid], queue=queue).get(timeout=60)
    wait_until(lambda: "reconciliation" in worker.log(), timeout=10, message="first reconcile")
    worker.stop()

    virsh("resume", resumed.name)
    remove_domain(libvirt_conn, gone.name)  # undefined with its saved image
    seen = {g.uuid: len(externals(redis_clean, g.uuid)) for g in (resumed, gone)}

    start_worker(pool="threads", concurrency=2)
    back = next_external(redis_clean, resumed.uuid, seen[resumed.uuid], timeout=30)
    assert (back["state_before"], back["state_after"]) == ("paused", "running"), back
    assert back["note"] == "noticed by reconciliation" and back["source"] == "reconciliation"
    missing = next_external(redis_clean, gone.uuid, seen[gone.uuid], timeout=30)
    assert (missing["state_before"], missing["state_after"]) == ("suspended", "missing")
    assert real_state(resumed.domain) == "running"


@pytest.mark.slow
def test_a_manual_unpause_clears_the_deadline_and_the_auto_unpause_never_fires(
        start_worker, client_app, host_name, guests, redis_clean):
    worker = start_worker(pool="threads", concurrency=2,
                          env={"DORMANT_DEADLINE_CHECK_INTERVAL": "1"})
    watching(worker)
    guest, control = guests.create("idle"), guests.create("idle")
    state = redis_clean.client(STATE_DB)
    queue = f"dormant.{host_name}"
    paused = client_app.send_task("dormant.pause", args=[guest.uuid],
                                  kwargs={"max_seconds": 3}, queue=queue).get(timeout=30)
    assert state.zscore(keys.DEADLINES, guest.uuid) == pytest.approx(paused["unpause_at"])
    seen = len(externals(redis_clean, guest.uuid))
    virsh("resume", guest.name)
    entry = next_external(redis_clean, guest.uuid, seen)
    assert (entry["state_before"], entry["state_after"]) == ("paused", "running")
    assert state.zscore(keys.DEADLINES, guest.uuid) is None
    assert not state.exists(keys.deadline(guest.uuid))

    virsh("suspend", guest.name)  # paused again by hand: the old deadline must not undo it
    next_external(redis_clean, guest.uuid, seen + 1)
    # A control guest whose deadline falls after the first one's: once it is unpaused, the
    # deadline checks have run past the first guest's deadline.
    after = max(1.0, paused["unpause_at"] - time.time() + 1.0)
    later = client_app.send_task("dormant.pause", args=[control.uuid],
                                 kwargs={"max_seconds": after}, queue=queue).get(timeout=30)
    assert later["unpause_at"] > paused["unpause_at"]
    wait_until(lambda: real_state(control.domain) == "running", timeout=30,
               message="the control guest unpaused by its deadline")
    assert real_state(guest.domain) == "paused(user)"
    assert f"auto-unpause of {guest.uuid}" not in worker.log()
    assert [e["action"] for e in journal(redis_clean, guest.uuid)] == ["pause"]


@pytest.mark.slow
def test_fifty_dormant_transitions_leave_no_external_entry(
        start_worker, client_app, host_name, guests, redis_clean):
    worker = start_worker(pool="threads", concurrency=2)
    watching(worker)
    guest = guests.create("idle")
    wait_until(lambda: any(e["state_after"] == "running"
                           for e in externals(redis_clean, guest.uuid)),
               timeout=10, message="the guest's boot journaled")
    seen = len(externals(redis_clean, guest.uuid))
    queue = f"dormant.{host_name}"
    actions = ["suspend", "resume"] * 4 + ["pause", "unpause"] * 21  # 50
    for action in actions:
        result = client_app.send_task(f"dormant.{action}", args=[guest.uuid],
                                      queue=queue).get(timeout=60)
        assert result["outcome"] == "changed", result
    # Events are handled in order: once a change made by hand is journaled, every event of
    # the 50 transitions before it has been handled too.
    virsh("suspend", guest.name)
    sentinel = next_external(redis_clean, guest.uuid, seen, timeout=10)
    assert (sentinel["event"], sentinel["state_before"]) == ("suspended", "running")
    assert externals(redis_clean, guest.uuid)[seen:] == [sentinel]
    changed = [e for e in journal(redis_clean, guest.uuid) if e["outcome"] == "changed"]
    assert len(changed) == 50  # (a retried attempt adds a "retrying" entry, no external one)
    # Each of the 50 also wrote its fence into the guest's metadata (worker/transition/
    # fencing.py): libvirt announces that with a metadata-change event, not a lifecycle one,
    # so none of it reached the drift journal either.
    xml = guest.domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, fencing.NAMESPACE, 0)
    assert fencing.parse(xml).value == changed[-1]["fence"]


@pytest.mark.slow
def test_events_resume_after_a_libvirtd_restart(
        start_worker, guests, libvirt_conn, redis_clean):
    """Run under ``flock /tmp/dormant-libvirtd.lock``: it restarts the shared libvirtd."""
    worker = start_worker(pool="threads", concurrency=2)
    watching(worker)
    guest = guests.create("idle")
    seen = len(externals(redis_clean, guest.uuid))
    virsh("suspend", guest.name)
    next_external(redis_clean, guest.uuid, seen)
    connects = worker.log().count(CONNECTED)
    try:
        with libvirtd_stopped():
            pass
    finally:
        revive(libvirt_conn)
    watching(worker, connects + 1)
    seen = len(externals(redis_clean, guest.uuid))
    virsh("resume", guest.name)
    entry = next_external(redis_clean, guest.uuid, seen)
    assert (entry["state_before"], entry["state_after"]) == ("paused", "running"), entry
