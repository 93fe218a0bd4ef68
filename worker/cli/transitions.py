"""``dormant status|pause|unpause|suspend|resume|ensure|history``.

Each command validates its input before any connection (exit 2), sends one task by name
through :class:`worker.api.client.Client` and, with ``--wait``, prints the JSON result as a
table or as one JSON document. A command that waits first checks that a live worker will
take the task (else NoWorker, exit 3, nothing queued) and keeps checking while it waits.
See docs/cli.md for exit codes and examples.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from celery.result import AsyncResult

from worker.api.client import Client
from worker.cli.common import (
    EXIT_UNAVAILABLE,
    SECONDS,
    classify,
    emit,
    fail,
    handles_errors,
    json_option,
    main,
    note,
    warn_error,
)
from worker.core import validation
from worker.core.errors import NoWorker
from worker.core.states import Observed, State
from worker.drift.watcher import Known, differs, last_known

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_WAIT = 120.0  # seconds: a managed save takes ~2 s, a busy instance's lock up to 60 s
DEFAULT_STATUS_WAIT = 15.0
RESULT_COLUMNS = ("name", "instance", "action", "outcome", "state_before", "state_after",
                  "reason_after", "host", "request_id", "duration_ms")
STATUS_COLUMNS = ("name", "instance", "host", "state", "reason", "recorded")
HISTORY_COLUMNS = ("time", "action", "outcome", "state_before", "state_after", "request_id",
                   "attempts", "duration_ms", "error")


def make_client() -> Client:
    """The client every command uses; tests replace it."""
    return Client.from_settings()


def wait_for(client: Client, result: AsyncResult, timeout: float, what: str,
             host: str | None) -> Any:
    """The task's result; NoWorker (exit 3) as soon as no live worker serves ``host`` (None:
    the control queue), WorkerTimeout (exit 3) when none answered in time."""
    return client.wait(result, timeout, what=what, watch=True, host=host, notice=note)


def transition_options(fn: F) -> F:
    """Options shared by the four verbs and ``ensure``."""
    decorators = [
        click.option("--wait/--no-wait", default=False, show_default=True,
                     help="Wait for the result (otherwise print the task id and exit 0)."),
        click.option("--request-id", default=None,
                     help=f"Idempotency key (at most {validation.MAX_REQUEST_ID} characters): "
                          "the same id is carried out at most once, and only for this action "
                          "on this instance."),
        click.option("--timeout", type=SECONDS,
                     default=DEFAULT_WAIT, show_default=True,
                     help="Seconds to wait for a worker's answer (exit 3 after)."),
        json_option,
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def _send(client: Client, instance: str, wait: bool,
          send: Callable[[], AsyncResult]) -> tuple[AsyncResult, str | None]:
    """Send a transition: with ``--wait`` only when a live worker will take it (NoWorker
    otherwise, nothing queued); without, queued either way, with a note when none will yet."""
    try:
        host = client.require_worker(instance)
    except NoWorker as exc:
        if wait:
            raise
        result = send()
        note(f"task {result.id} is queued, but {exc}: it runs when a worker does")
        return result, None
    return send(), host


def _finish(client: Client, sent: tuple[AsyncResult, str | None], *, wait: bool,
            timeout: float, as_json: bool, what: str) -> None:
    result, host = sent
    if not wait:
        if as_json:
            emit({"task_id": result.id}, as_json=True)
        else:
            click.echo(result.id)
        return
    answer = wait_for(client, result, timeout, what, host)
    emit(answer, as_json=as_json, columns=RESULT_COLUMNS)


def _verb(name: str, doc: str) -> None:
    @main.command(name=name, help=doc)
    @click.argument("instance")
    @transition_options
    @handles_errors
    def command(instance: str, wait: bool, request_id: str | None, timeout: float,
                as_json: bool) -> None:
        instance = validation.instance(instance, "INSTANCE")
        request_id = validation.request_id(request_id, "--request-id")
        with make_client() as client:
            sent = _send(client, instance, wait,
                         lambda: getattr(client, name)(instance, request_id=request_id))
            _finish(client, sent, wait=wait, timeout=timeout, as_json=as_json,
                    what=f"{name} {instance}")


_verb("unpause", "Start the vCPUs of a paused INSTANCE again.")
_verb("suspend", "Save INSTANCE's memory to disk and free the host (managed save).")
_verb("resume", "Restore a suspended INSTANCE from its managed-save image.")


@main.command()
@click.argument("instance")
@click.option("--max-seconds", "max_seconds_text", default=None, metavar="S",
              help="Unpause automatically after this many seconds (more than 0, at most "
                   "604800 = 7 days).")
@transition_options
@handles_errors
def pause(instance: str, max_seconds_text: str | None, wait: bool, request_id: str | None,
          timeout: float, as_json: bool) -> None:
    """Stop INSTANCE's vCPUs, keeping it in RAM."""
    instance = validation.instance(instance, "INSTANCE")
    request_id = validation.request_id(request_id, "--request-id")
    max_seconds = validation.max_seconds_text(max_seconds_text, "--max-seconds")
    with make_client() as client:
        sent = _send(client, instance, wait, lambda: client.pause(
            instance, request_id=request_id, max_seconds=max_seconds))
        _finish(client, sent, wait=wait, timeout=timeout, as_json=as_json,
                what=f"pause {instance}")


@main.command()
@click.argument("instance")
@click.argument("target")
@transition_options
@handles_errors
def ensure(instance: str, target: str, wait: bool, request_id: str | None, timeout: float,
           as_json: bool) -> None:
    """Make INSTANCE running, paused or suspended (TARGET), whatever it is now."""
    instance = validation.instance(instance, "INSTANCE")
    target = str(validation.target(target, "TARGET"))
    request_id = validation.request_id(request_id, "--request-id")
    with make_client() as client:
        sent = _send(client, instance, wait,
                     lambda: client.ensure(instance, target, request_id=request_id))
        _finish(client, sent, wait=wait, timeout=timeout, as_json=as_json,
                what=f"ensure {instance} {target}")


@main.command()
@click.argument("instances", nargs=-1)
@click.option("--timeout", type=SECONDS,
              default=DEFAULT_STATUS_WAIT, show_default=True,
              help="Seconds to wait for the workers' answers (exit 3 after).")
@json_option
@handles_errors
def status(instances: Sequence[str], timeout: float, as_json: bool) -> None:
    """The real state of INSTANCES, or of every guest of every host in the registry."""
    instances = [validation.instance(i, "INSTANCE") for i in instances]
    with make_client() as client:
        if instances:
            rows, code = _status_of(client, instances, timeout)
        else:
            rows, code = _status_of_fleet(client, timeout)
        _mark_drift(client, rows)
    if not as_json:
        rows = [{**r, "recorded": f"{r['recorded_state']} (differs)" if r.get("drift")
                 else r.get("recorded_state")} for r in rows]
    emit(rows, as_json=as_json, columns=STATUS_COLUMNS)
    if code:
        raise SystemExit(code)


def _mark_drift(client: Client, rows: list[dict[str, Any]]) -> None:
    """Add the state dormant last recorded (``recorded_state``) and whether the real one
    differs from it (``drift``) to each row of a guest dormant recorded a state for."""
    recorded = client.recorded([r["instance"] for r in rows if r.get("instance")])
    now = time.time()
    for row in rows:
        known = last_known(recorded.get(row.get("instance", ""), []), now)
        if not isinstance(known, Known):
            continue
        row["recorded_state"] = known.state
        try:
            row["drift"] = differs(known, Observed(State(str(row.get("state"))),
                                                   row.get("reason") or ""))
        except ValueError:  # a state newer than this CLI
            row["drift"] = True


def _reported(exc: Exception) -> int:
    """Print one error line for ``exc``; its exit code."""
    failed, error_type, message = classify(exc)
    warn_error(f"{error_type}: {message}")
    return failed


def _status_of(client: Client, instances: list[str],
               timeout: float) -> tuple[list[dict[str, Any]], int]:
    """Ask each instance's host (if a live worker serves it); report the failures on stderr
    and carry on."""
    pending: list[tuple[str, str | None, AsyncResult]] = []
    code = 0
    for instance in instances:
        try:
            host = client.require_worker(instance)
            pending.append((instance, host, client.status(instance)))
        except Exception as exc:
            code = max(code, _reported(exc))
    rows: list[dict[str, Any]] = []
    for instance, host, result in pending:
        try:
            rows.append(wait_for(client, result, timeout, f"status {instance}", host))
        except Exception as exc:
            code = max(code, _reported(exc))
    return rows, code


def _status_of_fleet(client: Client, timeout: float) -> tuple[list[dict[str, Any]], int]:
    hosts = client.hosts()
    if not hosts:
        fail("no worker has published to the registry: is any worker running?",
             EXIT_UNAVAILABLE, "NoWorker")
    code = 0
    pending: dict[str, AsyncResult] = {}
    for host, nodes in client.workers_of(hosts).items():
        if nodes:
            pending[host] = client.status(host=host)
        else:
            code = max(code, _reported(NoWorker(f"no live worker serves host {host}: its "
                                                "guests' state is not known")))
    rows: list[dict[str, Any]] = []
    for host, result in pending.items():
        try:
            rows.extend(wait_for(client, result, timeout, f"status of host {host}", host))
        except Exception as exc:
            code = max(code, _reported(exc))
    rows.sort(key=lambda r: (r.get("host") or "", r.get("name") or ""))
    return rows, code


@main.command()
@click.argument("instance")
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=50,
              show_default=True, help="Newest entries to show.")
@json_option
@handles_errors
def history(instance: str, limit: int, as_json: bool) -> None:
    """INSTANCE's journal, oldest first: every transition, refusal and failure."""
    instance = validation.instance(instance, "INSTANCE")
    with make_client() as client:
        entries = client.journal(instance, limit=limit)
    if as_json:
        emit(entries, as_json=True)
        return
    rows = [{**e, "time": _when(e.get("finished_at") or e.get("started_at")),
             "action": e.get("action") or _outside(e),
             "error": e.get("error_type") or e.get("note")} for e in entries]
    emit(rows, as_json=False, columns=HISTORY_COLUMNS,
         title=f"history of {instance}" if rows else None)


def _outside(entry: dict[str, Any]) -> str:
    """What an ``external`` entry's action column says: libvirt's event, or reconciliation."""
    if entry.get("event"):
        return f"{entry['event']}/{entry.get('detail')}"
    return str(entry.get("source") or "")


def _when(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return ""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


