"""Carrying out reclamation runs: the side-effecting half of :mod:`worker.reclaim.selection`.

A :class:`Reclaimer` works over one worker's :class:`~worker.transition.context.Context`
(hypervisor and state store) and its settings. It takes samples, creates reclaim, drain and
restore runs (:mod:`worker.reclaim.launch`: the report, the work queue, the first capped
wave), and carries out one action of a run: the last check, the transition, the outcome,
closing the run after its last action.

Celery stays outside: the tasks in ``tasks/reclaim.py`` hand in how to send a queued action
(``send_item``) and how to run a transition with their retry policy, so every rule here is
unit-tested over libvirt's test driver and fakeredis (tests/unit/reclaim/test_actions.py). What
a run records (statuses, outcomes, the closing counts, the last check) is pure, in
:mod:`worker.reclaim.outcomes`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.core.errors import (
    InvalidInput,
    PermanentError,
    SaveDirectoryFull,
    TransientError,
    Unsavable,
)
from worker.core.states import State
from worker.drift.policy import SETTLED  # outcomes that left the guest in a known state
from worker.reclaim import (
    exemptions,
    idle,
    killswitch,
    run_store,
    sampling,
    selection,
    unsavable,
)
from worker.reclaim.launch import Launcher
from worker.reclaim.outcomes import Precheck, action_of, closing, outcome_of
from worker.reclaim.quantise import Thresholds
from worker.transition.table import Action

log = logging.getLogger("dormant.reclaim")

JOURNAL_LOOKBACK = 20  # newest journal entries read to find what last set a guest's state

Transition = Callable[[Action, str], dict[str, Any]]  # (action, request id) -> its result


# -- the runs ----------------------------------------------------------------------------------
@dataclass
class Reclaimer(Launcher):
    """Reclamation over one worker's hypervisor and state store: starting runs (the
    :class:`~worker.reclaim.launch.Launcher` half), sampling, and carrying out one action."""

    # -- sampling -------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """Take one sample of every guest of this host now."""
        now = self.clock()
        thresholds = Thresholds.of(idle.IdlePolicy.from_settings(self.settings))
        stored = sampling.take(self.ctx.hypervisor, self.client, self.ctx.host,
                               window=self.settings.idle_window, now=now, thresholds=thresholds)
        return {"host": self.ctx.host, "stored": stored, "at": now}

    # -- one action -----------------------------------------------------------------------
    def run_item(self, run_id: Any, instance: Any, *, transition: Transition,
                 final: bool) -> dict[str, Any]:
        """One action of a run: check, then ``transition`` (suspend, or resume for a restore),
        record the outcome and send the next queued action.

        A transient failure propagates without a record (the caller retries it) unless this
        is the ``final`` attempt; any other failure is recorded as failed and propagates.
        """
        rid = run_store.run_id(run_id)
        meta = run_store.meta(self.client, rid)
        if meta is None:
            raise InvalidInput(f"unknown run {rid!r}")
        kind = meta["kind"]
        action = action_of(kind)
        request_id = selection.request_id(rid, str(action), str(instance))
        stopped = run_store.cancelled(self.client, rid)
        if stopped is not None and not self.ctx.store.started(request_id):
            reason = run_store.cancel_reason(stopped)
            self.finish(rid, instance, {"outcome": "cancelled", "reason": reason},
                        suspended=False)
            return {"run_id": rid, "instance": instance, "outcome": "cancelled",
                    "reason": reason}
        try:
            kept: dict[str, Any] = {}
            if not self.ctx.store.started(request_id):  # not started before: check first
                check = self.precheck(kind, instance, of_run=str(meta.get("of_run") or ""),
                                      stopped=meta.get("stopped"))
                kept = check.recorded()
                if not check.go:
                    self.finish(rid, instance, {"outcome": "skipped", **kept}, suspended=False)
                    return {"run_id": rid, "instance": instance, "outcome": "skipped", **kept}
            result = transition(action, request_id)
        except (TransientError, PermanentError) as exc:
            if isinstance(exc, TransientError) and not final:
                raise  # retried with backoff; the entry stays pending
            self._failed(rid, instance, exc)
            raise
        outcome, suspended = outcome_of(action, result)
        if kind == "restore" and outcome == "resumed" and meta.get("of_run"):
            run_store.note_restored(self.client, str(meta["of_run"]), str(instance), rid)
        self.finish(rid, instance, {"outcome": outcome, "state_after": result.get("state_after"),
                                    "duration_ms": result.get("duration_ms"),
                                    "request_id": request_id, **kept},
                    suspended=suspended)
        return result

    def _failed(self, rid: str, instance: str, exc: TransientError | PermanentError) -> None:
        """Record a failed action. A full save directory first stops the run (what is queued
        is skipped, what runs finishes); a guest libvirt cannot save is remembered."""
        if isinstance(exc, SaveDirectoryFull):
            stopped = {"reason": "save directory full", "error": str(exc), **exc.details}
            for queued in run_store.stop(self.client, rid, stopped):
                self.finish(rid, queued, {"outcome": "skipped", "reason": "not started: save "
                                          "directory full", "state": "running"}, suspended=False)
        if isinstance(exc, Unsavable):
            unsavable.remember(self.client, self.ctx.hypervisor, instance,
                               reason=str(exc.details.get("reason", exc)), run_id=rid,
                               now=self.clock(), ttl=self.settings.reclaim_report_ttl)
        self.finish(rid, instance, {"outcome": "failed", "error_type": type(exc).__name__,
                                    "error": str(exc), **({"details": exc.details}
                                                          if exc.details else {})},
                    suspended=False)

    def _fresh(self, uuid: str) -> sampling.Sample | None:
        """A sample of this one guest now (its stats alone: not every guest of the host)."""
        for u, _name, smp in sampling.collect(self.ctx.hypervisor, now=self.clock(), of=[uuid]):
            if u == uuid:
                return smp
        return None

    def precheck(self, kind: str, uuid: str, *, of_run: str = "",
                 stopped: dict[str, Any] | None = None) -> Precheck:
        """Just before acting on ``uuid``: has the run stopped starting actions, does the guest
        still exist and is it in the state the action needs; for a reclaim, is it still not
        exempt and still idle right now."""
        s = self.settings
        guest, observed = self.ctx.hypervisor.observe(uuid)
        state = str(observed.state)
        if stopped:
            return Precheck(state, f"not started: {stopped['reason']}")
        if guest is None:
            return Precheck(state, "skipped: the instance no longer exists")
        if kind == "restore":
            if observed.state is State.RUNNING:
                earlier = self.restored_by(of_run, uuid) if of_run else None
                if earlier is not None:
                    return Precheck(state, f"skipped: already running (restored by {earlier}, "
                                           f"an earlier restore of {of_run})")
                return Precheck(state, "skipped: already running (resumed by someone else)")
            if observed.state is not State.SUSPENDED:
                return Precheck(state, f"skipped: not suspended ({observed}); left alone")
            return Precheck(state)
        if observed.state is not State.RUNNING:
            return Precheck(state, f"skipped: no longer running ({observed})")
        if kind == "drain":
            return Precheck(state)
        disabled = killswitch.disabled_reason(self.client, enabled_setting=s.reclaim_enabled)
        exempt = "dormant exempt" if exemptions.contains(self.client, uuid) else \
            "domain metadata" if self._metadata_exempt(uuid) else ""
        before = after = None
        if not disabled and not exempt:
            before = self._fresh(uuid)
            self.sleep(s.reclaim_recheck_seconds)  # measuring fresh activity, not a wait
            after = self._fresh(uuid)
        policy = idle.IdlePolicy.from_settings(s)
        stored = sampling.load(self.client, [uuid], since=self.clock() - s.idle_window,
                               host=self.ctx.host)[uuid]
        check = selection.recheck(uuid, state=state, exempt=exempt, disabled_reason=disabled,
                           stored=stored, before=before, after=after, policy=policy)
        return Precheck(state, "" if check.ok else check.reason, check.numbers)

    def restored_by(self, of_run: str, uuid: str) -> str | None:
        """The earlier restore of ``of_run`` that resumed ``uuid``, if the last state dormant
        recorded for the guest is still that resume's (not a later change by anyone)."""
        earlier = run_store.restored_by(self.client, of_run, uuid)
        if earlier is None:
            return None
        expected = selection.request_id(earlier, str(Action.RESUME), uuid)
        for entry in reversed(self.ctx.store.journal(uuid, count=JOURNAL_LOOKBACK)):
            if entry.get("outcome") in SETTLED and entry.get("state_after"):
                return earlier if entry.get("request_id") == expected else None
        return None

    def finish(self, rid: str, instance: str, changes: dict[str, Any], *,
               suspended: bool) -> None:
        """Start the next queued action, record this one, close the run after the last.

        The next action is sent *before* recording: a worker killed in between is redelivered,
        finds the entry unfinished and sends one more (briefly cap + 1) -- the queue never
        stalls.
        """
        if not (run_store.entry(self.client, rid, instance) or {}).get("finished"):
            self.start(rid, 1)
        first, done, todo = run_store.record(self.client, rid, instance,
                                        {**changes, "at": self.clock()},
                                        suspended=suspended,
                                        ttl=self.settings.reclaim_report_ttl)
        if first and done < todo and run_store.wave_end(self.client, rid, done):
            self.start(rid, self.settings.reclaim_host_cap)  # this closed a wave: the next one
        if first and done >= todo:
            report = run_store.load(self.client, rid) or {}
            run_store.update_meta(self.client, rid, finished_at=self.clock(),
                             **closing(report.get("entries", []), done,
                                       report.get("cancelled"), report.get("stopped")))
