"""Carrying out reclamation runs: the side-effecting half of :mod:`worker.reclaim.selection`.

A :class:`Reclaimer` works over one worker's :class:`~worker.transition.runner.Context`
(hypervisor and state store) and its settings. It takes samples, creates reclaim, drain and
restore runs (the report, the work queue, the first capped wave), and carries out one action
of a run: the last check, the transition, the outcome, closing the run after its last action.

Celery stays outside: the tasks in ``tasks/reclaim.py`` hand in how to send a queued action
(``send_item``) and how to run a transition with their retry policy, so every rule here is
unit-tested over libvirt's test driver and fakeredis (tests/unit/test_reclaimer.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from worker.core.errors import InvalidInput, PermanentError, TransientError, UnknownInstance
from worker.core.settings import Settings
from worker.core.states import State
from worker.reclaim import (
    exemptions,
    idle,
    killswitch,
    marks,
    notify,
    order,
    run_store,
    sampling,
    selection,
)
from worker.reclaim.quantise import Thresholds
from worker.transition.context import Context
from worker.transition.table import Action

log = logging.getLogger("dormant.reclaim")

SendItem = Callable[[str, str], object]  # (run id, instance): queue one action of a run
Transition = Callable[[Action, str], dict[str, Any]]  # (action, request id) -> its result


# -- pure pieces -------------------------------------------------------------------------------
def run_status(*, queued: int, dry: bool, disabled: str) -> tuple[str, str]:
    """A new reclaim run's (status, reason): dry run, kill switch, acting or nothing to do."""
    if dry:
        status, reason = "dry_run", "dry run: nothing was changed"
    elif queued:
        status, reason = "acting", f"suspending {queued}"
    else:
        status, reason = "done", "nothing to suspend"
    if disabled:
        status, reason = ("disabled" if not dry else status), disabled
    return status, reason


def action_of(kind: str) -> Action:
    """What one action of a run does: a restore resumes, a reclaim or drain suspends."""
    return Action.RESUME if kind == "restore" else Action.SUSPEND


def outcome_of(action: Action, result: dict[str, Any]) -> tuple[str, bool]:
    """(the report's outcome, whether the guest was suspended now) from a transition result.

    A duplicate that recorded steps did the work on an earlier delivery: it counts as done now.
    """
    changed = result["outcome"] == "changed" or (
        result["outcome"] == "duplicate" and bool(result.get("steps")))
    if action is Action.RESUME:
        return ("resumed" if changed else "already running"), False
    return ("suspended" if changed else "already suspended"), changed


def closing(entries: Iterable[dict[str, Any]], done: int) -> dict[str, Any]:
    """The meta changes that close a run: outcome counts of its finished actions, a reason."""
    outcomes = Counter(str(e.get("outcome")) for e in entries if e.get("finished"))
    return {"status": "done", "outcomes": dict(outcomes),
            "reason": f"{done} action(s) finished: " + ", ".join(
                f"{n} {o}" for o, n in sorted(outcomes.items()))}


@dataclass(frozen=True)
class Precheck:
    """The check just before one action: go ahead, or skip it and why.

    ``recheck`` holds the fresh numbers of a reclaim's re-check (None when there was none);
    they are recorded with the outcome either way.
    """

    state: str
    skip: str = ""  # why the action is skipped; "" = go ahead
    recheck: dict[str, Any] | None = None

    @property
    def go(self) -> bool:
        return not self.skip

    def recorded(self) -> dict[str, Any]:
        """What the report keeps about this check."""
        kept: dict[str, Any] = {} if self.go else {"reason": self.skip, "state": self.state}
        if self.recheck is not None:
            kept["recheck"] = self.recheck
        return kept


# -- the runs ----------------------------------------------------------------------------------
@dataclass
class Reclaimer:
    """Reclamation over one worker's hypervisor and state store."""

    ctx: Context
    settings: Settings
    send_item: SendItem
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep

    @property
    def client(self) -> Any:
        return self.ctx.store.redis

    # -- sampling -------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """Take one sample of every guest of this host now."""
        now = self.clock()
        thresholds = Thresholds.of(idle.IdlePolicy.from_settings(self.settings))
        stored = sampling.take(self.ctx.hypervisor, self.client, self.ctx.host,
                               window=self.settings.idle_window, now=now, thresholds=thresholds)
        return {"host": self.ctx.host, "stored": stored, "at": now}

    # -- starting runs --------------------------------------------------------------------
    def start(self, rid: str, count: int) -> int:
        """Send the first ``count`` queued actions of a run."""
        items = run_store.take(self.client, rid, count)
        for instance in items:
            self.send_item(rid, instance)
        return len(items)

    def claimed(self, rid: str, owner: str) -> dict[str, Any] | None:
        """None when ``owner`` (a task id) may carry out ``rid``; otherwise the answer."""
        s = self.settings
        if not run_store.claim(self.client, rid, owner, ttl=s.reclaim_report_ttl):
            return {"run_id": rid, "host": self.ctx.host, "status": "duplicate",
                    "reason": f"run {rid} was already triggered; nothing more was done",
                    "report": run_store.load(self.client, rid)}
        if run_store.meta(self.client, rid) is not None:  # a redelivery of the task that created it
            self.start(rid, s.reclaim_host_cap)
            return run_store.load(self.client, rid)
        return None

    def reclaim(self, run_id: Any = None, dry_run: Any = False, *,
                owner: str = "") -> dict[str, Any]:
        """Decide every guest of this host, write the report, start the capped suspends."""
        s = self.settings
        now = self.clock()
        dry = bool(dry_run) or s.reclaim_dry_run
        rid = (run_store.run_id(run_id) if run_id
               else run_store.manual_id(self.ctx.host, now, dry_run=dry))
        if not dry and (answer := self.claimed(rid, owner or rid)) is not None:
            return answer
        candidates = self._candidates(now)
        disabled = killswitch.disabled_reason(self.client, enabled_setting=s.reclaim_enabled)
        safety = selection.Safety(min_age=s.reclaim_min_age, disabled_reason=disabled,
                           grace=s.reclaim_grace, grace_period=s.reclaim_grace_period)
        plan = selection.select(candidates, safety, now=now, run_id=rid)
        entries = {e.instance: {**e.as_dict(), "outcome": "none"} for e in plan.entries}
        queue = [] if dry else [e.instance for e in plan.to_suspend]
        for e in plan.to_suspend:
            entries[e.instance]["outcome"] = "dry run: would suspend" if dry else "pending"
        if not dry:
            self._apply_marks(rid, plan, candidates, entries, now)
        status, reason = run_status(queued=len(queue), dry=dry, disabled=disabled)
        meta = {"run_id": rid, "kind": "reclaim", "host": self.ctx.host, "dry_run": dry,
                "started_at": now, "status": status, "reason": reason, "counts": plan.counts(),
                "cap": s.reclaim_host_cap, "scope": s.reclaim_scope,
                "policy": asdict(idle.IdlePolicy.from_settings(s)),
                "finished_at": None if queue else self.clock()}
        run_store.create(self.client, rid, meta, entries.values(), queue=queue,
                    ttl=s.reclaim_report_ttl)
        self.start(rid, s.reclaim_host_cap)
        log.info("reclaim %s: %s (%s)", rid, status, reason)
        return run_store.load(self.client, rid) or meta

    def restore(self, run_id: Any, restore_id: Any = None, *, owner: str = "") -> dict[str, Any]:
        """Resume exactly what run ``run_id`` suspended (its manifest), as a run of its own."""
        of_run = run_store.run_id(run_id)
        source = run_store.load(self.client, of_run)
        if source is None:
            raise InvalidInput(f"unknown run {of_run!r} (reports are kept "
                               f"{self.settings.reclaim_report_ttl // 86400} days)")
        if source["host"] != self.ctx.host:
            raise InvalidInput(f"run {of_run} belongs to host {source['host']}, "
                               f"not {self.ctx.host}")
        rid = (run_store.run_id(restore_id) if restore_id
               else run_store.restore_id(of_run, self.clock()))
        names = {e["instance"]: e.get("name") for e in source["entries"]}
        members = source["manifest"]
        entries = [{"instance": u, "name": names.get(u), "verdict": "resume",
                    "reason": f"suspended by {of_run}", "outcome": "pending"} for u in members]
        return self._new_run(rid, "restore", entries, members, owner=owner, of_run=of_run)

    def _priorities(self, instances: list[str]) -> dict[str, int]:
        """Each instance's priority from its domain metadata (worker/reclaim/order.py); a missing
        guest or an unreadable priority counts as the default, and the log says why."""
        found = {}
        for uuid in instances:
            try:
                xml = self.ctx.hypervisor.guest(uuid).metadata(selection.NAMESPACE)
                found[uuid] = order.metadata_priority(xml)
            except ValueError as exc:
                log.warning("instance %s: %s; priority %d used", uuid, exc,
                            order.DEFAULT_PRIORITY)
            except UnknownInstance:
                pass
        return found

    def drain(self, run_id: Any = None, instances: Any = None, *,
              owner: str = "") -> dict[str, Any]:
        """Suspend every running guest of this host (or only ``instances``, names or UUIDs)."""
        rid = (run_store.run_id(run_id) if run_id
               else run_store.drain_id(self.ctx.host, self.clock()))
        wanted = None if instances is None else {str(i).lower() for i in instances}
        entries, queue = [], []
        for guest in self.ctx.hypervisor.guests():
            if not selection.in_scope(guest.name, self.settings.reclaim_scope):
                continue
            if wanted is not None and guest.uuid.lower() not in wanted \
                    and guest.name.lower() not in wanted:
                continue
            observed = guest.observe()
            running = observed.state is State.RUNNING
            entries.append({"instance": guest.uuid, "name": guest.name,
                            "verdict": "suspend" if running else "not_running",
                            "reason": "drain" if running else f"not running ({observed})",
                            "outcome": "pending" if running else "none"})
            if running:
                queue.append(guest.uuid)
        return self._new_run(rid, "drain", entries, queue, owner=owner)

    def _new_run(self, rid: str, kind: str, entries: list[dict[str, Any]], queue: list[str],
                 *, owner: str, **meta: Any) -> dict[str, Any]:
        if (answer := self.claimed(rid, owner or rid)) is not None:
            return answer
        now = self.clock()
        priorities = self._priorities(queue)
        waves = order.waves(priorities, queue, kind=kind)
        queue = [u for wave in waves for u in wave]
        for e in entries:
            e["priority"] = priorities.get(e["instance"], order.DEFAULT_PRIORITY)
        info = {"run_id": rid, "kind": kind, "host": self.ctx.host, "dry_run": False,
                "started_at": now, "status": "acting" if queue else "done",
                "reason": f"{len(queue)} to {'resume' if kind == 'restore' else 'suspend'}",
                "cap": self.settings.reclaim_host_cap, "finished_at": None if queue else now,
                "waves": [[priorities.get(w[0], order.DEFAULT_PRIORITY), len(w)] for w in waves],
                **meta}
        run_store.create(self.client, rid, info, entries, queue=queue,
                    ttl=self.settings.reclaim_report_ttl,
                    wave_ends=order.bounds([len(w) for w in waves]))
        self.start(rid, self.settings.reclaim_host_cap)
        return run_store.load(self.client, rid) or info

    # -- a reclaim run's inputs -----------------------------------------------------------
    def _metadata_exempt(self, uuid: str) -> bool:
        try:
            xml = self.ctx.hypervisor.guest(uuid).metadata(selection.NAMESPACE)
            return selection.metadata_exempt(xml)
        except ValueError as exc:  # unreadable opt-out: keep the instance, say so in the log
            log.warning("instance %s: %s; treated as exempt", uuid, exc)
            return True

    def _candidates(self, now: float) -> list[selection.Candidate]:
        s = self.settings
        seen = [(u, n, smp) for u, n, smp in sampling.collect(self.ctx.hypervisor, now=now)
                if selection.in_scope(n, s.reclaim_scope)]
        uuids = [u for u, _, _ in seen]
        policy = idle.IdlePolicy.from_settings(s)
        history = sampling.load(self.client, uuids, since=now - s.idle_window,
                                host=self.ctx.host)
        first = {u: a.first_seen for u, a in history.items()}
        exempt = exemptions.members(self.client)
        marked = marks.load(self.client, uuids)
        return [
            selection.Candidate(
                uuid=u, name=n, state=smp.state,
                decision=idle.decide(u, history[u], policy, now=now),
                exempt_metadata=smp.state == State.RUNNING and self._metadata_exempt(u),
                exempt_cli=u in exempt, first_seen=first.get(u), mark=marked.get(u),
            )
            for u, n, smp in seen
        ]

    def _apply_marks(self, rid: str, plan: selection.Plan, candidates: list[selection.Candidate],
                     entries: dict[str, dict[str, Any]], now: float) -> None:
        """Grace: create marks (and send their one notice), remove marks of active instances."""
        s = self.settings
        marked = {c.uuid for c in candidates if c.mark is not None}
        for e in plan.with_verdict(selection.Verdict.MARK):
            if e.instance in marked:
                entries[e.instance]["outcome"] = "still marked"
                continue
            ttl = int(s.reclaim_grace_period + 7 * 86400)
            if marks.put(self.client, e.instance, rid=rid, now=now, ttl=ttl):
                notice = self._notice(rid, e, now)
                entries[e.instance].update(outcome="marked", notice=notice)
        for e in plan.to_unmark:
            marks.clear(self.client, e.instance)
            entries[e.instance]["outcome"] = "unmarked"

    def _notice(self, rid: str, e: selection.Entry, now: float) -> str:
        s = self.settings
        body = notify.mark_notice(instance=e.instance, name=e.name, host=self.ctx.host,
                                  run_id=rid, reason=e.reason,
                                  suspend_after=now + s.reclaim_grace_period)
        return notify.post(s.notify_webhook, body)

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
        try:
            kept: dict[str, Any] = {}
            if not self.ctx.store.started(request_id):  # not started before: check first
                check = self.precheck(kind, instance)
                kept = check.recorded()
                if not check.go:
                    self.finish(rid, instance, {"outcome": "skipped", **kept}, suspended=False)
                    return {"run_id": rid, "instance": instance, "outcome": "skipped", **kept}
            result = transition(action, request_id)
        except (TransientError, PermanentError) as exc:
            if isinstance(exc, TransientError) and not final:
                raise  # retried with backoff; the entry stays pending
            self.finish(rid, instance, {"outcome": "failed", "error_type": type(exc).__name__,
                                        "error": str(exc)}, suspended=False)
            raise
        outcome, suspended = outcome_of(action, result)
        self.finish(rid, instance, {"outcome": outcome, "state_after": result.get("state_after"),
                                    "duration_ms": result.get("duration_ms"),
                                    "request_id": request_id, **kept},
                    suspended=suspended)
        return result

    def _fresh(self, uuid: str) -> sampling.Sample | None:
        """A sample of this one guest now (its stats alone: not every guest of the host)."""
        for u, _name, smp in sampling.collect(self.ctx.hypervisor, now=self.clock(), of=[uuid]):
            if u == uuid:
                return smp
        return None

    def precheck(self, kind: str, uuid: str) -> Precheck:
        """Just before acting on ``uuid``: does it still exist and is it in the state the
        action needs; for a reclaim, is it still not exempt and still idle right now."""
        s = self.settings
        guest, observed = self.ctx.hypervisor.observe(uuid)
        state = str(observed.state)
        if guest is None:
            return Precheck(state, "skipped: the instance no longer exists")
        if kind == "restore":
            if observed.state is State.RUNNING:
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
                             **closing(report.get("entries", []), done))
