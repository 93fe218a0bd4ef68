"""``dormant reclaim|idle|sample|exempt|unexempt|kill-switch|drain|restore``.

Runs are carried out by the host's worker (``dormant.reclaim``, ``dormant.drain``,
``dormant.restore``); these commands start one, follow its report in the state Redis until it
is finished, and print it. Progress goes to stderr, so ``--json`` output stays one document.
Exit codes as for every command (docs/cli.md): 0 done; 1 some action failed (see the
report); 2 bad input, an unknown instance, host or run id (checked before anything is
queued); 3 unavailable or no worker answered in time.
"""

from __future__ import annotations

import datetime as dt
import getpass
import time
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.api.client import Client
from worker.cli.common import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    emit,
    fail,
    handles_errors,
    json_option,
    main,
    stderr,
)
from worker.core import validation
from worker.fleet import registry
from worker.reclaim import exemptions, idle, killswitch, run_store, sampling

DEFAULT_TIMEOUT = 600.0  # seconds to follow a run (a capped batch of saves, a few s each)
ENTRY_COLUMNS = ("host", "name", "instance", "verdict", "outcome", "reason")
FINISHED = {"done", "disabled", "dry_run", "duplicate"}


def make_client() -> Client:
    """The client every command uses; tests replace it."""
    return Client.from_settings()


def _timeout_option(fn: Any) -> Any:
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                        default=DEFAULT_TIMEOUT, show_default=True,
                        help="Seconds to wait for the run to finish (exit 3 after).")(fn)


def _wait_task(client: Client, result: Any, timeout: float, what: str) -> Any:
    """The task's answer; WorkerTimeout (exit 3) when no worker answered in time."""
    return client.wait(result, timeout, what=what)


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
    """Poll the run's report until it is finished; exit 3 at the deadline.

    Every action recorded is not yet the run closed: its status and counts follow a moment
    later, so wait up to CLOSING_GRACE for them (a worker that died in between leaves the
    status open; the report is printed as it is then)."""
    all_recorded: float | None = None
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
            fail(f"run {rid} is still going; see `dormant reclaim report {rid}`",
                 EXIT_UNAVAILABLE, "WorkerTimeout")
        time.sleep(0.2)


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


def _hosts(client: Client, hosts: tuple[str, ...]) -> list[str]:
    """The hosts asked for, each one served by a live worker (else exit 2), or all live."""
    chosen = [client.live_host(h) for h in hosts] or client.hosts()
    if not chosen:
        fail("no host has published to the registry; is a worker running?", EXIT_UNAVAILABLE,
             "NoWorker")
    return chosen


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
        sent = {h: client.reclaim(h, run_id=run_store.manual_id(h, now, dry_run=dry_run),
                                  dry_run=dry_run)
                for h in _hosts(client, hosts)}
        reports = []
        for host, result in sent.items():
            planned = _wait_task(client, result, max(deadline - time.monotonic(), 1),
                                 f"the reclamation of {host}")
            report = planned.get("report") or planned
            if not _closed(report):
                report = _follow(client, planned["run_id"], deadline=deadline)
            reports.append(report)
    _show(reports, as_json)


@reclaim.command("report")
@click.argument("run_id", required=False)
@json_option
@handles_errors
def report(run_id: str | None, as_json: bool) -> None:
    """Show a run's report (the newest run when RUN_ID is left out)."""
    with make_client() as client:
        if run_id is None:
            newest = run_store.latest(client.state)
            if not newest:
                fail("no run has been recorded yet: nothing to show", EXIT_USAGE)
            run_id = newest[0]
        found = client.report(run_id)
    _show([found], as_json)


def _uuid(client: Client, instance: str) -> str:
    """The UUID of an instance some worker has published (else UnknownInstance, exit 2)."""
    return client.published(validation.instance(instance, "INSTANCE"))


@main.command("idle")
@click.argument("instance", required=False)
@json_option
@handles_errors
def idle_cmd(instance: str | None, as_json: bool) -> None:
    """Show the idle decision and the numbers behind it, for one instance or every one."""
    with make_client() as client:
        s = client.settings
        if instance is not None:
            uuid = _uuid(client, instance)
            names = {uuid: (instance, registry.resolve(client.state, uuid)[1] or "")}
        else:
            names = {u: (n, h) for h in client.hosts()
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


@main.command()
@click.option("--host", "hosts", multiple=True, help="Only this host (repeatable; default all).")
@_timeout_option
@json_option
@handles_errors
def sample(hosts: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Take one activity sample on each host now."""
    with make_client() as client:
        sent = {h: client.sample(h) for h in _hosts(client, hosts)}
        rows = [_wait_task(client, r, timeout, f"the sample of {h}") for h, r in sent.items()]
    if not as_json:  # a table shows a readable time; JSON keeps the epoch seconds
        rows = [{**r, "at": _when(r.get("at"))} for r in rows]
    emit(rows, as_json=as_json, columns=("host", "stored", "at"))


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
@click.argument("action", type=click.Choice(["on", "off", "status"]))
@json_option
@handles_errors
def kill_switch(action: str, as_json: bool) -> None:
    """Stop every reclamation (on), allow it again (off), or show the switch (status)."""
    with make_client() as client:
        if action != "status":
            killswitch.turn(client.state, action == "on", by=getpass.getuser(),
                                 now=time.time())
        reason = killswitch.disabled_reason(client.state,
                                      enabled_setting=client.settings.reclaim_enabled)
        switch = killswitch.read(client.state)
    emit({"reclamation": "disabled" if reason else "enabled", "reason": reason,
          "redis": switch, "setting_enabled": client.settings.reclaim_enabled},
         as_json=as_json, columns=("reclamation", "reason"))


def _run_with_progress(client: Client, result: Any, label: str, timeout: float,
                       as_json: bool) -> None:
    deadline = time.monotonic() + timeout
    planned = _wait_task(client, result, timeout, label)
    rid = (planned.get("report") or planned)["run_id"]
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

    HOST must be served by a live worker and each --instance published by it: otherwise
    exit 2 at once (naming the live hosts) and nothing is queued."""
    wanted = [validation.instance(i, "--instance") for i in instances]
    with make_client() as client:
        result = client.drain(host, run_id=run_store.drain_id(host, time.time()),
                              instances=wanted or None)
        _run_with_progress(client, result, f"draining {host}", timeout, as_json)


@main.command()
@click.argument("run_id")
@_timeout_option
@json_option
@handles_errors
def restore(run_id: str, timeout: float, as_json: bool) -> None:
    """Resume exactly what run RUN_ID suspended; skip what is running or gone."""
    rid = run_store.run_id(run_id)
    with make_client() as client:
        result = client.restore(rid, restore_id=run_store.restore_id(rid, time.time()))
        _run_with_progress(client, result, f"restoring {rid}", timeout, as_json)
