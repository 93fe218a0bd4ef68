"""Drift policy: pure functions deciding what an event or a reconciliation should journal.

An event is checked by reading the journal first (:meth:`Store.watch_point`), then the real
state; only a state that differs from the last one dormant recorded is journaled, and only if
no transition holds or took the instance's lock meanwhile (:meth:`Store.record_external`). So
the late events of dormant's own transitions (a managed save's intermediate states, a restore)
find the journal already saying so and leave nothing. The functions here are that comparison,
the naming of libvirt's events and the shape of the journal entry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.core.states import Observed, State

log = logging.getLogger("dormant.events")

# virDomainEventType and each type's detail codes (libvirt's public ABI, libvirt-domain.h).
EVENTS = ("defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown",
          "pmsuspended", "crashed")
DETAILS: dict[str, tuple[str, ...]] = {
    "defined": ("added", "updated", "renamed", "from_snapshot"),
    "undefined": ("removed", "renamed"),
    "started": ("booted", "migrated", "restored", "from_snapshot", "wakeup", "recreated"),
    "suspended": ("paused", "migrated", "ioerror", "watchdog", "restored", "from_snapshot",
                  "api_error", "postcopy", "postcopy_failed"),
    "resumed": ("unpaused", "migrated", "from_snapshot", "postcopy", "postcopy_failed"),
    "stopped": ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
                "from_snapshot"),
    "shutdown": ("finished", "guest", "host"),
    "pmsuspended": ("memory", "disk"),
    "crashed": ("panicked", "crashloaded"),
}
# What an operator reads in ``dormant history`` for the common cases.
NOTES = {
    ("suspended", "paused"): "paused outside dormant",
    ("suspended", "ioerror"): "paused by an I/O error",
    ("suspended", "watchdog"): "paused by the watchdog",
    ("suspended", "api_error"): "paused after a hypervisor API error",
    ("resumed", "unpaused"): "resumed outside dormant",
    ("started", "booted"): "started outside dormant",
    ("started", "restored"): "restored from a saved image outside dormant",
    ("stopped", "saved"): "saved to disk (managed save) outside dormant",
    ("stopped", "destroyed"): "destroyed (forced off)",
    ("stopped", "shutdown"): "shut down",
    ("stopped", "crashed"): "crashed",
    ("stopped", "failed"): "failed to run",
    ("shutdown", "guest"): "shut down from inside the guest",
    ("shutdown", "host"): "shut down by the host",
    ("undefined", "removed"): "undefined",
    ("undefined", "renamed"): "renamed (old name)",
    ("defined", "added"): "defined",
    ("defined", "renamed"): "renamed",
}
RECONCILED = "noticed by reconciliation"
# Outcomes whose state_after is what the guest was left in.
SETTLED = frozenset({"changed", "already", "duplicate", "external"})
RETRY_GRACE = 600.0  # seconds a "retrying" entry means "a transition is still under way"


def describe(event: int, detail: int) -> tuple[str, str]:
    """libvirt's (event, detail) codes in words; unknown (newer) codes are spelled out."""
    name = EVENTS[event] if 0 <= event < len(EVENTS) else f"event_{event}"
    details = DETAILS.get(name, ())
    return name, details[detail] if 0 <= detail < len(details) else f"detail_{detail}"


def note(event: str, detail: str) -> str:
    return NOTES.get((event, detail), f"{event} ({detail})")


# Which events can leave a guest in a state, and which one tells most when several came
# together (a restore says "started/restored" then "resumed"; a boot "resumed" then
# "started/booted"; a managed save "suspended" then "stopped/saved").
_EXPLAINS = {
    "running": ("started", "resumed"),
    "paused": ("suspended",),
    "suspended": ("stopped",),
    "shutoff": ("stopped", "shutdown"),
    "missing": ("undefined",),
    "crashed": ("crashed", "stopped"),
    "pmsuspended": ("pmsuspended",),
}
_PRIORITY = ("undefined", "stopped", "started", "crashed", "pmsuspended", "suspended",
             "resumed", "shutdown", "defined")


def attribute(events: Sequence[tuple[str, str]], state: str) -> tuple[str, str] | None:
    """The (event, detail) of a burst that explains the state the guest is in now.

    The first of the most telling events that can lead to ``state``; None when none can:
    the guest has moved on since, and the event saying so is still on its way.
    """
    fitting = [e for e in events if e[0] in _EXPLAINS.get(state, ())]
    if not fitting:
        return None
    return min(fitting, key=lambda e: _PRIORITY.index(e[0]) if e[0] in _PRIORITY else 99)


# The state an event leaves a guest in, when the event alone says so for sure (None: read it).
_PAUSE_REASONS = {"paused": "user", "ioerror": "ioerror", "watchdog": "watchdog",
                  "api_error": "api_error"}
_STOPPED_OFF = frozenset({"shutdown", "destroyed", "crashed", "failed"})


def implied(event: str, detail: str) -> tuple[str, str] | None:
    """(state, reason) that ``event``/``detail`` leaves the guest in, or None if unsure."""
    if event in ("started", "resumed"):
        return ("running", "")
    if event == "suspended" and detail in _PAUSE_REASONS:
        return ("paused", _PAUSE_REASONS[detail])
    if event == "stopped" and detail == "saved":
        return ("suspended", "")
    if event == "stopped" and detail in _STOPPED_OFF:
        return ("shutoff", "")
    if event == "undefined" and detail == "removed":
        return ("missing", "")
    return None


def already_recorded(known: Known | None, events: Sequence[tuple[str, str]]) -> bool:
    """True when the burst's last event leaves the guest in the state dormant recorded: the
    common case of dormant's own transition, answered without asking libvirt."""
    if known is None or not events:
        return False
    state = implied(*events[-1])
    return state is not None and state[0] == known.state and (
        state[0] != "paused" or not known.reason or state[1] == known.reason)


@dataclass(frozen=True)
class Known:
    """The state dormant last recorded for a guest (plain state, libvirt's reason apart)."""

    state: str
    reason: str = ""


class Uncertain:
    """A transition of dormant's is still retrying: its outcome is not known yet."""


UNCERTAIN = Uncertain()


def split_state(text: str) -> tuple[str, str]:
    """``paused(user)`` -> (``paused``, ``user``); a plain ``paused`` has no reason."""
    state, _, reason = text.partition("(")
    return state, reason.rstrip(")")


def last_known(entries: Sequence[dict[str, Any]], now: float) -> Known | Uncertain | None:
    """What the newest-first journal ``entries`` say the guest was last left in.

    Failures and refusals say nothing about the state and are skipped; a recent ``retrying``
    means a transition will still journal its result. None: dormant recorded no state.
    """
    for entry in entries:
        outcome = entry.get("outcome")
        if outcome == "retrying":
            if now - float(entry.get("finished_at") or 0) < RETRY_GRACE:
                return UNCERTAIN
            continue
        if outcome in SETTLED and entry.get("state_after"):
            state, reason = split_state(str(entry["state_after"]))
            return Known(state, str(entry.get("reason_after") or reason))
    return None


def differs(known: Known | None, observed: Observed) -> bool:
    """Whether the real state is not the one recorded (a pause's reason counts too)."""
    if known is None:
        return True
    if known.state != str(observed.state):
        return True
    return observed.state is State.PAUSED and bool(known.reason) and known.reason != observed.reason


def external_entry(*, instance: str, name: str | None, host: str, before: Known | None,
                   after: Observed, source: str, event: str | None, detail: str | None,
                   at: float, now: float) -> dict[str, Any]:
    """The journal entry of one change made outside dormant (plain states, reasons apart)."""
    entry: dict[str, Any] = {
        "instance": instance,
        "name": name,
        "host": host,
        "outcome": "external",
        "source": source,
        "state_before": before.state if before else None,
        "reason_before": before.reason if before else None,
        "state_after": str(after.state),
        "reason_after": after.reason,
        "note": RECONCILED if source == "reconciliation" else note(event or "", detail or ""),
        "started_at": at,
        "finished_at": now,
    }
    if event is not None:
        entry.update(event=event, detail=detail)
    return entry
