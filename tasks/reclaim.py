"""Reclamation tasks: sampling, the nightly run, its actions, restore and drain.

* ``dormant.sample`` (host queue): one ``getAllDomainStats`` stored as samples;
  ``dormant.sample_fleet`` (control queue, beat) sends it to every registered host.
* ``dormant.reclaim`` (host queue): decide, apply the safety rules, write the report and start
  at most ``DORMANT_RECLAIM_HOST_CAP`` actions; ``dormant.reclaim_fleet`` (control, nightly
  crontab) sends one per host with the run id ``<host>:<date>``.
* ``dormant.run_item`` (host queue): one action of a run -- re-check, then the real transition
  (same runner, lock, idempotency, journal and retry policy as ``dormant.suspend``), record the
  outcome, and start the next queued action, so the host cap holds without any thread waiting.
* ``dormant.restore`` / ``dormant.drain`` (host queue): resume a run's manifest / suspend every
  running guest of the host.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from dataclasses import asdict
from typing import Any
from zoneinfo import ZoneInfo

from celery import Task

from tasks.base import DormantTask
from tasks.celery_app import app
from tasks.context import context, settings
from tasks.transitions import TransitionTask
from worker import (
    contract,
    exemptions,
    idle,
    killswitch,
    marks,
    notify,
    registry,
    runs,
    sampling,
    ticks,
)
from worker import reclaim as rc
from worker.errors import InvalidInput, PermanentError, TransientError
from worker.registry import TTL_INTERVALS
from worker.runner import Context
from worker.settings import Settings, queue_for_host
from worker.transitions import Action

log = logging.getLogger("dormant.reclaim")
RETRY = {"autoretry_for": (TransientError,), "retry_backoff": True, "max_retries": 3,
         "acks_late": True, "typing": False}


# -- sampling ----------------------------------------------------------------------------------
@app.task(base=DormantTask, name=contract.SAMPLE.name, **RETRY)
def sample() -> dict[str, Any]:
    """Take one sample of every guest of this host now."""
    ctx, s = context(), settings()
    now = time.time()
    stored = sampling.take(ctx.hypervisor, ctx.store.redis, ctx.host, window=s.idle_window,
                           now=now)
    return {"host": ctx.host, "stored": stored, "at": now}


def _hosts(s: Settings) -> list[str]:
    return registry.hosts(context().store.redis, max_age=s.registry_interval * TTL_INTERVALS)


@app.task(base=DormantTask, name=contract.SAMPLE_FLEET.name, ignore_result=True)
def sample_fleet() -> int:
    """Beat: ask every registered host for a sample (once per tick, however many beats)."""
    s = settings()
    slot = int(time.time() // s.sample_interval)
    if not ticks.claim(context().store.redis, f"sample:{slot}", ttl=s.sample_interval):
        return 0
    hosts = _hosts(s)
    for host in hosts:
        app.send_task(contract.SAMPLE.name, queue=queue_for_host(host),
                      expires=s.sample_interval)
    return len(hosts)


@app.task(base=DormantTask, name=contract.RECLAIM_FLEET.name, ignore_result=True)
def reclaim_fleet() -> list[str]:
    """Nightly crontab: one reclamation per host, id ``<host>:<local date>`` (the run's claim
    makes a second beat or a second trigger a no-op)."""
    s = settings()
    day = dt.datetime.now(ZoneInfo(s.reclaim_timezone)).date()
    sent = []
    for host in _hosts(s):
        rid = runs.nightly_id(host, day)
        app.send_task(contract.RECLAIM.name, kwargs={"run_id": rid},
                      queue=queue_for_host(host))
        sent.append(rid)
    return sent


# -- the run -----------------------------------------------------------------------------------
def _metadata_exempt(ctx: Context, uuid: str) -> bool:
    try:
        return rc.metadata_exempt(ctx.hypervisor.guest(uuid).metadata(rc.NAMESPACE))
    except ValueError as exc:  # unreadable opt-out: keep the instance, say so in the log
        log.warning("instance %s: %s; treated as exempt", uuid, exc)
        return True


def _candidates(ctx: Context, s: Settings, now: float) -> list[rc.Candidate]:
    client = ctx.store.redis
    seen = [(u, n, smp) for u, n, smp in sampling.collect(ctx.hypervisor, now=now)
            if rc.in_scope(n, s.reclaim_scope)]
    uuids = [u for u, _, _ in seen]
    policy = idle.IdlePolicy.from_settings(s)
    history = sampling.load(client, uuids, since=now - s.idle_window)
    first = sampling.first_seen(client, uuids)
    exempt = exemptions.members(client)
    marked = marks.load(client, uuids)
    return [
        rc.Candidate(
            uuid=u, name=n, state=smp.state,
            decision=idle.decide(u, history.get(u, []), policy, now=now),
            exempt_metadata=smp.state == "running" and _metadata_exempt(ctx, u),
            exempt_cli=u in exempt, first_seen=first.get(u), mark=marked.get(u),
        )
        for u, n, smp in seen
    ]


def _apply_marks(ctx: Context, s: Settings, rid: str, plan: rc.Plan, candidates:
                 list[rc.Candidate], entries: dict[str, dict[str, Any]], now: float) -> None:
    """Grace: create marks (and send their one notice), remove marks of active instances."""
    client = ctx.store.redis
    marked = {c.uuid for c in candidates if c.mark is not None}
    for e in plan.with_verdict(rc.Verdict.MARK):
        if e.instance in marked:
            entries[e.instance]["outcome"] = "still marked"
            continue
        ttl = int(s.reclaim_grace_period + 7 * 86400)
        if marks.put(client, e.instance, rid=rid, now=now, ttl=ttl):
            notice = rc_notice(ctx, s, rid, e, now)
            entries[e.instance].update(outcome="marked", notice=notice)
    for e in plan.to_unmark:
        marks.clear(client, e.instance)
        entries[e.instance]["outcome"] = "unmarked"


def rc_notice(ctx: Context, s: Settings, rid: str, e: rc.Entry, now: float) -> str:
    body = notify.mark_notice(instance=e.instance, name=e.name, host=ctx.host, run_id=rid,
                              reason=e.reason, suspend_after=now + s.reclaim_grace_period)
    return notify.post(s.notify_webhook, body)


def _start(rid: str, count: int) -> int:
    """Send the first ``count`` queued actions of a run to this host's queue."""
    ctx = context()
    items = runs.take(ctx.store.redis, rid, count)
    for instance in items:
        run_item.apply_async(args=[rid, instance], queue=settings().host_queue)
    return len(items)


def _claimed(task: Task, rid: str) -> dict[str, Any] | None:
    """None when this task may carry out ``rid``; otherwise the answer for a duplicate."""
    ctx, s = context(), settings()
    client = ctx.store.redis
    if not runs.claim(client, rid, task.request.id or rid, ttl=s.reclaim_report_ttl):
        return {"run_id": rid, "host": ctx.host, "status": "duplicate",
                "reason": f"run {rid} was already triggered; nothing more was done",
                "report": runs.load(client, rid)}
    if runs.meta(client, rid) is not None:  # a redelivery of the task that created the run
        _start(rid, s.reclaim_host_cap)
        return runs.load(client, rid)
    return None


@app.task(base=DormantTask, bind=True, name=contract.RECLAIM.name, **RETRY)
def reclaim(self: Task, run_id: Any = None, dry_run: Any = False) -> dict[str, Any]:
    """Decide every guest of this host, write the report, start the capped suspends."""
    ctx, s = context(), settings()
    now = time.time()
    dry = bool(dry_run) or s.reclaim_dry_run
    rid = runs.run_id(run_id) if run_id else runs.manual_id(ctx.host, now, dry_run=dry)
    if not dry and (answer := _claimed(self, rid)) is not None:
        return answer
    client = ctx.store.redis
    candidates = _candidates(ctx, s, now)
    disabled = killswitch.disabled_reason(client, enabled_setting=s.reclaim_enabled)
    safety = rc.Safety(min_age=s.reclaim_min_age, disabled_reason=disabled,
                       grace=s.reclaim_grace, grace_period=s.reclaim_grace_period)
    plan = rc.select(candidates, safety, now=now, run_id=rid)
    entries = {e.instance: {**e.as_dict(), "outcome": "none"} for e in plan.entries}
    queue = [e.instance for e in plan.to_suspend]
    for uuid in queue:
        entries[uuid]["outcome"] = "dry run: would suspend" if dry else "pending"
    if dry:
        status, reason = "dry_run", "dry run: nothing was changed"
        queue = []
    else:
        _apply_marks(ctx, s, rid, plan, candidates, entries, now)
        status, reason = ("acting", f"suspending {len(queue)}") if queue else \
            ("done", "nothing to suspend")
    if disabled:
        status, reason = ("disabled" if not dry else status), disabled
    meta = {"run_id": rid, "kind": "reclaim", "host": ctx.host, "dry_run": dry,
            "started_at": now, "status": status, "reason": reason, "counts": plan.counts(),
            "cap": s.reclaim_host_cap, "scope": s.reclaim_scope,
            "policy": asdict(idle.IdlePolicy.from_settings(s)),
            "finished_at": None if queue else time.time()}
    runs.create(client, rid, meta, entries.values(), queue=queue, ttl=s.reclaim_report_ttl)
    _start(rid, s.reclaim_host_cap)
    log.info("reclaim %s: %s (%s)", rid, status, reason)
    return runs.load(client, rid) or meta


# -- one action --------------------------------------------------------------------------------
def _fresh(ctx: Context, uuid: str) -> sampling.Sample | None:
    for u, _name, smp in sampling.collect(ctx.hypervisor, now=time.time()):
        if u == uuid:
            return smp
    return None


def _precheck(kind: str, uuid: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(why to skip, or None; numbers to keep) just before acting on ``uuid``."""
    ctx, s = context(), settings()
    guest, observed = ctx.hypervisor.observe(uuid)
    state = str(observed.state)
    if guest is None:
        return {"reason": "skipped: the instance no longer exists", "state": state}, {}
    if kind == "restore":
        if state == "running":
            return {"reason": "skipped: already running (resumed by someone else)",
                    "state": state}, {}
        if state != "suspended":
            return {"reason": f"skipped: not suspended ({observed}); left alone",
                    "state": state}, {}
        return None, {}
    if state != "running":
        return {"reason": f"skipped: no longer running ({observed})", "state": state}, {}
    if kind == "drain":
        return None, {}
    client = ctx.store.redis
    disabled = killswitch.disabled_reason(client, enabled_setting=s.reclaim_enabled)
    exempt = "dormant exempt" if exemptions.contains(client, uuid) else \
        "domain metadata" if _metadata_exempt(ctx, uuid) else ""
    before = after = None
    if not disabled and not exempt:
        before = _fresh(ctx, uuid)
        time.sleep(s.reclaim_recheck_seconds)  # measuring fresh activity, not waiting on a peer
        after = _fresh(ctx, uuid)
    policy = idle.IdlePolicy.from_settings(s)
    stored = sampling.load(client, [uuid], since=time.time() - s.idle_window).get(uuid, [])
    check = rc.recheck(uuid, state=state, exempt=exempt, disabled_reason=disabled,
                       stored=stored, before=before, after=after, policy=policy)
    if not check.ok:
        return {"reason": check.reason, "recheck": check.numbers, "state": state}, {}
    return None, {"recheck": check.numbers}


def _finish(rid: str, instance: str, changes: dict[str, Any], *, suspended: bool) -> None:
    """Start the next queued action, record this one, close the run after the last.

    The next action is sent *before* recording: a worker killed in between is redelivered,
    finds the entry unfinished and sends one more (briefly cap + 1) -- the queue never stalls.
    """
    ctx, s = context(), settings()
    client = ctx.store.redis
    if not (runs.entry(client, rid, instance) or {}).get("finished"):
        _start(rid, 1)
    first, done, todo = runs.record(client, rid, instance, {**changes, "at": time.time()},
                                    suspended=suspended, ttl=s.reclaim_report_ttl)
    if first and done >= todo:
        report = runs.load(client, rid) or {}
        outcomes = Counter(str(e.get("outcome")) for e in report.get("entries", [])
                           if e.get("finished"))
        runs.update_meta(client, rid, status="done", finished_at=time.time(),
                         outcomes=dict(outcomes),
                         reason=f"{done} action(s) finished: " + ", ".join(
                             f"{n} {o}" for o, n in sorted(outcomes.items())))


@app.task(base=TransitionTask, bind=True, name=contract.RUN_ITEM.name)
def run_item(self: TransitionTask, run_id: Any, instance: Any) -> dict[str, Any]:
    """One action of a run: re-check, then suspend (reclaim, drain) or resume (restore)."""
    ctx = context()
    rid = runs.run_id(run_id)
    meta = runs.meta(ctx.store.redis, rid)
    if meta is None:
        raise InvalidInput(f"unknown run {rid!r}")
    kind = meta["kind"]
    action = Action.RESUME if kind == "restore" else Action.SUSPEND
    request_id = rc.request_id(rid, str(action), str(instance))
    final = (self.request.retries or 0) >= (self.max_retries or 0)
    try:
        extra: dict[str, Any] = {}
        if ctx.store.request(request_id) is None:  # not started before: check first
            skip, extra = _precheck(kind, instance)
            if skip is not None:
                _finish(rid, instance, {"outcome": "skipped", **skip}, suspended=False)
                return {"run_id": rid, "instance": instance, "outcome": "skipped", **skip}
        result = self.transition(action, instance, request_id=request_id)
    except (TransientError, PermanentError) as exc:
        if isinstance(exc, TransientError) and not final:
            raise  # retried with backoff; the entry stays pending
        _finish(rid, instance, {"outcome": "failed", "error_type": type(exc).__name__,
                                "error": str(exc)}, suspended=False)
        raise
    changed = result["outcome"] == "changed" or (
        result["outcome"] == "duplicate" and bool(result.get("steps")))
    verb = "resumed" if action is Action.RESUME else "suspended"
    outcome = verb if changed else f"already {'running' if action is Action.RESUME else verb}"
    _finish(rid, instance, {"outcome": outcome, "state_after": result.get("state_after"),
                            "duration_ms": result.get("duration_ms"),
                            "request_id": request_id, **extra},
            suspended=changed and action is Action.SUSPEND)
    return result


# -- restore and drain -------------------------------------------------------------------------
def _new_run(task: Task, rid: str, kind: str, entries: list[dict[str, Any]],
             queue: list[str], **meta: Any) -> dict[str, Any]:
    ctx, s = context(), settings()
    if (answer := _claimed(task, rid)) is not None:
        return answer
    now = time.time()
    info = {"run_id": rid, "kind": kind, "host": ctx.host, "dry_run": False,
            "started_at": now, "status": "acting" if queue else "done",
            "reason": f"{len(queue)} to {'resume' if kind == 'restore' else 'suspend'}",
            "cap": s.reclaim_host_cap, "finished_at": None if queue else now, **meta}
    runs.create(ctx.store.redis, rid, info, entries, queue=queue, ttl=s.reclaim_report_ttl)
    _start(rid, s.reclaim_host_cap)
    return runs.load(ctx.store.redis, rid) or info


@app.task(base=DormantTask, bind=True, name=contract.RESTORE.name, **RETRY)
def restore(self: Task, run_id: Any, restore_id: Any = None) -> dict[str, Any]:
    """Resume exactly what run ``run_id`` suspended (its manifest); skip what is running or
    gone. Each call is its own restore run, reported like any other."""
    ctx = context()
    client = ctx.store.redis
    of_run = runs.run_id(run_id)
    source = runs.load(client, of_run)
    if source is None:
        raise InvalidInput(f"unknown run {of_run!r} (reports are kept "
                           f"{settings().reclaim_report_ttl // 86400} days)")
    if source["host"] != ctx.host:
        raise InvalidInput(f"run {of_run} belongs to host {source['host']}, not {ctx.host}")
    rid = runs.run_id(restore_id) if restore_id else runs.restore_id(of_run, time.time())
    names = {e["instance"]: e.get("name") for e in source["entries"]}
    members = source["manifest"]
    entries = [{"instance": u, "name": names.get(u), "verdict": "resume",
                "reason": f"suspended by {of_run}", "outcome": "pending"} for u in members]
    return _new_run(self, rid, "restore", entries, members, of_run=of_run)


@app.task(base=DormantTask, bind=True, name=contract.DRAIN.name, **RETRY)
def drain(self: Task, run_id: Any = None, instances: Any = None) -> dict[str, Any]:
    """Maintenance: suspend every running guest of this host (or only ``instances``, names or
    UUIDs), capped, with a manifest for ``dormant restore``."""
    ctx, s = context(), settings()
    rid = runs.run_id(run_id) if run_id else runs.drain_id(ctx.host, time.time())
    wanted = None if instances is None else {str(i).lower() for i in instances}
    entries, queue = [], []
    for guest in ctx.hypervisor.guests():
        if not rc.in_scope(guest.name, s.reclaim_scope):
            continue
        if wanted is not None and guest.uuid.lower() not in wanted \
                and guest.name.lower() not in wanted:
            continue
        observed = guest.observe()
        running = observed.state.value == "running"
        entries.append({"instance": guest.uuid, "name": guest.name,
                        "verdict": "suspend" if running else "not_running",
                        "reason": "drain" if running else f"not running ({observed})",
                        "outcome": "pending" if running else "none"})
        if running:
            queue.append(guest.uuid)
    return _new_run(self, rid, "drain", entries, queue)
