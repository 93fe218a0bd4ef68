"""worker/drift/watcher.py: the pure policy, and the Watcher over fakeredis + libvirt's test driver.

The Watcher is fed the pump's messages directly (``receive`` + ``flush``); the pump itself and
the real event loop are covered by tests/integration/test_events.py, plus one subprocess test
here of EventStream on the in-process test driver.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import libvirt
import pytest

from worker.core import metrics
from worker.core.errors import HypervisorBusy, UnknownInstance
from worker.core.states import Observed, State
from worker.drift.policy import (
    DETAILS,
    EVENTS,
    RECONCILED,
    UNCERTAIN,
    Known,
    already_recorded,
    attribute,
    describe,
    differs,
    last_known,
)
from worker.drift.watcher import Watcher
from worker.fleet import registry
from worker.store import keys
from worker.transition.context import Context, Request
from worker.transition.runner import run
from worker.transition.table import Action

# -- pure policy ----------------------------------------------------------------------------


def test_event_and_detail_names_follow_libvirts_constants() -> None:
    for code, event in enumerate(EVENTS):
        assert getattr(libvirt, f"VIR_DOMAIN_EVENT_{event.upper()}") == code
        for number, detail in enumerate(DETAILS[event]):
            constant = f"VIR_DOMAIN_EVENT_{event.upper()}_{detail.upper()}"
            if hasattr(libvirt, constant):  # a few details are newer than this binding
                assert getattr(libvirt, constant) == number, constant
    assert describe(3, 2) == ("suspended", "ioerror")
    assert describe(5, 4) == ("stopped", "saved")
    assert describe(1, 1) == ("undefined", "renamed")
    assert describe(42, 7) == ("event_42", "detail_7")  # newer than this table: spelled out


@pytest.mark.parametrize(("entries", "expected"), [
    ([], None),
    ([{"outcome": "changed", "state_after": "paused(user)"}], Known("paused", "user")),
    ([{"outcome": "external", "state_after": "paused", "reason_after": "ioerror"}],
     Known("paused", "ioerror")),
    ([{"outcome": "failed", "state_before": "running"},
      {"outcome": "already", "state_after": "running"}], Known("running")),
    ([{"outcome": "retrying", "finished_at": 995.0}], UNCERTAIN),
    ([{"outcome": "retrying", "finished_at": 1.0},
      {"outcome": "changed", "state_after": "suspended"}], Known("suspended")),
    ([{"outcome": "rejected"}], None),
])
def test_last_known_is_the_newest_settled_state(entries, expected) -> None:
    assert last_known(entries, now=1000.0) == expected


def test_differs_compares_plain_states_and_a_pause_reason() -> None:
    assert not differs(Known("running"), Observed(State.RUNNING))
    assert differs(Known("running"), Observed(State.PAUSED, "user"))
    assert differs(Known("paused", "user"), Observed(State.PAUSED, "ioerror"))
    assert not differs(Known("paused", ""), Observed(State.PAUSED, "user"))
    assert differs(None, Observed(State.SHUTOFF))


@pytest.mark.parametrize(("events", "state", "expected"), [
    ([("started", "restored"), ("resumed", "from_snapshot")], "running",
     ("started", "restored")),
    ([("resumed", "unpaused"), ("started", "booted")], "running", ("started", "booted")),
    ([("suspended", "paused"), ("stopped", "saved")], "suspended", ("stopped", "saved")),
    ([("suspended", "paused")], "suspended", None),  # the save's own event is on its way
    ([("suspended", "ioerror")], "paused", ("suspended", "ioerror")),
    ([("undefined", "removed")], "missing", ("undefined", "removed")),
])
def test_a_burst_is_attributed_to_the_event_that_explains_the_state(events, state,
                                                                     expected) -> None:
    assert attribute(events, state) == expected


@pytest.mark.parametrize(("known", "events", "expected"), [
    (Known("paused", "user"), [("suspended", "paused")], True),
    (Known("paused", "user"), [("suspended", "ioerror")], False),  # another reason: look
    (Known("running"), [("started", "restored"), ("resumed", "from_snapshot")], True),
    (Known("suspended"), [("suspended", "paused"), ("stopped", "saved")], True),
    (Known("running"), [("suspended", "paused")], False),
    (Known("running"), [("defined", "updated")], False),  # says nothing of the state: look
    (None, [("started", "booted")], False),
])
def test_an_event_that_leaves_the_recorded_state_needs_no_libvirt_read(
        known, events, expected) -> None:
    assert already_recorded(known, events) is expected


# -- the Watcher -----------------------------------------------------------------------------
@pytest.fixture
def ctx(hypervisor, store) -> Context:
    return Context(hypervisor=hypervisor, store=store, host="hv1", lock_wait=0.2,
                   verify_timeout=2.0)


@pytest.fixture
def watcher(ctx) -> Watcher:
    return Watcher(ctx, reconcile_interval=0, registry_interval=60, pump=[])


def event(domain, code: int, detail: int) -> dict:
    return {"type": "lifecycle", "uuid": domain.UUIDString(), "name": domain.name(),
            "event": code, "detail": detail, "at": time.time()}


def externals(store, uuid: str) -> list[dict]:
    return [e for e in store.journal(uuid) if e["outcome"] == "external"]


def deliver(watcher: Watcher, *messages: dict) -> None:
    for message in messages:
        watcher.receive(message)
    watcher.flush(everything=True)


def test_a_pause_behind_dormants_back_is_journaled_and_counted(watcher, ctx, make_domain):
    domain = make_domain()
    uuid = domain.UUIDString()
    counted = metrics.EXTERNAL_CHANGES.labels("hv1", "event", "suspended")._value.get()
    run(ctx, Request(action=Action.UNPAUSE, instance=uuid, request_id="r0"))  # already
    domain.suspend()
    deliver(watcher, event(domain, libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                           libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED))
    [entry] = externals(ctx.store, uuid)
    assert entry["state_before"] == "running" and entry["state_after"] == "paused"
    assert entry["reason_after"] == "user" and entry["note"] == "paused outside dormant"
    assert (entry["event"], entry["detail"], entry["source"]) == ("suspended", "paused", "event")
    assert metrics.EXTERNAL_CHANGES.labels("hv1", "event", "suspended")._value.get() == (
        counted + 1)
    # The same event again (or a late duplicate) finds the journal saying so: nothing new.
    deliver(watcher, event(domain, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0))
    assert len(externals(ctx.store, uuid)) == 1


def test_dormants_own_transitions_leave_no_external_entry(watcher, ctx, make_domain):
    domain = make_domain()
    uuid = domain.UUIDString()
    for n, action in enumerate([Action.PAUSE, Action.UNPAUSE, Action.SUSPEND, Action.RESUME]):
        run(ctx, Request(action=action, instance=uuid, request_id=f"own-{n}"))
        # Their events arrive after the lock was released: the journal already says so.
        deliver(watcher, event(domain, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0),
                event(domain, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0),
                event(domain, libvirt.VIR_DOMAIN_EVENT_STOPPED, 4),
                event(domain, libvirt.VIR_DOMAIN_EVENT_STARTED, 2))
    assert externals(ctx.store, uuid) == []


def test_an_event_while_a_transition_holds_the_lock_belongs_to_it(watcher, ctx, make_domain):
    domain = make_domain()
    uuid = domain.UUIDString()
    run(ctx, Request(action=Action.UNPAUSE, instance=uuid, request_id="r0"))
    held = ctx.store.acquire("holder", uuid, wait=1)
    domain.suspend()
    deliver(watcher, event(domain, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0))
    assert externals(ctx.store, uuid) == []
    ctx.store.finish(held, instance=uuid, request_id="holder", entry={"outcome": "failed"},
                     record=None)


def test_a_transition_between_reading_the_journal_and_writing_wins(ctx, store, make_domain):
    domain = make_domain()
    uuid = domain.UUIDString()
    run(ctx, Request(action=Action.UNPAUSE, instance=uuid, request_id="r0"))
    seen = store.watch_point(uuid)
    run(ctx, Request(action=Action.PAUSE, instance=uuid, request_id="r1"))  # meanwhile
    entry = {"outcome": "external", "state_after": "paused"}
    assert store.record_external(uuid, entry, seen, clear_deadline=False) == "moved"
    assert externals(store, uuid) == []


def test_an_external_resume_clears_the_auto_unpause_deadline(watcher, ctx, make_domain):
    domain = make_domain()
    uuid = domain.UUIDString()
    run(ctx, Request(action=Action.PAUSE, instance=uuid, request_id="p", max_seconds=600))
    assert ctx.store.redis.zscore(keys.DEADLINES, uuid) is not None
    domain.resume()
    deliver(watcher, event(domain, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0))
    [entry] = externals(ctx.store, uuid)
    assert (entry["state_before"], entry["state_after"]) == ("paused", "running")
    assert ctx.store.redis.zscore(keys.DEADLINES, uuid) is None
    assert not ctx.store.redis.exists(keys.deadline(uuid))


def test_undefine_and_rename_update_the_registry_and_the_handle_cache(
        watcher, ctx, make_domain, test_conn):
    domain = make_domain(start=False)
    uuid, old = domain.UUIDString(), domain.name()
    client = ctx.store.redis
    deliver(watcher, event(domain, libvirt.VIR_DOMAIN_EVENT_DEFINED, 0))
    assert client.get(keys.where(uuid)) == "hv1" and client.get(keys.name(old)) == uuid
    cached, _ = ctx.hypervisor.observe(uuid)
    assert cached is not None and cached.name == old

    domain.rename(f"{old}-new", 0)
    renamed = test_conn.lookupByUUIDString(uuid)
    deliver(watcher, {**event(renamed, 1, 1), "name": old},  # undefined/renamed: old name
            event(renamed, 0, 2))  # defined/renamed: new name
    assert client.get(keys.name(old)) is None and client.get(keys.name(f"{old}-new")) == uuid
    again, _ = ctx.hypervisor.observe(uuid)
    assert again is not None and again.name == f"{old}-new"  # not the stale cached handle

    renamed.undefine()
    deliver(watcher, event(renamed, 1, 0))
    assert client.get(keys.where(uuid)) is None and client.get(keys.name(f"{old}-new")) is None
    assert uuid not in registry.instances_of(client, "hv1")
    assert externals(ctx.store, uuid)[-1]["state_after"] == "missing"


def test_reconciliation_journals_drift_of_known_guests_only(watcher, ctx, make_domain):
    known, unknown, gone = make_domain(), make_domain(), make_domain()
    run(ctx, Request(action=Action.PAUSE, instance=known.UUIDString(), request_id="k"))
    run(ctx, Request(action=Action.PAUSE, instance=gone.UUIDString(), request_id="g"))
    watcher.reconcile()  # remembers what this host has
    assert all(externals(ctx.store, d.UUIDString()) == [] for d in (known, unknown, gone))

    known.resume()
    unknown.suspend()
    gone_uuid = gone.UUIDString()
    gone.destroy()
    gone.undefine()
    counts = watcher.reconcile()
    [entry] = externals(ctx.store, known.UUIDString())
    assert (entry["state_before"], entry["state_after"]) == ("paused", "running")
    assert entry["note"] == RECONCILED and "event" not in entry
    assert externals(ctx.store, unknown.UUIDString()) == []  # nothing recorded to compare
    [missing] = externals(ctx.store, gone_uuid)
    assert missing["state_after"] == "missing"
    assert counts["journaled"] == 2
    assert watcher.reconcile().get("journaled", 0) == 0  # nothing new: nothing journaled


def test_one_guests_trouble_never_ends_a_reconciliation(watcher, ctx, make_domain,
                                                        monkeypatch):
    vanished, stuck, drifted = make_domain(), make_domain(), make_domain()
    for n, domain in enumerate((vanished, stuck, drifted)):
        run(ctx, Request(action=Action.PAUSE, instance=domain.UUIDString(), request_id=f"p{n}"))
    drifted.resume()
    real = ctx.hypervisor.observe

    def observe(uuid: str):  # type: ignore[no-untyped-def]
        if uuid == vanished.UUIDString():  # undefined between the lookup and the state read
            raise UnknownInstance("gone")
        if uuid == stuck.UUIDString():
            raise HypervisorBusy("no answer from libvirt after 30s")
        return real(uuid)

    monkeypatch.setattr(ctx.hypervisor, "observe", observe)
    counts = watcher.reconcile()
    assert counts["failed"] == 1 and counts["journaled"] == 2
    assert externals(ctx.store, vanished.UUIDString())[-1]["state_after"] == "missing"
    assert externals(ctx.store, drifted.UUIDString())[-1]["state_after"] == "running"
    assert externals(ctx.store, stuck.UUIDString()) == []


# -- the event stream on libvirt's event loop (in a process of its own) ----------------------
def test_event_stream_delivers_lifecycle_events_of_the_test_driver() -> None:
    script = textwrap.dedent("""
        import json, threading, time, libvirt
        from worker.hypervisor.events import EventStream
        got, status, stop = [], [], threading.Event()
        stream = EventStream("test:///default")
        t = threading.Thread(target=stream.run,
                             args=(got.append, status.append, stop), daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while "connected" not in status and time.monotonic() < deadline:
            time.sleep(0.01)
        conn = libvirt.open("test:///default")
        dom = conn.lookupByName("test")
        dom.suspend(); dom.resume()
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set(); t.join(5)
        print(json.dumps({"status": status,
                          "events": [[e.name, e.event, e.detail] for e in got]}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"][:1] == ["connected"] and out["status"][-1] == "disconnected"
    assert out["events"][:2] == [["test", libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0],
                                 ["test", libvirt.VIR_DOMAIN_EVENT_RESUMED, 0]]


def test_the_pump_outlives_a_ctrl_c_and_ends_when_the_worker_closes_its_stdin() -> None:
    """A Ctrl-C of `make run` reaches the pump too (same process group): the worker ends it,
    not the interrupt (it died with a traceback and was restarted mid-shutdown)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DORMANT_")}
    env["DORMANT_LIBVIRT_URI"] = "test:///default"
    pump = subprocess.Popen([sys.executable, "-m", "worker.drift.pump"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert pump.stdout is not None and pump.stdin is not None
        ready, _, _ = select.select([pump.stdout], [], [], 30)
        assert ready, "the pump did not report its event stream within 30 s"
        first = json.loads(pump.stdout.readline())
        assert first == {"type": "status", "status": "connected"}
        pump.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            pump.wait(1.5)  # still running
        pump.stdin.close()
        assert pump.wait(15) == 0
        assert pump.stderr is not None and "Traceback" not in pump.stderr.read()
    finally:
        if pump.poll() is None:
            pump.kill()
            pump.wait()
