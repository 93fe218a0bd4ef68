"""The drift watcher: notices changes made behind dormant's back and journals them.

dormant reads the real state before every transition, so it never acts on a stale view; the
:class:`Watcher` makes it *notice* what happens outside it (an operator's ``virsh suspend``, a
guest paused by an I/O error or shut down from inside, a domain undefined or renamed) and
journal it as ``outcome: external``. It runs in the worker's main process (started by a
bootstep), reads the event lines of the pump process (:mod:`worker.drift.pump`) and applies
:mod:`worker.drift.policy` on its own thread, with its own libvirt connection, so it never
blocks start-up or a transition. A change that is not paused any more clears a pending
auto-unpause deadline. Reconciliation — at start, after every reconnect of the event stream,
and every ``DORMANT_RECONCILE_INTERVAL`` seconds — compares every guest the same way and
journals the difference as ``noticed by reconciliation``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.core import metrics
from worker.core.errors import DormantError, UnknownInstance
from worker.core.states import Observed, State
from worker.drift.policy import (
    Known,
    Uncertain,
    already_recorded,
    attribute,
    describe,
    differs,
    external_entry,
    last_known,
)
from worker.fleet import registry
from worker.transition.context import Context
from worker.transition.guards import WatchPoint

log = logging.getLogger("dormant.events")


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
            sys.executable, "-m", "worker.drift.pump"]
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
