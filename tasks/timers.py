"""Work a worker does on its own timer, not as tasks: publishing this host's instances,
acting on due auto-unpause deadlines, and sending again what the workers sent and nobody
answered (worker/fleet/outbox.py).

Neither needs beat nor shows up in Flower as a task every few seconds. The deadlines are a
durable sorted set in the state Redis, so a deadline set by a worker that died is acted on by
whichever worker checks next; each due deadline is claimed by exactly one of them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery

from tasks.context import context, settings
from worker.api import contract, resend
from worker.core import metrics
from worker.core.settings import queue_for_host
from worker.core.validation import MAX_REQUEST_ID
from worker.fleet import outbox, registry

log = logging.getLogger("dormant.timers")


def in_background(lock: threading.Lock, name: str,
                  work: Callable[[], object]) -> threading.Thread | None:
    """Run ``work`` on a daemon thread of its own, unless its last run (holding ``lock``) is
    still going: a slow libvirtd or Redis never holds up the worker's start-up, event loop or
    timer, and runs never pile up."""
    if not lock.acquire(blocking=False):
        return None

    def run() -> None:
        try:
            work()
        finally:
            lock.release()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


_refreshing = threading.Lock()
_stuck: list[Any] = []  # the abandoned libvirt call of the last refresh, while outstanding


def refresh_registry_now() -> None:
    """Publish this host's instances; never raise into the worker's timer.

    While the libvirt call a previous refresh abandoned is still outstanding (a domain whose
    lock libvirtd leaked blocks listing all domains), refreshing again would only strand one
    more connection: skip until it returns.
    """
    if _stuck and not _stuck[0].done():
        log.warning("registry refresh skipped: the last one is still stuck in libvirt")
        return
    _stuck.clear()
    ctx = context()
    try:
        counts = registry.publish(ctx.store.redis, ctx.hypervisor, ctx.host,
                                  interval=settings().registry_interval)
    except Exception as exc:  # the next tick tries again
        outstanding = getattr(exc, "outstanding", None)
        if outstanding is not None:
            _stuck.append(outstanding)
        log.warning("registry refresh failed: %s", exc)
        return
    metrics.instances_observed(ctx.host, counts)


def refresh_registry_in_background() -> threading.Thread | None:
    """Refresh on a thread of its own (:func:`in_background`)."""
    return in_background(_refreshing, "dormant-registry", refresh_registry_now)


_expiring = threading.Lock()


def expire_deadlines_in_background(app: Celery) -> None:
    """Check the deadlines on a thread of its own (:func:`in_background`)."""
    in_background(_expiring, "dormant-deadlines", lambda: expire_deadlines(app))


def expire_deadlines(app: Celery, now: float | None = None) -> int:
    """Send ``dormant.unpause`` for every due deadline this worker claims; never raise."""
    ctx = context()
    sent = 0
    try:
        for due in ctx.store.claim_due_deadlines(time.time() if now is None else now):
            host = due.get("host") or registry.resolve(ctx.store.redis, due["instance"])[1]
            if not host:
                log.error("deadline for %s: no host serves it any more", due["instance"])
                continue
            request_id = f"deadline:{due.get('request_id', '')}"[:MAX_REQUEST_ID]
            send_kept(app, outbox.Entry(
                task_id=str(uuid.uuid4()), task=contract.UNPAUSE.name, args=[due["instance"]],
                kwargs={"request_id": request_id}, queue=queue_for_host(host),
                instance=due["instance"], request_id=request_id))
            log.info("auto-unpause of %s sent to %s (%s)", due["instance"], host, request_id)
            sent += 1
    except Exception as exc:  # the next tick tries again; a claimed one was already sent
        log.warning("deadline check failed: %s", exc)
    return sent


def send_kept(app: Celery, entry: outbox.Entry) -> None:
    """Send a task that must be answered, kept in the outbox first (so that a message the
    broker loses, or a send that fails here, is sent again by :func:`resend_unanswered`)."""
    ctx = context()
    outbox.keep(ctx.store.redis, entry, check_at=time.time() + settings().resend_after)
    app.send_task(entry.task, args=entry.args, kwargs=entry.kwargs, queue=entry.queue,
                  task_id=entry.task_id, ignore_result=True)  # answered by its record


_resending = threading.Lock()


def resend_unanswered_in_background(app: Celery) -> None:
    """Check the outbox on a thread of its own (:func:`in_background`)."""
    in_background(_resending, "dormant-outbox", lambda: resend_unanswered(app))


def resend_unanswered(app: Celery, now: float | None = None) -> int:
    """Send again each due outbox message that nobody answered and nothing is working on
    (worker/fleet/outbox.py); never raise. Returns how many were sent again."""
    client = context().store.redis
    first = settings().resend_after
    now = time.time() if now is None else now
    sent = 0
    try:
        for entry in outbox.due(client, now):
            if outbox.answered(client, entry):
                outbox.drop(client, entry)
            elif outbox.under_way(client, entry):
                outbox.again(client, entry, check_at=now + resend.delay(first, entry.sends))
            elif entry.sends >= outbox.MAX_SENDS:
                log.error("%s[%s] for %s: unanswered after %d copies; given up", entry.task,
                          entry.task_id, entry.instance or entry.queue, entry.sends)
                outbox.drop(client, entry)
            else:
                entry.sends += 1
                outbox.again(client, entry, check_at=now + resend.delay(first, entry.sends))
                app.send_task(entry.task, args=entry.args, kwargs=entry.kwargs,
                              queue=entry.queue, task_id=entry.task_id)
                log.warning("%s[%s] for %s: no answer, sent again (copy %d)", entry.task,
                            entry.task_id, entry.instance or entry.queue, entry.sends)
                sent += 1
    except Exception as exc:  # the next tick tries again; a claimed entry comes due again
        log.warning("outbox check failed: %s", exc)
    return sent
