"""Letting go of a guest's lock: across a short state-store outage, or once an abandoned libvirt
call has returned (until then the guest stays locked, so nothing acts on it mid-call)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker.core.errors import DormantError, StateStoreUnavailable
from worker.transition.context import Context
from worker.transition.guards import Held

log = logging.getLogger("dormant.transition")


def patiently(held: Held | None, finish: Callable[[], None], patience: float) -> None:
    """Release a held lock even across a short state-store outage (the retry would otherwise
    wait for the lock's TTL); without a lock, one try."""
    deadline = time.monotonic() + (patience if held is not None else 0)
    pause = 0.1
    while True:
        try:
            return finish()
        except StateStoreUnavailable:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


class Release:
    """Unlock a guest once the libvirt call a task abandoned has returned, and journal it."""

    def __init__(self, ctx: Context, held: Held, entry: dict[str, Any], call: str) -> None:
        self.ctx, self.held, self.entry, self.call = ctx, held, entry, call
        self.since = time.monotonic()

    def __call__(self, future: Any) -> None:
        if future.cancelled():
            returned = "never started"
        elif future.exception() is not None:
            returned = f"raised {future.exception()}"
        else:
            returned = "returned"
        entry = {**self.entry, "outcome": "released", "call": self.call,
                 "call_returned": returned,
                 "seconds_after_abandon": round(time.monotonic() - self.since, 3),
                 "finished_at": self.ctx.clock()}
        entry.pop("lock", None)
        try:
            self.ctx.store.finish(self.held, instance=self.held.instance,
                                  request_id=entry.get("request_id") or "", entry=entry,
                                  record=None)
        except DormantError as exc:  # the lock lapses by its TTL: the keeper dropped it
            log.error("could not release %s after the abandoned call: %s",
                      self.held.instance, exc)
            return
        log.warning("%s: abandoned libvirt call %s; lock released",
                    self.held.instance, returned, extra={"dormant": log_fields(entry)})


def log_fields(entry: dict[str, Any]) -> dict[str, Any]:
    wanted = ("instance", "name", "request_id", "task_id", "host", "action", "attempts",
              "outcome", "state_before", "reason_before", "state_after", "reason_after",
              "duration_ms", "error_type")
    return {k: entry.get(k) for k in wanted if entry.get(k) is not None}
