"""What a run records, as plain functions: a new run's status, one action's outcome, the
counts that close a run, and the check just before an action (used by
:mod:`worker.reclaim.actions`, tested without Redis or libvirt)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from worker.reclaim import run_store
from worker.transition.table import Action


def run_status(*, queued: int, dry: bool, disabled: str) -> tuple[str, str]:
    """A new reclaim run's (status, reason): dry run, kill switch, acting or nothing to do."""
    if dry:
        status, reason = "dry_run", "dry run: nothing was changed"
    elif queued:
        status, reason = "acting", f"suspending {queued}"
    else:
        status, reason = "done", "nothing to suspend"
    if disabled:
        status, reason = ("disabled" if not dry else status), disabled
    return status, reason


def action_of(kind: str) -> Action:
    """What one action of a run does: a restore resumes, a reclaim or drain suspends."""
    return Action.RESUME if kind == "restore" else Action.SUSPEND


def outcome_of(action: Action, result: dict[str, Any]) -> tuple[str, bool]:
    """(the report's outcome, whether the guest was suspended now) from a transition result.

    A duplicate that recorded steps did the work on an earlier delivery: it counts as done now.
    """
    changed = result["outcome"] == "changed" or (
        result["outcome"] == "duplicate" and bool(result.get("steps")))
    if action is Action.RESUME:
        return ("resumed" if changed else "already running"), False
    return ("suspended" if changed else "already suspended"), changed


def closing(entries: Iterable[dict[str, Any]], done: int,
            cancelled: dict[str, Any] | None = None,
            stopped: dict[str, Any] | None = None) -> dict[str, Any]:
    """The meta changes that close a run: outcome counts of its finished actions, a reason
    (and why it stopped starting actions, when it did; status ``cancelled`` when ``dormant
    cancel`` stopped it)."""
    outcomes = Counter(str(e.get("outcome")) for e in entries if e.get("finished"))
    why = f"; stopped: {stopped['reason']}" if stopped else ""
    reason = f"{done} action(s) finished: " + ", ".join(
        f"{n} {o}" for o, n in sorted(outcomes.items())) + why
    if cancelled is not None:
        return {"status": "cancelled", "outcomes": dict(outcomes),
                "reason": f"{run_store.cancel_reason(cancelled)}; {reason}"}
    return {"status": "done", "outcomes": dict(outcomes), "reason": reason}


@dataclass(frozen=True)
class Precheck:
    """The check just before one action: go ahead, or skip it and why.

    ``recheck`` holds the fresh numbers of a reclaim's re-check (None when there was none);
    they are recorded with the outcome either way.
    """

    state: str
    skip: str = ""  # why the action is skipped; "" = go ahead
    recheck: dict[str, Any] | None = None

    @property
    def go(self) -> bool:
        return not self.skip

    def recorded(self) -> dict[str, Any]:
        """What the report keeps about this check."""
        kept: dict[str, Any] = {} if self.go else {"reason": self.skip, "state": self.state}
        if self.recheck is not None:
            kept["recheck"] = self.recheck
        return kept
