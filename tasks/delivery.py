"""No message is dropped because the broker went away: retries and acknowledgements.

``KeepsMessageOnRetry``: Celery publishes a retry as a new message and, when that publish
fails (broker down), raises ``Reject(requeue=False)`` — the original message would be
acknowledged away (or, if the reject cannot reach the broker either, wait for the visibility
timeout). Instead the task keeps its (unacknowledged) message and publishes again until the
broker answers, so the retry runs within seconds of the broker coming back; past
``RETRY_PUBLISH_PATIENCE`` it rejects *with* requeue.

``Request``: acknowledging a message whose broker channel a reconnect has closed.

When the Redis broker connection drops, Celery reconnects with new channels while
transitions keep running in the pool. Their message still points at the old, closed channel:
kombu 5.7 then fails the ack or reject with an AttributeError (not a connection error), which
stops the whole worker, and the message would stay in kombu's ``unacked`` hash to be run
again after the visibility timeout. This Request settles such a message through a fresh
connection instead, as its broker needs (worker/fleet/broker.py: kombu's QoS calls on Redis;
nothing on RabbitMQ, which requeued it when the channel closed).

On RabbitMQ a retry is sent back to the queue its message came from, through native delayed
delivery (the countdown waits in the broker, not in the worker).

``hold_deliveries_while_full`` (installed at worker start): a Redis broker at ``maxmemory``
(``noeviction``) refuses every command of a MULTI transaction, and kombu records each delivery
(``BRPOP``, then the message into its unacked index), each acknowledgement and each requeue in
one. Celery takes the error for unrecoverable and stops the whole worker, and a delivery
taken off its queue but never recorded is lost. With it, kombu tries again until Redis
accepts: the worker's event loop waits meanwhile (a worker can do nothing useful with a full
broker) and the message stays in hand. A result the backend refuses is stored again like one
refused by a Redis outage (``result_backend_always_retry``): otherwise Celery never finishes
that request, and its message is neither acknowledged nor restored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.exceptions import Reject
from celery.worker.request import Request as CeleryRequest

from worker.fleet import broker

log = logging.getLogger("dormant.delivery")

BROKER_FULL = (redis.exceptions.OutOfMemoryError,)  # what a Redis at maxmemory refuses with

# How long a task keeps trying to publish its retry while the broker is unreachable, and the
# longest pause between two tries (seconds).
RETRY_PUBLISH_PATIENCE = 600.0
RETRY_PUBLISH_PAUSE_MAX = 2.0
MIN_RETRY_COUNTDOWN = 1.0  # seconds; see KeepsMessageOnRetry.retry


class KeepsMessageOnRetry:
    """A Task mixin: a retry that cannot be published is never dropped (see above)."""

    Request = "tasks.delivery:Request"  # settles messages whose channel a reconnect closed

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("eta") is None and kwargs.get("countdown") is not None:
            # Full jitter can draw 0 s: the next attempt could then finish before this one has
            # sent its task-retried event, and Flower would show a failed task as RETRY.
            kwargs["countdown"] = max(kwargs["countdown"], MIN_RETRY_COUNTDOWN)
        if kwargs.get("queue") is None:
            queue = broker.current().retry_queue(
                self.request.delivery_info)  # type: ignore[attr-defined]
            if queue is not None:
                kwargs["queue"] = queue
        deadline = time.monotonic() + RETRY_PUBLISH_PATIENCE
        pause = 0.25
        while True:
            try:
                return super().retry(*args, **kwargs)  # type: ignore[misc]
            except Reject as exc:
                if exc.requeue:  # type: ignore[attr-defined]  # (celery-types lacks it)
                    raise
                if time.monotonic() >= deadline:
                    raise Reject(exc.reason, requeue=True) from None  # type: ignore[attr-defined]
                log.warning("%s[%s]: could not publish its retry (%s); trying again in %.1fs",
                            self.name, self.request.id, exc.reason, pause)  # type: ignore[attr-defined]
                time.sleep(pause)
                pause = min(pause * 2, RETRY_PUBLISH_PAUSE_MAX)


def hold_deliveries_while_full() -> None:
    """Make kombu's Redis QoS (deliveries, acks, requeues) and Celery's Redis result backend
    try again while Redis is at maxmemory (see the module docstring)."""
    from celery.backends import redis as results_redis
    from kombu.transport import redis as kombu_redis

    safe = results_redis.RedisBackend.exception_safe_to_retry
    if not getattr(safe, "holds_while_full", False):
        def exception_safe_to_retry(self: Any, exc: Exception) -> bool:
            return isinstance(exc, BROKER_FULL) or bool(safe(self, exc))

        exception_safe_to_retry.holds_while_full = True  # type: ignore[attr-defined]
        results_redis.RedisBackend.exception_safe_to_retry = (  # type: ignore[method-assign]
            exception_safe_to_retry)
    for name in ("append", "ack", "restore_by_tag"):
        original = getattr(kombu_redis.QoS, name)
        if not getattr(original, "holds_while_full", False):
            setattr(kombu_redis.QoS, name, _patiently(original, name))


def _patiently(call: Callable[..., Any], what: str) -> Callable[..., Any]:
    """``call``, tried again while the broker refuses it for want of memory."""
    def patient(*args: Any, **kwargs: Any) -> Any:
        pause = 0.1
        while True:
            try:
                return call(*args, **kwargs)
            except BROKER_FULL as exc:
                log.error("broker full: Redis refuses to record a message's %s at maxmemory "
                          "(%s); holding it and trying again in %.1fs", what, exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_PUBLISH_PAUSE_MAX)

    patient.holds_while_full = True  # type: ignore[attr-defined]
    return patient


class Request(CeleryRequest):
    """Celery's Request, except for messages whose channel is gone (see module docstring)."""

    def _orphaned(self) -> bool:
        channel = getattr(self.message, "channel", None)
        return channel is not None and getattr(channel, "connection", None) is None

    def _settle(self, *, requeue: bool | None) -> None:
        if broker.current().settle_orphaned(self.task.app, self.message.delivery_tag,
                                            requeue=bool(requeue)):
            log.info("%s[%s]: %s through a fresh broker connection (its channel closed on "
                     "reconnect)", self.task_name, self.id,
                     "requeued" if requeue else "acknowledged")
        else:
            log.info("%s[%s]: its channel closed on reconnect; the broker requeued it, and "
                     "its redelivery answers from the request's record", self.task_name,
                     self.id)

    def acknowledge(self) -> None:
        if not self.acknowledged and self._orphaned():
            try:
                self._settle(requeue=False)
            except Exception as exc:  # left unacked: redelivered later, idempotent anyway
                log.warning("%s[%s]: could not acknowledge: %s", self.task_name, self.id, exc)
            self.acknowledged = True
            return
        super().acknowledge()

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged and self._orphaned():
            try:
                self._settle(requeue=requeue)
            except Exception as exc:
                log.warning("%s[%s]: could not reject: %s", self.task_name, self.id, exc)
            self.acknowledged = True
            return
        super().reject(requeue=requeue)
