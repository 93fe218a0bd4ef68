"""Senders that resend: a request left unanswered is sent again, with the same request id.

A Redis broker or result backend can lose a message in a failover (published, or popped by a
worker, just before the master died; a result stored just before): whoever waits for its answer
would wait for ever. So every sender dormant owns keeps what it sent and, when nothing has
answered ``DORMANT_RESEND_AFTER`` seconds later, sends the same task again (same name,
arguments and request id, a new message), then after twice that, four times... up to
:data:`CAP` times it. Request ids make every copy after the first a duplicate answered from
the record, or a wait behind the first copy's lock; never a second change.

Here: the schedule (pure) and the client side, which waits for several copies at once: the
first success answers; a failure answers unless it is transient and another copy is still
under way (a copy that found the first one holding the lock may give up with InstanceBusy
while the first succeeds). The worker side (run items, forwarded transitions, auto-unpauses)
keeps its copies in the state store: worker/fleet/outbox.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from celery.result import AsyncResult
from celery.states import READY_STATES, SUCCESS

from worker.core.errors import TransientError, WorkerTimeout

log = logging.getLogger("dormant.client")

CAP = 10  # the longest pause between two copies, in multiples of DORMANT_RESEND_AFTER
OUTAGE_PATIENCE = 30.0  # seconds a waiter rides out a result backend it cannot read


def delay(first: float, sends: int) -> float:
    """Seconds to wait for an answer after the ``sends``-th copy before sending another."""
    return float(min(first * 2 ** max(0, sends - 1), first * CAP))


@dataclass
class Outgoing:
    """One request and the copies sent for it (the newest last)."""

    send: Callable[[], AsyncResult]  # sends one more copy
    copies: list[AsyncResult]
    last_sent: float = field(default_factory=time.monotonic)

    def answer(self) -> AsyncResult | None:
        """The copy whose answer counts, or None while there is none yet (see the module)."""
        states = [(copy, copy.state) for copy in self.copies]
        for copy, state in states:
            if state == SUCCESS:
                return copy
        under_way = any(state not in READY_STATES for _copy, state in states)
        for copy, state in states:
            if state in READY_STATES and not (under_way
                                              and isinstance(copy.result, TransientError)):
                return copy
        return None


def wait(outgoing: Outgoing, timeout: float | None, *, resend_after: float, what: str,
         on_poll: Callable[[float], None] | None = None,
         clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> AsyncResult:
    """Poll the copies until one answers, sending another copy on :func:`delay`'s schedule;
    WorkerTimeout after ``timeout`` seconds (None: for ever). ``on_poll`` gets the seconds
    waited after every look without an answer (it may raise to stop waiting)."""
    started = clock()
    pause = 0.05
    failing_since: float | None = None
    while True:
        try:
            found = outgoing.answer()
            failing_since = None
        except Exception as exc:  # the result backend failing over: read again shortly
            failing_since = failing_since or clock()
            if clock() - failing_since > OUTAGE_PATIENCE:
                raise
            log.debug("could not read the results of %s: %s", what, exc)
            found = None
        if found is not None:
            return found
        now = clock()
        if on_poll is not None:
            on_poll(now - started)
        if timeout is not None and now - started >= timeout:
            raise WorkerTimeout(
                f"no worker answered {what} within {timeout:g}s (sent {len(outgoing.copies)} "
                f"time(s); the last copy, task {outgoing.copies[-1].id}, stays queued and may "
                "still run)")
        if now - outgoing.last_sent >= delay(resend_after, len(outgoing.copies)):
            try:
                outgoing.copies.append(outgoing.send())
                log.info("no answer to %s after %.0fs: sent it again (copy %d)", what,
                         now - outgoing.last_sent, len(outgoing.copies))
                outgoing.last_sent = now
            except Exception as exc:  # the broker failing over: try again in a second
                log.debug("could not send %s again: %s", what, exc)
                outgoing.last_sent = now - delay(resend_after, len(outgoing.copies)) + 1.0
        sleep(pause)
        pause = min(pause * 1.5, 0.5)
