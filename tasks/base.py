"""The base of every dormant task: the contract checks the call before the body runs.

A call whose argument list does not fit the task (missing, unknown or too many arguments,
or a value the contract checks) fails at once with ``InvalidInput`` naming the argument:
journaled as rejected, logged without a traceback, never retried. Transient errors are
retried with the settings' backoff; every other dormant error fails at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from tasks.context import context, settings
from tasks.delivery import KeepsMessageOnRetry
from worker.api import contract
from worker.core import metrics
from worker.core.errors import InvalidInput, PermanentError, TransientError
from worker.transition.runner import journal_rejection

log = logging.getLogger("dormant.contract")
_s = settings()


class DormantTask(KeepsMessageOnRetry, Task):
    """Checks the call against :mod:`worker.api.contract`; retries only transient errors (a retry
    the broker cannot take keeps its message: :mod:`tasks.delivery`)."""

    autoretry_for = (TransientError,)
    retry_backoff = _s.retry_backoff
    retry_backoff_max = _s.retry_backoff_max
    retry_jitter = True
    max_retries = _s.max_retries
    throws = (PermanentError,)  # expected failures: logged at INFO without a traceback
    acks_late = True
    typing = False  # the contract checks the argument list (a typed error, journaled)
    store_errors_even_if_ignored = True  # a beat task's refusal is visible to its caller

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = contract.spec(self.name).bind(args, kwargs)
        except InvalidInput as exc:
            self._reject(exc, args, kwargs)
            raise
        try:
            return self.run(**bound)
        except InvalidInput as exc:  # a value the body checks (an unknown run, ...)
            if not getattr(exc, "journaled", False):  # the runner journals its own
                self._reject(exc, args, kwargs)
            raise

    def _reject(self, exc: InvalidInput, args: Any, kwargs: Any) -> None:
        """Journal a malformed call like any other rejection (best effort: the refusal
        stands even when the state store cannot record it)."""
        spec = contract.spec(self.name)
        named = dict(zip((p.name for p in spec.params), args, strict=False))
        if isinstance(kwargs, dict):
            named.update((k, v) for k, v in kwargs.items() if isinstance(k, str))
        instance = named.get("instance")
        now = time.time()
        entry = {
            "action": spec.short, "outcome": "rejected", "task_id": self.request.id or "",
            "host": settings().host, "attempts": (self.request.retries or 0) + 1,
            "instance": None if instance is None else str(instance)[:200],
            "request_id": None if named.get("request_id") is None
            else str(named["request_id"])[:200],
            "error_type": type(exc).__name__, "error": str(exc),
            "started_at": now, "finished_at": now, "duration_ms": 0.0,
        }
        try:
            ctx = context()
            journal_rejection(ctx.store, entry, instance, ctx.hypervisor)
        except Exception as store_exc:
            log.warning("could not journal the rejected call %s: %s", self.request.id, store_exc)
        if any(p.name == "request_id" for p in spec.params):  # a transition
            metrics.transition_finished(spec.short, "rejected", 0.0)
