"""The transition table: (observed state, what the caller asked) -> steps, nothing, or refusal.

Pure functions over plain data. The four verbs are strict one-step shortcuts; ``ensure`` finds
a path of up to two steps. A guest the hypervisor paused (I/O error, watchdog) is refused
by every transition but ``pause``: resuming it blindly could corrupt data.
Suspending a *user-paused* guest saves it with ``SAVE_RUNNING``, so a
later resume always brings it back running (a paused-then-suspended guest has nobody waiting to
unpause it); ``ensure(paused)`` from suspended restores it directly paused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from worker.core.errors import HypervisorBusy, InvalidTransition, UnknownInstance
from worker.core.states import Observed, State, Target


class Action(StrEnum):
    PAUSE = "pause"
    UNPAUSE = "unpause"
    SUSPEND = "suspend"
    RESUME = "resume"
    ENSURE = "ensure"


class Step(StrEnum):
    """One libvirt call; the Guest adapter has one method per step."""

    PAUSE = "pause"  # virDomainSuspend
    UNPAUSE = "unpause"  # virDomainResume
    SAVE = "save"  # virDomainManagedSave(VIR_DOMAIN_SAVE_RUNNING)
    RESTORE = "restore"  # virDomainCreate
    RESTORE_PAUSED = "restore_paused"  # virDomainCreateWithFlags(VIR_DOMAIN_START_PAUSED)


VERB_TARGET: dict[Action, Target] = {
    Action.PAUSE: Target.PAUSED,
    Action.UNPAUSE: Target.RUNNING,
    Action.SUSPEND: Target.SUSPENDED,
    Action.RESUME: Target.RUNNING,
}

# Which observed states each verb starts from, and the one call it makes.
VERB_STEP: dict[Action, tuple[frozenset[State], Step]] = {
    Action.PAUSE: (frozenset({State.RUNNING}), Step.PAUSE),
    Action.UNPAUSE: (frozenset({State.PAUSED}), Step.UNPAUSE),
    Action.SUSPEND: (frozenset({State.RUNNING, State.PAUSED}), Step.SAVE),
    Action.RESUME: (frozenset({State.SUSPENDED}), Step.RESTORE),
}

# The shortest path from each observed state to each target (ensure).
PATHS: dict[tuple[State, Target], tuple[Step, ...]] = {
    (State.RUNNING, Target.PAUSED): (Step.PAUSE,),
    (State.RUNNING, Target.SUSPENDED): (Step.SAVE,),
    (State.PAUSED, Target.RUNNING): (Step.UNPAUSE,),
    (State.PAUSED, Target.SUSPENDED): (Step.SAVE,),
    (State.SUSPENDED, Target.RUNNING): (Step.RESTORE,),
    (State.SUSPENDED, Target.PAUSED): (Step.RESTORE_PAUSED,),
}

# What each step leaves the guest in, for the post-condition check.
STEP_RESULT: dict[Step, State] = {
    Step.PAUSE: State.PAUSED,
    Step.UNPAUSE: State.RUNNING,
    Step.SAVE: State.SUSPENDED,
    Step.RESTORE: State.RUNNING,
    Step.RESTORE_PAUSED: State.PAUSED,
}

_HINTS: dict[State, str] = {
    State.SHUTOFF: "it is shut off with no saved memory image; start it with libvirt first",
    State.PMSUSPENDED: "the guest put itself to sleep (S3); wake it with virsh dompmwakeup",
    State.CRASHED: "it has crashed; it needs an operator",
    State.UNKNOWN: "libvirt reports a state dormant does not know",
}


@dataclass(frozen=True)
class Plan:
    """What to do: no steps means the instance is already in the target state."""

    target: Target
    steps: tuple[Step, ...]

    @property
    def already(self) -> bool:
        return not self.steps


def _refuse(action: Action, observed: Observed, target: Target) -> InvalidTransition:
    if observed.state is State.PAUSED and not observed.user_paused:
        why = (
            f"it was paused by the hypervisor ({observed.reason}), not by a user; "
            "fix the cause (e.g. free disk space) and resume it with virsh"
        )
    elif observed.state in _HINTS:
        why = _HINTS[observed.state]
    else:
        why = f"{action} needs a guest that is " + " or ".join(
            sorted(str(s) for s in VERB_STEP.get(action, (frozenset(), None))[0])
        )
    return InvalidTransition(
        f"cannot {action} an instance that is {observed} (target {target}): {why}"
    )


def plan(action: Action, observed: Observed, target: Target | None = None) -> Plan:
    """Decide the steps for ``action`` (``target`` only for ``ensure``) from ``observed``.

    Raises InvalidTransition for a request that makes no sense in this state,
    UnknownInstance for a missing domain, HypervisorBusy while a libvirt job is moving it.
    """
    if action is not Action.ENSURE:
        target = VERB_TARGET[action]
    elif target is None:
        raise ValueError("ensure needs a target")
    if observed.state is State.MISSING:
        raise UnknownInstance("no such instance on this hypervisor")
    if observed.state is State.BUSY:
        raise HypervisorBusy(f"a libvirt job ({observed.reason}) is in progress on the instance")
    if observed.state.value == target.value:
        return Plan(target, ())
    if observed.state is State.PAUSED and not observed.user_paused:
        # Unpausing or saving-to-restore-running would both resume a guest the hypervisor
        # stopped for a reason (full disk, watchdog): an operator fixes the cause first.
        raise _refuse(action, observed, target)
    if action is Action.ENSURE:
        steps = PATHS.get((observed.state, target))
        if steps is None:
            raise _refuse(action, observed, target)
        return Plan(target, steps)
    sources, step = VERB_STEP[action]
    if observed.state not in sources:
        raise _refuse(action, observed, target)
    return Plan(target, (step,))
