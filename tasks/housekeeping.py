"""Status reads and the health-check ping (the registry refresh and the auto-unpause
deadlines run on worker timers: see tasks/timers.py)."""

from __future__ import annotations

from typing import Any

from tasks.base import DormantTask
from tasks.celery_app import app
from tasks.context import context
from tasks.transitions import TransitionTask
from worker.api import contract
from worker.core import validation
from worker.core.errors import UnknownInstance


def _describe(guest: Any, observed: Any, host: str) -> dict[str, Any]:
    return {
        "instance": guest.uuid,
        "name": guest.name,
        "host": host,
        "state": str(observed.state),
        "reason": observed.reason,
    }


@app.task(base=TransitionTask, shared=False, bind=True, name=contract.STATUS.name)
def status(self: TransitionTask, instance: Any = None) -> dict[str, Any] | list[dict[str, Any]]:
    """One instance's real state, or every instance of this host when none is given."""
    ctx = context()
    if instance is None:
        rows = []
        for each in ctx.hypervisor.guests():
            try:
                rows.append(_describe(each, each.observe(), ctx.host))
            except UnknownInstance:
                continue  # undefined between the listing and the read: no longer here
        return rows
    self.forward_if_elsewhere(instance)
    key = validation.instance(instance)
    guest, observed = ctx.hypervisor.observe(key)
    if guest is None:
        raise UnknownInstance(f"unknown instance {instance!r} on host {ctx.host}")
    return _describe(guest, observed, ctx.host)


@app.task(base=DormantTask, shared=False, name=contract.PING.name)
def ping() -> dict[str, Any]:
    """Which worker process answered, for health checks and the test harness."""
    import os
    import socket

    return {"host": context().host, "pid": os.getpid(), "hostname": socket.gethostname()}
