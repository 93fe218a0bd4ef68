"""``dormant reclaim|idle|sample|exempt|unexempt|kill-switch|drain|restore|cancel``.

Runs are carried out by the host's worker (``dormant.reclaim``, ``dormant.drain``,
``dormant.restore``); these commands start one under a run id of its own (worker/run_store.py),
follow its report in the state Redis until it is finished, and print it. Progress goes to
stderr, so ``--json`` output stays one document. A command that needs a worker checks first
that a live one serves the host, and keeps checking while it waits. ``dormant cancel RUN_ID``
stops a run that is queued or under way.

Exit codes as for every command (docs/cli.md): 0 done; 1 some action failed (see the
report); 2 bad input, an unknown instance, host or run id (checked before anything is
queued); 3 unavailable, no live worker serves the host, or none answered in time.
"""

from __future__ import annotations

import datetime as dt
import getpass
import time
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.api.client import WAIT_NOTICE_AFTER, WORKER_CHECK_EVERY, Client
from worker.cli.common import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    SECONDS,
    emit,
    fail,
    handles_errors,
    json_option,
    main,
    note,
    stderr,
    warn_error,
)
from worker.core import validation
from worker.core.errors import NoWorker, WorkerTimeout
from worker.fleet import registry
from worker.reclaim import exemptions, idle, killswitch, run_store, sampling

DEFAULT_TIMEOUT = 600.0  # seconds to follow a run (a capped batch of saves, a few s each)
ENTRY_COLUMNS = ("host", "name", "instance", "verdict", "outcome", "reason")
FINISHED = {"done", "disabled", "dry_run", "duplicate", "cancelled"}


def make_client() -> Client:
    """The client every command uses; tests replace it."""
    return Client.from_settings()


def _timeout_option(fn: Any) -> Any:
    return click.option("--timeout", type=SECONDS,
                        default=DEFAULT_TIMEOUT, show_default=True,
                        help="Seconds to wait for the run to finish (exit 3 after).")(fn)


def _wait_task(client: Client, result: Any, timeout: float, what: str, host: str,
               rid: str | None = None) -> Any:
    """The task's answer; NoWorker (exit 3) as soon as no live worker serves ``host``,
    WorkerTimeout (exit 3) when none answered in time. For a run, the error says how to
    cancel it (its task stays queued)."""
    try:
        return client.wait(result, timeout, what=what, watch=True, host=host, notice=note)
    except (NoWorker, WorkerTimeout) as exc:
        if rid is None:
            raise
        raise type(exc)(f"{exc}; `dormant cancel {rid}` stops it") from None


def _started(answer: dict[str, Any], rid: str) -> dict[str, Any]:
    """The report a run's task answered with. ``duplicate`` means the run id was already
    taken by another request: that run's report is not this request's, so say so and stop."""
    if answer.get("status") == "duplicate":
        fail(f"run id {rid} was already used by another request; nothing was done for this "
             f"one (that run: `dormant reclaim report {rid}`)", EXIT_USAGE, "InvalidInput")
    return dict(answer.get("report") or answer)


def _when(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return ""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


CLOSING_GRACE = 5.0  # seconds to let the last action's worker close the run's status


def _finished(report: dict[str, Any] | None) -> bool:
    if not report:
        return False
    return report["status"] in FINISHED or report["done"] >= report["todo"]


def _closed(report: dict[str, Any] | None) -> bool:
    return bool(report) and report is not None and report["status"] in FINISHED


def _follow(client: Client, rid: str, *, deadline: float, progress: Progress | None = None,
            task: Any = None) -> dict[str, Any]:
    """Poll the run's report until it is finished; exit 3 at the deadline, or as soon as no
    live worker serves the run's host (its actions wait for one).

    Every action recorded is not yet the run closed: its status and counts follow a moment
    later, so wait up to CLOSING_GRACE for them (a worker that died in between leaves the
    status open; the report is printed as it is then)."""
    all_recorded: float | None = None
    started = time.monotonic()
    next_check = started + WORKER_CHECK_EVERY
    noticed = progress is not None  # a progress bar says it already
    while True:
        report = run_store.load(client.state, rid)
        if progress is not None and report is not None:
            progress.update(task, total=max(report["todo"], 1), completed=report["done"])
        if _finished(report):
            assert report is not None
            all_recorded = time.monotonic() if all_recorded is None else all_recorded
            if _closed(report) or time.monotonic() - all_recorded >= CLOSING_GRACE:
                return report
        if time.monotonic() >= deadline:
            fail(f"run {rid} is still going; see `dormant reclaim report {rid}` "
                 f"(`dormant cancel {rid}` stops it)", EXIT_UNAVAILABLE, "WorkerTimeout")
        if report is not None and not noticed and time.monotonic() - started >= \
                WAIT_NOTICE_AFTER:
            noticed = True
            note(f"waiting for run {rid} on host {report['host']} to finish "
                 f"({report['done']} of {report['todo']} action(s) done)")
        if report is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + WORKER_CHECK_EVERY
            if not client.serving(report["host"]):
                fail(f"no live worker serves host {report['host']} any more: run {rid} is "
                     f"not finished ({report['done']} of {report['todo']} action(s)); it goes "
                     f"on when a worker comes back (`dormant cancel {rid}` stops it)",
                     EXIT_UNAVAILABLE, "NoWorker")
        time.sleep(0.2)  # polling the report the worker writes


def _rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "host": r["host"], "reason": e.get("error") or e.get("reason")}
            for r in reports for e in r.get("entries", [])]


def _show(reports: list[dict[str, Any]], as_json: bool) -> None:
    """Print runs (table or JSON); exit 1 when any action failed."""
    if as_json:
        emit({"runs": reports}, as_json=True)
    else:
        for r in reports:
            stderr.print(f"run {r['run_id']} ({r['kind']}, host {r['host']}): {r['status']} "
                         f"- {r.get('reason', '')}", soft_wrap=True, markup=False)
        emit(_rows(reports), as_json=False, columns=ENTRY_COLUMNS)
    failed = [e for r in reports for e in r.get("entries", []) if e.get("outcome") == "failed"]
    if failed:
        fail(f"{len(failed)} action(s) failed: " + "; ".join(
            f"{e.get('name') or e['instance']}: {e.get('error')}" for e in failed), EXIT_FAILED,
            "RunFailed")


def _hosts(client: Client, hosts: tuple[str, ...]) -> tuple[list[str], int]:
    """(the hosts to act on, the exit code so far).

    Hosts asked for must each be served by a live worker: an unknown one exits 2, one whose
    worker is gone exits 3 (NoWorker), before anything is queued. Without ``--host``: every
    host in the registry that a live worker serves; each one without gets an error line
    (NoWorker) and makes the exit code 3; none at all exits 3 at once."""
    if hosts:
        return [client.live_host(h) for h in hosts], 0
    known = client.hosts()
    if not known:
        fail("no host has published to the registry; is a worker running?", EXIT_UNAVAILABLE,
             "NoWorker")
    serving = client.workers_of(known)
    live = [h for h in known if serving[h]]
    if not live:
        fail(f"no live worker serves any host (known: {', '.join(known)}); is a worker "
             "running?", EXIT_UNAVAILABLE, "NoWorker")
    for host in known:
        if not serving[host]:
            warn_error(f"NoWorker: no live worker serves host {host}: skipped")
    return live, (EXIT_UNAVAILABLE if len(live) < len(known) else 0)


@main.group(invoke_without_command=True)
@click.option("--dry-run", is_flag=True, help="Decide and report; change nothing.")
@click.option("--host", "hosts", multiple=True, help="Only this host (repeatable; default all).")
@_timeout_option
@json_option
@click.pass_context
@handles_errors
def reclaim(ctx: click.Context, dry_run: bool, hosts: tuple[str, ...], timeout: float,
            as_json: bool) -> None:
    """Run a reclamation now and print every decision (use --dry-run to change nothing)."""
    if ctx.invoked_subcommand is not None:
        return
    deadline = time.monotonic() + timeout
    with make_client() as client:
        now = time.time()
        chosen, code = _hosts(client, hosts)
        sent = {}
        for host in chosen:
            rid = run_store.manual_id(host, now, dry_run=dry_run)
            sent[host] = (rid, client.reclaim(host, run_id=rid, dry_run=dry_run))
        reports = []
        for host, (rid, result) in sent.items():
            answer = _wait_task(client, result, max(deadline - time.monotonic(), 1),
                                f"reclamation {rid}", host, rid)
            report = _started(answer, rid)
            if not _closed(report):
                report = _follow(client, rid, deadline=deadline)
            reports.append(report)
    _show(reports, as_json)
    if code:
        raise SystemExit(code)


@reclaim.command("report")
@click.argument("run_id", required=False)
@json_option
@handles_errors
def report(run_id: str | None, as_json: bool) -> None:
    """Show a run's report: any run (reclaim, drain, restore) by RUN_ID, or the newest
    reclamation when RUN_ID is left out."""
    with make_client() as client:
        if run_id is None:
            newest = run_store.latest_of_kind(client.state, "reclaim")
            if newest is None:
                fail("no reclamation run has been recorded yet: nothing to show (a drain or "
                     "restore: give its RUN_ID)", EXIT_USAGE, "InvalidInput")
            run_id = newest
        rid = run_store.run_id(run_id)
        sent = run_store.queued(client.state, rid)
        found = run_store.load(client.state, rid)
        if found is None and sent is not None:  # queued, no worker has started it yet
            stopped = run_store.cancelled(client.state, rid)
            found = {**sent, "status": "cancelled" if stopped else "queued", "todo": 0,
                     "done": 0, "entries": [], "manifest": [],
                     "reason": run_store.cancel_reason(stopped) if stopped else
                     f"queued for host {sent['host']} (task {sent['task_id']}); no worker "
                     "has started it yet"}
        found = found or client.report(rid)
    _show([found], as_json)


def _uuid(client: Client, instance: str) -> str:
    """The UUID of an instance some worker has published (else UnknownInstance, exit 2)."""
    return client.published(validation.instance(instance, "INSTANCE"))


@main.command("idle")
@click.argument("instance", required=False)
@json_option
@handles_errors
def idle_cmd(instance: str | None, as_json: bool) -> None:
    """Show the idle decision and the numbers behind it, for one instance or every one.

    The numbers come from the samples a live worker keeps taking: a guest whose host no live
    worker serves is not shown (NoWorker, exit 3; the others are)."""
    code = 0
    with make_client() as client:
        s = client.settings
        if instance is not None:
            uuid = _uuid(client, instance)
            host = client.require_worker(uuid) or ""
            names = {uuid: (instance, host)}
        else:
            hosts, code = _hosts(client, ())
            names = {u: (n, h) for h in hosts
                     for u, n in registry.instances_of(client.state, h).items()}
        now = time.time()
        policy = idle.IdlePolicy.from_settings(s)
        history = sampling.load(client.state, names, since=now - s.idle_window)
        exempt = exemptions.members(client.state)
    rows = []
    for uuid, (name, host) in sorted(names.items(), key=lambda kv: kv[1]):
        d = idle.decide(uuid, history.get(uuid, []), policy, now=now)
        rows.append({**d.as_dict(), "name": name, "host": host, "exempt_cli": uuid in exempt,
                     "cpu_percent": d.numbers.get("cpu_percent_at_quantile"),
                     "intervals": d.numbers.get("intervals")})
    emit(rows, as_json=as_json,
         columns=("host", "name", "idle", "cpu_percent", "intervals", "exempt_cli", "reason"))
    if code:
        raise SystemExit(code)


@main.command()
@click.option("--host", "hosts", multiple=True, help="Only this host (repeatable; default all).")
@_timeout_option
@json_option
@handles_errors
def sample(hosts: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Take one activity sample on each host now (a sample no worker has started within
    --timeout is dropped: it is never taken late)."""
    deadline = time.monotonic() + timeout
    with make_client() as client:
        chosen, code = _hosts(client, hosts)
        sent = {h: client.sample(h, expires=timeout) for h in chosen}
        rows = [_wait_task(client, r, max(deadline - time.monotonic(), 1), f"the sample of {h}",
                           h) for h, r in sent.items()]
    if not as_json:  # a table shows a readable time; JSON keeps the epoch seconds
        rows = [{**r, "at": _when(r.get("at"))} for r in rows]
    emit(rows, as_json=as_json, columns=("host", "stored", "at"))
    if code:
        raise SystemExit(code)


@main.command()
@click.argument("instance")
@json_option
@handles_errors
def exempt(instance: str, as_json: bool) -> None:
    """Never reclaim INSTANCE (until `dormant unexempt`)."""
    with make_client() as client:
        uuid = _uuid(client, instance)
        added = exemptions.add(client.state, uuid)
    emit({"instance": uuid, "exempt": True, "changed": added}, as_json=as_json)


@main.command()
@click.argument("instance")
@json_option
@handles_errors
def unexempt(instance: str, as_json: bool) -> None:
    """Let reclamation consider INSTANCE again."""
    with make_client() as client:
        uuid = _uuid(client, instance)
        removed = exemptions.remove(client.state, uuid)
    emit({"instance": uuid, "exempt": False, "changed": removed}, as_json=as_json)


@main.command("kill-switch")
@click.argument("action", type=click.Choice(["on", "off", "status"]), default="status")
@json_option
@handles_errors
def kill_switch(action: str, as_json: bool) -> None:
    """Stop every reclamation (on), allow it again (off), or show the switch (status, also
    with no ACTION).

    The switch is the fleet's, in Redis. A worker started with DORMANT_RECLAIM_ENABLED=false
    does not reclaim whatever it says (its run reports say so); this command's own setting
    plays no part."""
    with make_client() as client:
        if action != "status":
            killswitch.turn(client.state, action == "on", by=getpass.getuser(),
                            now=time.time())
        reason = killswitch.disabled_reason(client.state, enabled_setting=True)
        switch = killswitch.read(client.state)
    emit({"reclamation": "disabled" if reason else "enabled", "reason": reason,
          "redis": switch}, as_json=as_json, columns=("reclamation", "reason"))


def _run_with_progress(client: Client, result: Any, rid: str, host: str, label: str,
                       timeout: float, as_json: bool) -> None:
    deadline = time.monotonic() + timeout
    planned = _started(_wait_task(client, result, timeout, f"{label} ({rid})", host, rid), rid)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=False) as progress:
        bar = progress.add_task(label, total=max(planned.get("todo", 0), 1))
        report = _follow(client, rid, deadline=deadline, progress=progress, task=bar)
    _show([report], as_json)


@main.command()
@click.argument("host")
@click.option("--instance", "instances", multiple=True,
              help="Only this guest (name or UUID; repeatable). Default: every running guest.")
@_timeout_option
@json_option
@handles_errors
def drain(host: str, instances: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Suspend every running guest of HOST (maintenance); `dormant restore RUN_ID` undoes it.

    HOST must be served by a live worker and each --instance published by it: otherwise it
    exits at once, naming the live hosts (2: a host or instance never published; 3,
    NoWorker: HOST's worker is gone), and nothing is queued."""
    wanted = [validation.instance(i, "--instance") for i in instances]
    with make_client() as client:
        rid = run_store.drain_id(host, time.time())
        result = client.drain(host, run_id=rid, instances=wanted or None)
        _run_with_progress(client, result, rid, host, f"draining {host}", timeout, as_json)


@main.command()
@click.argument("run_id")
@_timeout_option
@json_option
@handles_errors
def restore(run_id: str, timeout: float, as_json: bool) -> None:
    """Resume exactly what run RUN_ID suspended; skip what is running or gone."""
    rid = run_store.run_id(run_id)
    with make_client() as client:
        restore_rid = run_store.restore_id(rid, time.time())
        result = client.restore(rid, restore_id=restore_rid)
        host = client.report(rid)["host"]
        _run_with_progress(client, result, restore_rid, host, f"restoring {rid}", timeout,
                           as_json)


@main.command()
@click.argument("run_id")
@json_option
@handles_errors
def cancel(run_id: str, as_json: bool) -> None:
    """Cancel run RUN_ID (reclaim, drain or restore), queued or under way: no action of it
    starts any more; those under way finish. A run that is over cannot be cancelled (exit 1;
    `dormant restore` undoes what it suspended)."""
    rid = run_store.run_id(run_id)
    with make_client() as client:
        answer = client.cancel(rid, by=getpass.getuser())
    emit(answer, as_json=as_json, columns=("run_id", "kind", "host", "status", "reason"))
