"""A small client for Python callers that know an instance but not the host serving it.

It is a plain Celery client (JSON only, no task modules imported): tasks are sent by name,
so a caller depends on the task contract, not on dormant's code. The host queue comes from
the registry workers publish in the state Redis; an instance the registry does not know goes
to ``dormant.control``, whose worker forwards it (or answers that it is unknown).
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from worker.api import contract, resend
from worker.core import settings as settings_mod
from worker.core import validation
from worker.core.errors import (
    DormantError,
    InvalidInput,
    TaskFailed,
    UnknownInstance,
    WorkerTimeout,
)
from worker.core.settings import CONTROL_QUEUE, Settings, celery_tls, queue_for_host
from worker.core.validation import quote
from worker.fleet import registry
from worker.fleet.registry import TTL_INTERVALS
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
KEPT_SENDS = 10_000  # sends kept for wait() to resend (the oldest dropped past this)


def celery_client(settings: Settings) -> Celery:
    """A JSON-only Celery client for dormant's broker and result backend."""
    transport = {"visibility_timeout": settings.visibility_timeout,
                 "socket_connect_timeout": SOCKET_TIMEOUT, "socket_timeout": SOCKET_TIMEOUT,
                 "max_retries": 1}
    backend_transport = {"visibility_timeout": settings.visibility_timeout,
                         "retry_policy": {"max_retries": 2, "interval_start": 0,
                                          "interval_step": 0.2, "interval_max": 0.5}}
    sentinel = SentinelOptions.from_settings(settings)  # sentinel:// (worker/store/sentinel.py)
    transport.update(sentinel.transport_options(settings.broker_url))
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
        broker_transport_options=transport,
        result_backend_transport_options=backend_transport,
        redis_socket_connect_timeout=SOCKET_TIMEOUT,
        redis_socket_timeout=SOCKET_TIMEOUT,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        result_extended=True,
        task_send_sent_event=True,  # Flower shows a task as queued as soon as it is sent
    )
    # rediss:// without these would skip certificate checks (see settings.redis_tls).
    app.conf.update(celery_tls(settings))
    return app


class Client:
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

    # -- routing ------------------------------------------------------------------------------
    def locate(self, instance: str) -> tuple[str | None, str | None]:
        """(uuid, host) from the registry; Nones when no worker has published the instance."""
        return registry.resolve(self.state, validation.instance(instance))

    def queue_for(self, instance: str) -> str:
        """The host queue serving ``instance``, or the control queue when it is unknown."""
        _uuid, host = self.locate(instance)
        return queue_for_host(host) if host else CONTROL_QUEUE

    def hosts(self) -> list[str]:
        """Hosts whose workers published to the registry within its lifetime."""
        max_age = self.settings.registry_interval * TTL_INTERVALS
        return sorted(registry.hosts(self.state, max_age=max_age))

    def live_host(self, host: str) -> str:
        """``host`` when a live worker serves it; InvalidInput naming the live hosts if not
        (so nothing is queued for a worker that may never exist)."""
        live = self.hosts()
        if host not in live:
            known = ", ".join(live) if live else "none (is any worker running?)"
            raise InvalidInput(f"unknown host {quote(host)}: no live worker serves it; "
                               f"live hosts: {known}")
        return host

    def published(self, instance: str, *, host: str | None = None) -> str:
        """The UUID of an instance some worker (of ``host``) has published, or
        UnknownInstance."""
        uuid, where = self.locate(instance)
        if uuid is None or where is None:
            raise UnknownInstance(f"unknown instance {quote(instance)}: no worker has "
                                  "published it")
        if host is not None and where != host:
            raise UnknownInstance(f"instance {quote(instance)} is on host {where}, "
                                  f"not {host}")
        return uuid

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
             task_id: str | None = None) -> AsyncResult:
        """Send a task by name and keep it, so that :meth:`wait` sends it again (same
        arguments, so the same request or run id) while it goes unanswered."""
        listed = list(args) if args is not None else None
        named = dict(kwargs) if kwargs is not None else None

        def copy() -> AsyncResult:
            return self.app.send_task(name, args=listed, kwargs=named, queue=queue)

        first = self.app.send_task(name, args=listed, kwargs=named, queue=queue,
                                   task_id=task_id)
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
    def sample(self, host: str) -> AsyncResult:
        """One activity sample of every guest of a live ``host``."""
        return self.send(contract.SAMPLE.name, queue=queue_for_host(self.live_host(host)))

    def reclaim(self, host: str, *, run_id: str, dry_run: bool = False) -> AsyncResult:
        """A reclamation run of a live ``host`` now."""
        return self.send(
            contract.RECLAIM.name, queue=queue_for_host(self.live_host(host)),
            kwargs={"run_id": run_store.run_id(run_id), "dry_run": bool(dry_run)})

    def drain(self, host: str, *, run_id: str,
              instances: list[str] | None = None) -> AsyncResult:
        """Suspend every running guest of a live ``host`` (or only ``instances``, each one
        published by that host)."""
        self.live_host(host)
        kwargs: dict[str, Any] = {"run_id": run_store.run_id(run_id)}
        if instances:
            kwargs["instances"] = [self.published(validation.instance(i), host=host)
                                   for i in instances]
        return self.send(contract.DRAIN.name, queue=queue_for_host(host), kwargs=kwargs)

    def restore(self, run_id: str, *, restore_id: str) -> AsyncResult:
        """Resume what run ``run_id`` suspended, on the host that ran it."""
        source = self.report(run_id)
        return self.send(
            contract.RESTORE.name, queue=queue_for_host(source["host"]),
            kwargs={"run_id": source["run_id"], "restore_id": run_store.run_id(restore_id)})

    def report(self, run_id: str) -> dict[str, Any]:
        """A run's report, or InvalidInput for an unknown run id."""
        rid = run_store.run_id(run_id)
        found = run_store.load(self.state, rid)
        if found is None:
            raise InvalidInput(f"unknown run id {quote(rid)}: no report (reports are kept "
                               f"{self.settings.reclaim_report_ttl // 86400} days)")
        return found

    # -- reading results --------------------------------------------------------------------------
    def wait(self, result: AsyncResult, timeout: float | None = 60.0, what: str = "") -> Any:
        """The task's JSON result; raises the task's error (dormant's own class, or
        TaskFailed for any other), or WorkerTimeout.

        A task this client sent is sent again while it goes unanswered (same request id,
        ``DORMANT_RESEND_AFTER``; worker/api/resend.py): the answer of any copy counts.
        """
        outgoing = self._outgoing.pop(result.id, None)
        if outgoing is not None:
            result = resend.wait(outgoing, timeout, resend_after=self.settings.resend_after,
                                 what=what or result.id)
            timeout = 5.0  # it has answered: reading the answer is all that is left
        try:
            return result.get(timeout=timeout, propagate=True, interval=0.05)
        except CeleryTimeout:
            raise WorkerTimeout(
                f"no worker answered {what or result.id} within {timeout:g}s (task "
                f"{result.id} stays queued and may still run)") from None
        except DormantError:
            raise
        except Exception as exc:
            if _infrastructure(exc):
                raise
            raise TaskFailed(f"{type(exc).__name__}: {exc}") from exc

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
