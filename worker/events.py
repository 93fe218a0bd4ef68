"""Changes made behind dormant's back: libvirt lifecycle events, and reconciliation.

dormant reads the real state before every transition, so it never acts on a stale view; this
module makes it *notice* what happens outside it (an operator's ``virsh suspend``, a guest
paused by an I/O error or shut down from inside, a domain undefined or renamed) and journal
it as ``outcome: external``.

The pieces:

* a **pump** process (``python -m worker.events``) runs libvirt's event loop and
  :class:`worker.hypervisor.EventStream` and prints one JSON line per event. It is a process
  of its own because registering libvirt's event loop is for good and inherited by a forked
  Celery pool child, whose idle connections libvirtd would then drop (see
  ``hypervisor._ensure_event_loop``);
* a :class:`Watcher` in the worker's main process (started by a bootstep) reads those lines
  and applies the policy below on its own thread, with its own libvirt connection, so it
  never blocks start-up or a transition.

The policy (pure functions at the top of this module): an event is checked by reading the
journal first (:meth:`Store.watch_point`), then the real state; only a state that differs
from the last one dormant recorded is journaled, and only if no transition holds or took the
instance's lock meanwhile (:meth:`Store.record_external`). So the late events of dormant's own
transitions (a managed save's intermediate states, a restore) find the journal already saying
so and leave nothing. A change that is not paused any more clears a pending auto-unpause
deadline. Reconciliation — at start, after every reconnect of the event stream, and every
``DORMANT_RECONCILE_INTERVAL`` seconds — compares every guest the same way and journals the
difference as ``noticed by reconciliation``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from worker import metrics, registry
from worker.errors import DormantError, UnknownInstance
from worker.runner import Context
from worker.states import Observed, State
from worker.store import WatchPoint

log = logging.getLogger("dormant.events")

# virDomainEventType and each type's detail codes (libvirt's public ABI, libvirt-domain.h).
EVENTS = ("defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown",
          "pmsuspended", "crashed")
DETAILS: dict[str, tuple[str, ...]] = {
    "defined": ("added", "updated", "renamed", "from_snapshot"),
    "undefined": ("removed", "renamed"),
    "started": ("booted", "migrated", "restored", "from_snapshot", "wakeup", "recreated"),
    "suspended": ("paused", "migrated", "ioerror", "watchdog", "restored", "from_snapshot",
                  "api_error", "postcopy", "postcopy_failed"),
    "resumed": ("unpaused", "migrated", "from_snapshot", "postcopy", "postcopy_failed"),
    "stopped": ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
                "from_snapshot"),
    "shutdown": ("finished", "guest", "host"),
    "pmsuspended": ("memory", "disk"),
    "crashed": ("panicked", "crashloaded"),
}
# What an operator reads in ``dormant history`` for the common cases.
NOTES = {
    ("suspended", "paused"): "paused outside dormant",
    ("suspended", "ioerror"): "paused by an I/O error",
    ("suspended", "watchdog"): "paused by the watchdog",
    ("suspended", "api_error"): "paused after a hypervisor API error",
    ("resumed", "unpaused"): "resumed outside dormant",
    ("started", "booted"): "started outside dormant",
    ("started", "restored"): "restored from a saved image outside dormant",
    ("stopped", "saved"): "saved to disk (managed save) outside dormant",
    ("stopped", "destroyed"): "destroyed (forced off)",
    ("stopped", "shutdown"): "shut down",
    ("stopped", "crashed"): "crashed",
    ("stopped", "failed"): "failed to run",
    ("shutdown", "guest"): "shut down from inside the guest",
    ("shutdown", "host"): "shut down by the host",
    ("undefined", "removed"): "undefined",
    ("undefined", "renamed"): "renamed (old name)",
    ("defined", "added"): "defined",
    ("defined", "renamed"): "renamed",
}
RECONCILED = "noticed by reconciliation"
# Outcomes whose state_after is what the guest was left in.
SETTLED = frozenset({"changed", "already", "duplicate", "external"})
RETRY_GRACE = 600.0  # seconds a "retrying" entry means "a transition is still under way"


def describe(event: int, detail: int) -> tuple[str, str]:
    """libvirt's (event, detail) codes in words; unknown (newer) codes are spelled out."""
    name = EVENTS[event] if 0 <= event < len(EVENTS) else f"event_{event}"
    details = DETAILS.get(name, ())
    return name, details[detail] if 0 <= detail < len(details) else f"detail_{detail}"


def note(event: str, detail: str) -> str:
    return NOTES.get((event, detail), f"{event} ({detail})")


# Which events can leave a guest in a state, and which one tells most when several came
# together (a restore says "started/restored" then "resumed"; a boot "resumed" then
# "started/booted"; a managed save "suspended" then "stopped/saved").
_EXPLAINS = {
    "running": ("started", "resumed"),
    "paused": ("suspended",),
    "suspended": ("stopped",),
    "shutoff": ("stopped", "shutdown"),
    "missing": ("undefined",),
    "crashed": ("crashed", "stopped"),
    "pmsuspended": ("pmsuspended",),
}
_PRIORITY = ("undefined", "stopped", "started", "crashed", "pmsuspended", "suspended",
             "resumed", "shutdown", "defined")


def attribute(events: Sequence[tuple[str, str]], state: str) -> tuple[str, str] | None:
    """The (event, detail) of a burst that explains the state the guest is in now.

    The first of the most telling events that can lead to ``state``; None when none can:
    the guest has moved on since, and the event saying so is still on its way.
    """
    fitting = [e for e in events if e[0] in _EXPLAINS.get(state, ())]
    if not fitting:
        return None
    return min(fitting, key=lambda e: _PRIORITY.index(e[0]) if e[0] in _PRIORITY else 99)


# The state an event leaves a guest in, when the event alone says so for sure (None: read it).
_PAUSE_REASONS = {"paused": "user", "ioerror": "ioerror", "watchdog": "watchdog",
                  "api_error": "api_error"}
_STOPPED_OFF = frozenset({"shutdown", "destroyed", "crashed", "failed"})


def implied(event: str, detail: str) -> tuple[str, str] | None:
    """(state, reason) that ``event``/``detail`` leaves the guest in, or None if unsure."""
    if event in ("started", "resumed"):
        return ("running", "")
    if event == "suspended" and detail in _PAUSE_REASONS:
        return ("paused", _PAUSE_REASONS[detail])
    if event == "stopped" and detail == "saved":
        return ("suspended", "")
    if event == "stopped" and detail in _STOPPED_OFF:
        return ("shutoff", "")
    if event == "undefined" and detail == "removed":
        return ("missing", "")
    return None


def already_recorded(known: Known | None, events: Sequence[tuple[str, str]]) -> bool:
    """True when the burst's last event leaves the guest in the state dormant recorded: the
    common case of dormant's own transition, answered without asking libvirt."""
    if known is None or not events:
        return False
    state = implied(*events[-1])
    return state is not None and state[0] == known.state and (
        state[0] != "paused" or not known.reason or state[1] == known.reason)


@dataclass(frozen=True)
class Known:
    """The state dormant last recorded for a guest (plain state, libvirt's reason apart)."""

    state: str
    reason: str = ""


class Uncertain:
    """A transition of dormant's is still retrying: its outcome is not known yet."""


UNCERTAIN = Uncertain()


def split_state(text: str) -> tuple[str, str]:
    """``paused(user)`` -> (``paused``, ``user``); a plain ``paused`` has no reason."""
    state, _, reason = text.partition("(")
    return state, reason.rstrip(")")


def last_known(entries: Sequence[dict[str, Any]], now: float) -> Known | Uncertain | None:
    """What the newest-first journal ``entries`` say the guest was last left in.

    Failures and refusals say nothing about the state and are skipped; a recent ``retrying``
    means a transition will still journal its result. None: dormant recorded no state.
    """
    for entry in entries:
        outcome = entry.get("outcome")
        if outcome == "retrying":
            if now - float(entry.get("finished_at") or 0) < RETRY_GRACE:
                return UNCERTAIN
            continue
        if outcome in SETTLED and entry.get("state_after"):
            state, reason = split_state(str(entry["state_after"]))
            return Known(state, str(entry.get("reason_after") or reason))
    return None


def differs(known: Known | None, observed: Observed) -> bool:
    """Whether the real state is not the one recorded (a pause's reason counts too)."""
    if known is None:
        return True
    if known.state != str(observed.state):
        return True
    return observed.state is State.PAUSED and bool(known.reason) and known.reason != observed.reason


def external_entry(*, instance: str, name: str | None, host: str, before: Known | None,
                   after: Observed, source: str, event: str | None, detail: str | None,
                   at: float, now: float) -> dict[str, Any]:
    """The journal entry of one change made outside dormant (plain states, reasons apart)."""
    entry: dict[str, Any] = {
        "instance": instance,
        "name": name,
        "host": host,
        "outcome": "external",
        "source": source,
        "state_before": before.state if before else None,
        "reason_before": before.reason if before else None,
        "state_after": str(after.state),
        "reason_after": after.reason,
        "note": RECONCILED if source == "reconciliation" else note(event or "", detail or ""),
        "started_at": at,
        "finished_at": now,
    }
    if event is not None:
        entry.update(event=event, detail=detail)
    return entry


BURST_QUIET = 0.1  # seconds without another event of a guest before its state is checked
BURST_MAX = 0.5  # seconds after a burst's first event it is checked at the latest


@dataclass
class _Burst:
    """Events of one guest that came close together, checked once."""

    name: str
    at: float  # epoch of the first event
    first: float  # monotonic
    last: float = 0.0
    events: list[tuple[str, str]] = field(default_factory=list)

    @property
    def due(self) -> float:
        return min(self.last + BURST_QUIET, self.first + BURST_MAX)


# -- the worker side -----------------------------------------------------------------------
class Watcher:
    """Runs in the worker's main process: supervises the pump and applies the policy.

    Two daemon threads: one reads the pump's lines into a queue (restarting the pump if it
    dies), one handles them and reconciles. Nothing here is called by a transition.
    """

    def __init__(self, ctx: Context, *, reconcile_interval: float, registry_interval: int,
                 pump: Sequence[str] | None = None, clock: Callable[[], float] = time.time):
        self.ctx = ctx
        self.reconcile_interval = reconcile_interval
        self.registry_interval = registry_interval
        self.pump_command = list(pump) if pump is not None else [
            sys.executable, "-m", "worker.events"]
        self.clock = clock
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pump: subprocess.Popen[bytes] | None = None
        self._pump_lock = threading.Lock()
        self._bursts: dict[str, _Burst] = {}  # uuid -> events not checked yet

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        targets: list[tuple[str, Callable[[], None]]] = [("dormant-events", self._handle_loop)]
        if self.pump_command:
            targets.append(("dormant-events-pump", self._pump_loop))
        else:  # no pump (an in-process test:/// URI cannot share events): reconcile only
            self.inbox.put({"type": "status", "status": "connected"})
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._pump_lock:
            pump = self._pump
        if pump is not None:
            _end(pump, timeout)
        for thread in self._threads:
            thread.join(timeout)

    # -- the pump ----------------------------------------------------------------------------
    def _pump_loop(self) -> None:
        pause = 0.2
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                pump = subprocess.Popen(self.pump_command, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
            except OSError as exc:
                log.error("cannot start the event pump: %s", exc)
                self._stop.wait(5)
                continue
            with self._pump_lock:
                self._pump = pump
            assert pump.stdout is not None
            for line in pump.stdout:
                try:
                    self.inbox.put(json.loads(line))
                except ValueError:
                    log.warning("event pump said %r", line[:200])
            _end(pump, 2)
            self.inbox.put({"type": "status", "status": "disconnected"})
            if self._stop.is_set():
                return
            log.warning("event pump exited (%s); starting it again", pump.returncode)
            pause = 0.2 if time.monotonic() - started > 60 else min(pause * 2, 10)
            self._stop.wait(pause)

    # -- handling ----------------------------------------------------------------------------
    def _handle_loop(self) -> None:
        next_reconcile = float("inf")
        while not self._stop.is_set():
            now = time.monotonic()
            due = min([next_reconcile, *(b.due for b in self._bursts.values())])
            try:
                message = self.inbox.get(timeout=min(max(0.0, due - now), 1.0))
            except queue.Empty:
                message = None
            if message is not None and message.get("type") == "status":
                connected = message.get("status") == "connected"
                metrics.event_stream(self.ctx.host, connected)
                log.info("event stream %s", message.get("status"))
                if connected:  # at start and after a reconnect: catch what was missed
                    self._safely(self.reconcile)
                    next_reconcile = self._next()
            elif message is not None:
                self._safely(lambda m=message: self.receive(m))  # type: ignore[misc]
            self._safely(self.flush)
            if time.monotonic() >= next_reconcile:
                self._safely(self.reconcile)
                next_reconcile = self._next()

    def _next(self) -> float:
        if self.reconcile_interval <= 0:
            return float("inf")
        return time.monotonic() + self.reconcile_interval

    def _safely(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # one bad event or an outage must not end the watcher
            log.warning("event handling failed: %s: %s", type(exc).__name__, exc)

    def receive(self, message: dict[str, Any]) -> None:
        """One lifecycle event from the pump: registry and cache now, the state a bit later.

        Events of one guest that come together (a restore, a boot, a save) are checked
        once, when the guest has been quiet for ``BURST_QUIET`` seconds (``BURST_MAX`` at
        most), so an intermediate state is never journaled as if the guest stayed in it.
        """
        uuid, name = str(message["uuid"]).lower(), str(message["name"])
        event, detail = describe(int(message["event"]), int(message["detail"]))
        client = self.ctx.store.redis
        if event in ("defined", "undefined"):
            self.ctx.hypervisor.forget(uuid)
        if event == "defined":
            registry.remember(client, self.ctx.host, uuid, name,
                              interval=self.registry_interval)
        elif event == "undefined" and detail == "renamed":
            registry.forget_name(client, name, uuid)
            return  # the same domain lives on under its new name ("defined/renamed")
        elif event == "undefined":
            registry.forget(client, self.ctx.host, uuid, name)
        now = time.monotonic()
        burst = self._bursts.setdefault(
            uuid, _Burst(name=name, at=float(message.get("at") or self.clock()), first=now))
        burst.events.append((event, detail))
        burst.name, burst.last = name, now

    def flush(self, *, everything: bool = False) -> None:
        """Check every guest whose burst of events is over."""
        now = time.monotonic()
        for uuid, burst in list(self._bursts.items()):
            if everything or burst.due <= now:
                del self._bursts[uuid]
                self.check(uuid, burst.name, source="event", events=burst.events, at=burst.at)

    def check(self, uuid: str, name: str | None, *, source: str,
              events: Sequence[tuple[str, str]] = (), at: float | None = None) -> str:
        """Journal the guest's real state if it is not the one dormant last recorded.

        Returns what happened: ``journaled``, ``same``, ``unknown`` (reconciliation of a guest
        dormant never recorded), ``uncertain``, ``busy``, ``ahead``, ``locked`` or ``moved``.
        """
        for _ in range(3):  # 'moved': a transition finished meanwhile; look again
            seen = self.ctx.store.watch_point(uuid)
            now = self.clock()
            known = last_known([e for _id, e in seen.entries], now)
            if isinstance(known, Uncertain):
                return "uncertain"
            if known is None and source == "reconciliation":
                return "unknown"
            if already_recorded(known, events):
                return "same"
            try:
                guest, observed = self.ctx.hypervisor.observe(uuid)
            except UnknownInstance:  # undefined between the lookup and the state read
                guest, observed = None, Observed(State.MISSING)
            if observed.state is State.BUSY:
                return "busy"  # a job (a save, a restore) is moving it: its end says more
            if not differs(known, observed):
                return "same"
            event = detail = None
            if events:
                explained = attribute(events, str(observed.state))
                if explained is None:
                    return "ahead"  # the event that explains this state is yet to come
                event, detail = explained
            outcome = self._record(uuid, guest.name if guest else name, seen, known, observed,
                                   source=source, event=event, detail=detail,
                                   at=now if at is None else at)
            if outcome != "moved":
                return outcome
        return "moved"

    def _record(self, uuid: str, name: str | None, seen: WatchPoint, known: Known | None,
                observed: Observed, *, source: str, event: str | None, detail: str | None,
                at: float) -> str:
        entry = external_entry(instance=uuid, name=name, host=self.ctx.host, before=known,
                               after=observed, source=source, event=event, detail=detail,
                               at=at, now=self.clock())
        outcome = self.ctx.store.record_external(
            uuid, entry, seen, clear_deadline=observed.state is not State.PAUSED)
        if outcome == "journaled":
            metrics.external_change(self.ctx.host, source, event or "")
            log.info("external change of %s: %s -> %s (%s)", name or uuid,
                     known.state if known else "?", observed, entry["note"],
                     extra={"dormant": {k: entry[k] for k in (
                         "instance", "name", "host", "outcome", "state_before",
                         "state_after") if entry.get(k) is not None}})
        return outcome

    def reconcile(self) -> dict[str, int]:
        """Compare every guest of this host (and those gone since) with the journal."""
        client = self.ctx.store.redis
        current = {g.uuid.lower(): g.name for g in self.ctx.hypervisor.guests()}
        gone = {u: n for u, n in registry.watched(client, self.ctx.host).items()
                if u not in current}
        counts: dict[str, int] = {}
        for uuid, name in [*current.items(), *gone.items()]:
            try:
                outcome = self.check(uuid, name, source="reconciliation")
            except DormantError as exc:  # one guest's trouble never ends the round
                log.warning("reconciliation of %s failed: %s", name or uuid, exc)
                outcome = "failed"
            counts[outcome] = counts.get(outcome, 0) + 1
        registry.set_watched(client, self.ctx.host, current)
        log.info("reconciliation: %s", counts)
        return counts


def _end(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Close the pump's stdin (its signal to stop), then terminate it if it lingers."""
    if process.stdin is not None and not process.stdin.closed:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the pump process ------------------------------------------------------------------------
def pump(uri: str, out: IO[str], stdin: IO[str]) -> None:
    """Print libvirt's lifecycle events of ``uri`` as JSON lines until stdin closes."""
    from worker.hypervisor import DomainEvent, EventStream

    stop = threading.Event()
    write_lock = threading.Lock()
    parent = os.getppid()

    def emit(message: dict[str, Any]) -> None:
        with write_lock:
            try:
                out.write(json.dumps(message) + "\n")
                out.flush()
            except (BrokenPipeError, ValueError):  # the worker is gone
                stop.set()

    def on_event(event: DomainEvent) -> None:
        emit({"type": "lifecycle", "uuid": event.uuid, "name": event.name,
              "event": event.event, "detail": event.detail, "at": event.at})

    def watch_stdin() -> None:
        stdin.read()  # returns at EOF: the worker closed our stdin or died
        stop.set()

    threading.Thread(target=watch_stdin, name="pump-stdin", daemon=True).start()
    stream = threading.Thread(
        target=EventStream(uri).run, name="pump-stream", daemon=True,
        args=(on_event, lambda status: emit({"type": "status", "status": status}), stop))
    stream.start()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # orphaned (the worker was SIGKILLed)
            stop.set()
    stream.join(5)


def main() -> None:
    from worker import logs
    from worker import settings as settings_mod

    # The worker ends the pump (closes its stdin). A Ctrl-C in make run's terminal reaches the
    # whole process group: the pump would die with a traceback and be restarted mid-shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = settings_mod.get()
    logging.basicConfig(stream=sys.stderr, level=s.log_level.upper())  # into the worker's log
    logs.configure(logging.getLogger(), json_lines=s.log_json, level=s.log_level)
    pump(s.libvirt_uri, sys.stdout, sys.stdin)


if __name__ == "__main__":
    main()
