"""Status reads, the registry refresh and the auto-unpause deadlines."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from tasks.celery_app import app
from tasks.context import context, settings
from tasks.transitions import TransitionTask
from worker import metrics, registry, validation
from worker.errors import UnknownInstance
from worker.settings import queue_for_host

log = logging.getLogger("dormant.housekeeping")


def _describe(guest: Any, observed: Any, host: str) -> dict[str, Any]:
    return {
        "instance": guest.uuid,
        "name": guest.name,
        "host": host,
        "state": str(observed.state),
        "reason": observed.reason,
    }


@app.task(base=TransitionTask, bind=True, name="dormant.status", max_retries=3)
def status(self: TransitionTask, instance: Any = None) -> dict[str, Any] | list[dict[str, Any]]:
    """One instance's real state, or every instance of this host when none is given."""
    ctx = context()
    if instance is None:
        rows = []
        for guest in ctx.hypervisor.guests():
            try:
                rows.append(_describe(guest, guest.observe(), ctx.host))
            except UnknownInstance:
                continue  # undefined between the listing and the read: no longer here
        return rows
    self.forward_if_elsewhere(instance)
    key = validation.instance(instance)
    guest, observed = ctx.hypervisor.observe(key)
    if guest is None:
        raise UnknownInstance(f"unknown instance {instance!r} on host {ctx.host}")
    return _describe(guest, observed, ctx.host)


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
    """Refresh on a thread of its own, so a slow or hung libvirtd never holds up the worker's
    start-up, its event loop or its timer; at most one refresh runs at a time."""
    if not _refreshing.acquire(blocking=False):
        return None

    def refresh() -> None:
        try:
            refresh_registry_now()
        finally:
            _refreshing.release()

    thread = threading.Thread(target=refresh, name="dormant-registry", daemon=True)
    thread.start()
    return thread


@app.task(name="dormant.expire_pauses", ignore_result=True)
def expire_pauses() -> int:
    """Unpause guests whose pause deadline passed, even if the pausing worker died."""
    ctx = context()
    sent = 0
    for due in ctx.store.claim_due_deadlines(time.time()):
        host = due.get("host") or registry.resolve(ctx.store.redis, due["instance"])[1]
        if not host:
            log.error("deadline for %s: no host serves it any more", due["instance"])
            continue
        app.send_task(
            "dormant.unpause",
            args=[due["instance"]],
            kwargs={"request_id": f"deadline:{due.get('request_id', '')}"[:128]},
            queue=queue_for_host(host),
        )
        sent += 1
    return sent


@app.task(name="dormant.ping")
def ping() -> dict[str, Any]:
    """Which worker process answered, for health checks and the test harness."""
    import os
    import socket

    return {"host": context().host, "pid": os.getpid(), "hostname": socket.gethostname()}
