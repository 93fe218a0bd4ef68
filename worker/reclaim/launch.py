"""Starting runs: a reclaim run's decisions and report, a drain's and a restore's work queue,
the once-only claim, and the first capped wave of actions. The :class:`Launcher` half of
:class:`~worker.reclaim.actions.Reclaimer` (which carries the actions out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from worker.core.errors import (
    DormantError,
    InvalidInput,
    UnknownInstance,
)
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
    unsavable,
)
from worker.reclaim.outcomes import run_status
from worker.transition.context import Context

log = logging.getLogger("dormant.reclaim")

SendItem = Callable[[str, str], object]  # (run id, instance): queue one action of a run


@dataclass
class Launcher:
    """Creates runs over one worker's hypervisor and state store."""

    ctx: Context
    settings: Settings
    send_item: SendItem
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep

    @property
    def client(self) -> Any:
        return self.ctx.store.redis

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
        rid = run_store.run_id(run_id) if run_id else (
            run_store.for_task("reclaim", self.ctx.host, owner, dry_run=dry) if owner
            else run_store.manual_id(self.ctx.host, now, dry_run=dry))
        if not dry and (answer := self.claimed(rid, owner or rid)) is not None:
            return answer
        stopped = run_store.cancelled(self.client, rid)
        candidates = self._candidates(now)
        disabled = killswitch.disabled_reason(self.client, enabled_setting=s.reclaim_enabled)
        safety = selection.Safety(min_age=s.reclaim_min_age, disabled_reason=disabled,
                           grace=s.reclaim_grace, grace_period=s.reclaim_grace_period)
        plan = selection.select(candidates, safety, now=now, run_id=rid)
        entries = {e.instance: {**e.as_dict(), "outcome": "none"} for e in plan.entries}
        queue = [] if dry or stopped else [e.instance for e in plan.to_suspend]
        for e in plan.to_suspend:
            entries[e.instance]["outcome"] = "dry run: would suspend" if dry else \
                "cancelled" if stopped else "pending"
        if not dry and not stopped:
            self._apply_marks(rid, plan, candidates, entries, now)
        status, reason = run_status(queued=len(queue), dry=dry, disabled=disabled)
        if stopped and not dry:
            status, reason = "cancelled", run_store.cancel_reason(stopped) + " before it started"
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
        rid = run_store.run_id(restore_id) if restore_id else (
            run_store.for_task("restore", self.ctx.host, owner, of_run=of_run) if owner
            else run_store.restore_id(of_run, self.clock()))
        names = {e["instance"]: e.get("name") for e in source["entries"]}
        members = source["manifest"]
        entries = [{"instance": u, "name": names.get(u), "verdict": "resume",
                    "reason": f"suspended by {of_run}", "outcome": "pending"} for u in members]
        return self._new_run(rid, "restore", entries, members, owner=owner, of_run=of_run)

    def _priorities(self, instances: list[str]) -> dict[str, int]:
        """Each instance's priority from its domain metadata (worker/order.py); a missing
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
        rid = run_store.run_id(run_id) if run_id else (
            run_store.for_task("drain", self.ctx.host, owner) if owner
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
        stopped = run_store.cancelled(self.client, rid)
        if stopped is not None:  # cancelled while its task waited: do nothing, say so
            for e in entries:
                if e["outcome"] == "pending":
                    e["outcome"] = "cancelled"
            run_store.create(self.client, rid, {
                "run_id": rid, "kind": kind, "host": self.ctx.host, "dry_run": False,
                "started_at": now, "finished_at": now, "status": "cancelled",
                "reason": run_store.cancel_reason(stopped) + " before it started", **meta},
                entries, queue=[], ttl=self.settings.reclaim_report_ttl)
            return run_store.load(self.client, rid) or {}
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

    def _state(self, uuid: str, sampled: str) -> str:
        """A guest read busy may only have been held for an instant by another query (its
        counters left out: a gap in its evidence, right for a sample). Whether it is busy
        now comes from its own state and control info, which need no job."""
        if sampled != State.BUSY:
            return sampled
        try:
            return str(self.ctx.hypervisor.guest(uuid).observe().state)
        except DormantError:
            return sampled

    def _candidates(self, now: float) -> list[selection.Candidate]:
        s = self.settings
        seen = [(u, n, smp._replace(state=self._state(u, smp.state)))
                for u, n, smp in sampling.collect(self.ctx.hypervisor, now=now)
                if selection.in_scope(n, s.reclaim_scope)]
        uuids = [u for u, _, _ in seen]
        policy = idle.IdlePolicy.from_settings(s)
        history = sampling.load(self.client, uuids, since=now - s.idle_window,
                                host=self.ctx.host)
        first = {u: a.first_seen for u, a in history.items()}
        exempt = exemptions.members(self.client)
        marked = marks.load(self.client, uuids)
        cannot = unsavable.reasons(self.client, self.ctx.hypervisor,
                                   [u for u, _, smp in seen if smp.state == State.RUNNING])
        return [
            selection.Candidate(
                uuid=u, name=n, state=smp.state,
                decision=idle.decide(u, history[u], policy, now=now),
                exempt_metadata=smp.state == State.RUNNING and self._metadata_exempt(u),
                exempt_cli=u in exempt, first_seen=first.get(u), mark=marked.get(u),
                unsavable=cannot.get(u, ""),
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
