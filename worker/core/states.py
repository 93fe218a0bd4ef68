"""The guest states dormant speaks about, and how libvirt's (state, reason) pairs map onto them.

The mapping is a table of plain integers so it is testable without libvirt; the integer values
are libvirt's public ABI (virDomainState, virDomainPausedReason).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"  # shut off with a managed-save image
    SHUTOFF = "shutoff"  # shut off, no image: nothing to resume
    PMSUSPENDED = "pmsuspended"  # the guest put itself into S3
    CRASHED = "crashed"
    BUSY = "busy"  # a libvirt job (save, migration, dump, snapshot) is moving it
    MISSING = "missing"
    UNKNOWN = "unknown"


class Target(StrEnum):
    """States a caller may ask for."""

    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"


# virDomainState
_NOSTATE, _RUNNING, _BLOCKED, _PAUSED, _SHUTDOWN, _SHUTOFF, _CRASHED, _PMSUSPENDED = range(8)

# virDomainPausedReason values that mean "a job is moving this guest right now".
_PAUSED_BY_JOB = {
    2: "migration",
    3: "save",
    4: "dump",
    7: "from_snapshot",
    9: "snapshot",
    11: "starting_up",
    12: "postcopy",
}
_PAUSED_REASONS = {
    0: "unknown",
    1: "user",
    5: "ioerror",
    6: "watchdog",
    8: "shutting_down",
    10: "crashed",
    13: "postcopy_failed",
    14: "api_error",
    **_PAUSED_BY_JOB,
}


# Of those, the reasons a *finished* job leaves behind: a managed-save image restored with
# START_PAUSED (or a snapshot reverted paused) stays "paused (migration|from_snapshot)" for
# good once the job is over. Only whether a job still runs tells the two apart.
_SETTLED_BY_JOB = {2, 7}


# Paused reasons a failed managed save can leave behind when libvirt could not resume the
# guest: the save's own pause, an API error, or none known. Never an I/O error or a watchdog
# (those stopped the guest for a reason an operator must see).
_AFTER_FAILED_SAVE = {0, 3, 14}


def left_paused_by_failed_save(reason: int) -> bool:
    """Whether a guest paused with ``reason`` after a failed save should simply be unpaused."""
    return reason in _AFTER_FAILED_SAVE


def needs_job_check(state: int, reason: int) -> bool:
    """Whether :func:`from_libvirt` needs to know if a libvirt job still runs on the domain."""
    return state == _PAUSED and reason in _SETTLED_BY_JOB


@dataclass(frozen=True)
class Observed:
    """A state read from libvirt, with the reason for pauses (``user``, ``ioerror``, ...)."""

    state: State
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.state}({self.reason})" if self.reason else str(self.state)

    @property
    def user_paused(self) -> bool:
        return self.state is State.PAUSED and self.reason == "user"


def from_libvirt(state: int, reason: int, has_managed_save: bool, *,
                 job_running: bool = True) -> Observed:
    """Translate ``virDomainGetState`` plus ``hasManagedSaveImage`` into an :class:`Observed`.

    ``job_running`` matters only where :func:`needs_job_check` says so: a pause a finished
    job left behind is a pause asked for (``paused(user)``), not a job still moving the guest.
    """
    if state in (_RUNNING, _BLOCKED):
        return Observed(State.RUNNING)
    if state == _SHUTDOWN:
        # Shutting down is still running as far as pause/suspend are concerned.
        return Observed(State.RUNNING, "shutting_down")
    if state == _PAUSED:
        if needs_job_check(state, reason) and not job_running:
            return Observed(State.PAUSED, "user")
        if reason in _PAUSED_BY_JOB:
            return Observed(State.BUSY, _PAUSED_BY_JOB[reason])
        return Observed(State.PAUSED, _PAUSED_REASONS.get(reason, f"reason_{reason}"))
    if state == _SHUTOFF:
        return Observed(State.SUSPENDED if has_managed_save else State.SHUTOFF)
    if state == _CRASHED:
        return Observed(State.CRASHED)
    if state == _PMSUSPENDED:
        return Observed(State.PMSUSPENDED)
    # NOSTATE and anything newer than this table: say so instead of guessing.
    return Observed(State.UNKNOWN, f"libvirt_state_{state}")
