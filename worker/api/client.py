"""A small client for Python callers that know an instance but not the host serving it.

It is a plain Celery client (JSON only, no task modules imported): tasks are sent by name,
so a caller depends on the task contract, not on dormant's code. The host queue comes from
the registry workers publish in the state Redis; an instance the registry does not know goes
to ``dormant.control``, whose worker forwards it (or answers that it is unknown).
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from worker.api import contract, resend
from worker.api.routing import Routing
from worker.core import settings as settings_mod
from worker.core import validation
from worker.core.errors import (
    DormantError,
    InvalidInput,
    InvalidTransition,
    NoWorker,
    TaskFailed,
    UnknownInstance,
    WorkerTimeout,
)
from worker.core.settings import CONTROL_QUEUE, Settings, celery_tls, queue_for_host
from worker.core.validation import quote
from worker.fleet import broker, registry
from worker.reclaim import run_store
from worker.store import keys
from worker.store.connection import for_settings
from worker.store.sentinel import SentinelOptions
from worker.transition.guards import Store

# Fail fast when the broker is down: a caller (or the CLI) wants "unavailable" in about a
# second, not after Celery's default publish retries and connection timeouts.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                        "interval_max": 0.5}
SOCKET_TIMEOUT = 5.0  # seconds for any one broker/backend socket operation
# A wait never goes silent: every WORKER_CHECK_EVERY seconds it checks that a worker still
# serves the host (NoWorker as soon as none does), and after WAIT_NOTICE_AFTER seconds it says
# what it waits for.
WORKER_CHECK_EVERY = 2.0
WAIT_NOTICE_AFTER = 3.0
CLOSED = frozenset({"done", "disabled", "dry_run", "cancelled"})  # a run's final statuses
KEPT_SENDS = 10_000  # sends kept for wait() to resend (the oldest dropped past this)


def celery_client(settings: Settings) -> Celery:
    """A JSON-only Celery client for dormant's broker and result backend."""
    kind = broker.for_url(settings.broker_url)
    backend_transport = {"visibility_timeout": settings.visibility_timeout,
                         "retry_policy": {"max_retries": 2, "interval_start": 0,
                                          "interval_step": 0.2, "interval_max": 0.5}}
    sentinel = SentinelOptions.from_settings(settings)  # sentinel:// (worker/store/sentinel.py)
    backend_transport.update(sentinel.transport_options(settings.result_backend))
    app = Celery("dormant-client", broker=settings.broker_url, backend=settings.result_backend,
                 set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=False,
        broker_connection_retry=False,
        broker_connection_max_retries=1,
        broker_connection_timeout=SOCKET_TIMEOUT,
        result_backend_transport_options=backend_transport,
        redis_socket_connect_timeout=SOCKET_TIMEOUT,
        redis_socket_timeout=SOCKET_TIMEOUT,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        result_extended=True,
        task_send_sent_event=True,  # Flower shows a task as queued as soon as it is sent
    )
    # rediss:// without these would skip certificate checks (see settings.redis_tls).
    app.conf.update(celery_tls(settings))
    # Timeouts, and on RabbitMQ quorum queues and publisher confirms (worker/fleet/broker.py).
    client_settings = kind.client_settings(settings, SOCKET_TIMEOUT)
    client_settings["broker_transport_options"] = {
        **client_settings.get("broker_transport_options", {}),
        **sentinel.transport_options(settings.broker_url)}
    app.conf.update(client_settings)
    kind.configure(app)
    return app


class Client(Routing):
    """Send dormant's tasks to the right queue and wait for their JSON results."""

    def __init__(self, app: Celery, state: redis.Redis, settings: Settings) -> None:
        self.app = app
        self.state = state
        self.settings = settings
        # What was sent, by task id, so that wait() can send it again (worker/api/resend.py).
        self._outgoing: dict[str, resend.Outgoing] = {}

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Client:
        """A client configured from the ``DORMANT_*`` environment (or the given settings)."""
        s = settings or settings_mod.get()
        return cls(celery_client(s), for_settings(s), s)

    def close(self) -> None:
        self.app.close()
        self.state.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, name: str, instance: str, kwargs: Mapping[str, Any],
              queue: str | None = None) -> AsyncResult:
        instance = validation.instance(instance)
        kwargs = dict(kwargs)
        task_id = str(uuidlib.uuid4())
        if "request_id" in kwargs and not kwargs["request_id"]:
            # A copy sent again must be the same request: name it after the first task, as
            # the worker would have (a request without an id takes its task's).
            kwargs["request_id"] = task_id
        return self.send(name, args=[instance], kwargs=kwargs,
                         queue=queue or self.queue_for(instance), task_id=task_id)

    def send(self, name: str, *, args: Sequence[Any] | None = None,
             kwargs: Mapping[str, Any] | None = None, queue: str,
             task_id: str | None = None, **options: Any) -> AsyncResult:
        """Send a task by name and keep it, so that :meth:`wait` sends it again (same
        arguments, so the same request or run id) while it goes unanswered. ``options``
        (``expires``...) go with every copy."""
        listed = list(args) if args is not None else None
        named = dict(kwargs) if kwargs is not None else None

        def copy() -> AsyncResult:
            return self.app.send_task(name, args=listed, kwargs=named, queue=queue, **options)

        first = self.app.send_task(name, args=listed, kwargs=named, queue=queue,
                                   task_id=task_id, **options)
        if len(self._outgoing) >= KEPT_SENDS:  # a caller that never waits: forget the oldest
            del self._outgoing[next(iter(self._outgoing))]
        self._outgoing[first.id] = resend.Outgoing(send=copy, copies=[first])
        return first

    # -- the task contract ----------------------------------------------------------------------
    def pause(self, instance: str, request_id: str | None = None,
              max_seconds: float | None = None) -> AsyncResult:
        return self._send(contract.PAUSE.name, instance, {
            "request_id": validation.request_id(request_id),
            "max_seconds": validation.max_seconds(max_seconds),
        })

    def unpause(self, instance: str, request_id: str | None = None) -> AsyncResult:
        return self._send(contract.UNPAUSE.name, instance,
                          {"request_id": validation.request_id(request_id)})

    def suspend(self, instance: str, request_id: str | None = None) -> AsyncResult:
        return self._send(contract.SUSPEND.name, instance,
                          {"request_id": validation.request_id(request_id)})

    def resume(self, instance: str, request_id: str | None = None) -> AsyncResult:
        return self._send(contract.RESUME.name, instance,
                          {"request_id": validation.request_id(request_id)})

    def ensure(self, instance: str, target: str, request_id: str | None = None) -> AsyncResult:
        return self._send(contract.ENSURE.name, instance, {
            "target": str(validation.target(target)),
            "request_id": validation.request_id(request_id),
        })

    def status(self, instance: str | None = None, *, host: str | None = None) -> AsyncResult:
        """One instance's state; with no instance, every guest of ``host`` (or of whichever
        worker takes it from the control queue)."""
        if instance is None:
            queue = queue_for_host(host) if host else CONTROL_QUEUE
            return self.send(contract.STATUS.name, args=[], queue=queue)
        return self._send(contract.STATUS.name, instance, {},
                          queue=queue_for_host(host) if host else None)

    def status_fleet(self) -> dict[str, AsyncResult]:
        """``dormant.status`` for every host in the registry, sent to each host's queue."""
        return {host: self.status(host=host) for host in self.hosts()}

    # -- reclamation ------------------------------------------------------------------------------
    def sample(self, host: str, *, expires: float | None = None) -> AsyncResult:
        """One activity sample of every guest of a live ``host``; not taken at all if no
        worker has started it within ``expires`` seconds (a late sample is of no use)."""
        return self.send(contract.SAMPLE.name, queue=queue_for_host(self.live_host(host)),
                         expires=expires)

    def reclaim(self, host: str, *, run_id: str, dry_run: bool = False) -> AsyncResult:
        """A reclamation run of a live ``host`` now."""
        rid = run_store.run_id(run_id)
        result = self.send(
            contract.RECLAIM.name, queue=queue_for_host(self.live_host(host)),
            kwargs={"run_id": rid, "dry_run": bool(dry_run)})
        return self._queued(result, rid, "reclaim", host)

    def _queued(self, result: AsyncResult, rid: str, kind: str, host: str) -> AsyncResult:
        """Remember the run just sent, so it can be cancelled before any worker starts it."""
        run_store.note_queued(self.state, rid, kind=kind, host=host, task_id=str(result.id),
                         at=time.time(), ttl=self.settings.reclaim_report_ttl)
        return result

    def drain(self, host: str, *, run_id: str,
              instances: list[str] | None = None) -> AsyncResult:
        """Suspend every running guest of a live ``host`` (or only ``instances``, each one
        published by that host)."""
        self.live_host(host)
        kwargs: dict[str, Any] = {"run_id": run_store.run_id(run_id)}
        if instances:
            kwargs["instances"] = [self.published(validation.instance(i), host=host)
                                   for i in instances]
        result = self.send(contract.DRAIN.name, queue=queue_for_host(host), kwargs=kwargs)
        return self._queued(result, kwargs["run_id"], "drain", host)

    def restore(self, run_id: str, *, restore_id: str) -> AsyncResult:
        """Resume what run ``run_id`` suspended, on the host that ran it (which a live worker
        must serve: NoWorker otherwise, and nothing is queued)."""
        source = self.report(run_id)
        rid = run_store.run_id(restore_id)
        host = self.live_host(source["host"])
        result = self.send(
            contract.RESTORE.name, queue=queue_for_host(host),
            kwargs={"run_id": source["run_id"], "restore_id": rid})
        return self._queued(result, rid, "restore", host)

    def cancel(self, run_id: str, *, by: str) -> dict[str, Any]:
        """Cancel a run (reclaim, drain or restore) that is queued or under way: no action
        of it starts any more; actions under way finish. A run that is over is refused
        (InvalidTransition), an unknown run id is InvalidInput."""
        rid = run_store.run_id(run_id)
        report = run_store.load(self.state, rid)
        sent = run_store.queued(self.state, rid)
        if report is None and sent is None:
            raise InvalidInput(f"unknown run id {quote(rid)}: no such run was queued or "
                               "reported")
        if report is not None and (report["status"] in CLOSED
                                   or report["done"] >= report["todo"]):
            raise InvalidTransition(
                f"run {rid} is over ({report['status']}): nothing left to cancel"
                + ("; `dormant restore` resumes what it suspended" if report.get("manifest")
                   and report.get("kind") != "restore" else ""))
        record = run_store.cancel(self.state, rid, by=by, at=time.time(),
                             ttl=self.settings.reclaim_report_ttl)
        base = report if report is not None else cast(dict[str, Any], sent)
        answer = {"run_id": rid, "kind": base.get("kind"), "host": base.get("host"),
                  "cancelled": record}
        if report is None:
            return {**answer, "status": "cancelled",
                    "reason": "cancelled before it started: when a worker takes its task "
                              f"({base.get('task_id')}), it does nothing"}
        left = report["todo"] - report["done"]
        return {**answer, "status": "cancelling",
                "reason": f"{left} action(s) not finished: those not started are skipped, "
                          f"those under way finish (`dormant reclaim report {rid}`)"}

    def report(self, run_id: str) -> dict[str, Any]:
        """A run's report, or InvalidInput for an unknown run id."""
        rid = run_store.run_id(run_id)
        found = run_store.load(self.state, rid)
        if found is None:
            raise InvalidInput(f"unknown run id {quote(rid)}: no report (reports are kept "
                               f"{self.settings.reclaim_report_ttl // 86400} days)")
        return found

    # -- reading results --------------------------------------------------------------------------
    def _watcher(self, result: AsyncResult, host: str | None, what: str,
                 timeout: float | None, notice: Callable[[str], None] | None
                 ) -> Callable[[float], None]:
        """What :meth:`wait` with ``watch`` does while copies are out: every
        WORKER_CHECK_EVERY seconds, NoWorker once no live worker serves ``host``; once, after
        WAIT_NOTICE_AFTER seconds, a note of what it waits for."""
        where = f"host {host}" if host else CONTROL_QUEUE
        checked = [0.0]
        noticed = [False]

        def poll(elapsed: float) -> None:
            if elapsed - checked[0] >= WORKER_CHECK_EVERY:
                checked[0] = elapsed
                if not self.serving(host):
                    raise NoWorker(f"no live worker serves {where} any more: "
                                   f"{what or result.id} is not done (task {result.id} stays "
                                   "queued and runs when a worker comes back)")
            if notice is not None and not noticed[0] and elapsed >= WAIT_NOTICE_AFTER:
                noticed[0] = True
                limit = f"; at most {timeout:g}s" if timeout is not None else ""
                notice(f"waiting for {what or result.id} (task {result.id}, {where}{limit})")

        return poll

    def wait(self, result: AsyncResult, timeout: float | None = 60.0, what: str = "", *,
             watch: bool = False, host: str | None = None,
             notice: Callable[[str], None] | None = None) -> Any:
        """The task's JSON result; raises the task's error (dormant's own class, or
        TaskFailed for any other), or WorkerTimeout.

        With ``watch``, the wait checks every WORKER_CHECK_EVERY seconds that a live worker
        still serves ``host`` (None: the control queue) and raises NoWorker as soon as none
        does; after WAIT_NOTICE_AFTER seconds it tells ``notice`` what it waits for.

        A task this client sent is sent again while it goes unanswered (same request id,
        ``DORMANT_RESEND_AFTER``; worker/api/resend.py): the answer of any copy counts.
        """
        outgoing = self._outgoing.pop(result.id, None)
        if outgoing is not None:
            result = resend.wait(outgoing, timeout, resend_after=self.settings.resend_after,
                                 what=what or result.id,
                                 on_poll=self._watcher(result, host, what, timeout, notice)
                                 if watch else None)
            timeout = 5.0  # it has answered: reading the answer is all that is left
            watch = False
        if not watch or timeout is None:
            try:
                return _get_result(result, timeout)
            except CeleryTimeout:
                raise WorkerTimeout(_unanswered(result, timeout, what)) from None
        started = time.monotonic()
        deadline = started + timeout
        where = f"host {host}" if host else CONTROL_QUEUE
        noticed = False
        while True:
            left = deadline - time.monotonic()
            try:
                return _get_result(result, max(min(left, WORKER_CHECK_EVERY), 0.01))
            except CeleryTimeout:
                if time.monotonic() >= deadline:
                    raise WorkerTimeout(_unanswered(result, timeout, what)) from None
            if not self.serving(host):
                raise NoWorker(f"no live worker serves {where} any more: {what or result.id} "
                               f"is not done (task {result.id} stays queued and runs when a "
                               "worker comes back)")
            if notice is not None and not noticed and \
                    time.monotonic() - started >= WAIT_NOTICE_AFTER:
                noticed = True
                notice(f"waiting for {what or result.id} (task {result.id}, {where}; at most "
                       f"{timeout:g}s)")

    def journal(self, instance: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """Journal entries of one instance, oldest first (a name is resolved to its UUID).

        Requests that failed before the name resolved are journaled under the name, so an
        unresolved name reads that stream instead.
        """
        key = validation.instance(instance)
        uuid, host = registry.resolve(self.state, key)
        store = Store(self.state, lock_ttl=self.settings.lock_ttl,
                      result_ttl=self.settings.result_ttl)
        entries = store.journal(uuid or key, count=limit)
        if not entries and host is None:
            raise UnknownInstance(
                f"unknown instance {quote(instance)}: no worker serves it and it has no journal"
            )
        return entries


    def recorded(self, uuids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The newest journal entries of each instance (newest first), in one round trip:
        what :func:`worker.drift.policy.last_known` reads the last recorded state from."""
        uuids = list(uuids)
        with self.state.pipeline(transaction=False) as pipe:
            for uuid in uuids:
                pipe.xrevrange(keys.journal(uuid), count=20)
            replies = pipe.execute()
        return {uuid: [json.loads(fields["entry"]) for _id, fields in rows]
                for uuid, rows in zip(uuids, replies, strict=True)}


def _infrastructure(exc: BaseException) -> bool:
    """A broker/backend/state-store failure (not an error the task raised)."""
    from kombu.exceptions import OperationalError

    return isinstance(exc, OperationalError | redis.RedisError | OSError | RuntimeError)


def _unanswered(result: AsyncResult, timeout: float | None, what: str) -> str:
    return (f"no worker answered {what or result.id} within {timeout:g}s (task "
            f"{result.id} stays queued and may still run)")


def _get_result(result: AsyncResult, timeout: float | None) -> Any:
    """The result, or the task's error translated; Celery's TimeoutError passes through."""
    try:
        return result.get(timeout=timeout, propagate=True, interval=0.05)
    except (CeleryTimeout, DormantError):
        raise
    except Exception as exc:
        if _infrastructure(exc):
            raise
        raise TaskFailed(f"{type(exc).__name__}: {exc}") from exc
