"""transitions.plan: the transition table, as a table of cases and as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.errors import HypervisorBusy, InvalidTransition, UnknownInstance
from worker.core.states import Observed, State, Target
from worker.transition.table import STEP_RESULT, VERB_TARGET, Action, Plan, Step, plan

A, S, T, P = Action, State, Target, Step

RUNNING = Observed(S.RUNNING)
SHUTTING_DOWN = Observed(S.RUNNING, "shutting_down")
USER_PAUSED = Observed(S.PAUSED, "user")
IOERROR = Observed(S.PAUSED, "ioerror")
WATCHDOG = Observed(S.PAUSED, "watchdog")
SUSPENDED = Observed(S.SUSPENDED)
SHUTOFF = Observed(S.SHUTOFF)
PMSUSPENDED = Observed(S.PMSUSPENDED)
CRASHED = Observed(S.CRASHED)
UNKNOWN = Observed(S.UNKNOWN, "libvirt_state_0")
MISSING = Observed(S.MISSING)
BUSY = Observed(S.BUSY, "save")

ALREADY = "already"

# (action, observed, target for ensure) -> steps, ALREADY, or the error raised.
TABLE = [
    # pause
    (A.PAUSE, RUNNING, None, (P.PAUSE,)),
    (A.PAUSE, SHUTTING_DOWN, None, (P.PAUSE,)),
    (A.PAUSE, USER_PAUSED, None, ALREADY),
    (A.PAUSE, IOERROR, None, ALREADY),
    (A.PAUSE, SUSPENDED, None, InvalidTransition),
    (A.PAUSE, SHUTOFF, None, InvalidTransition),
    (A.PAUSE, PMSUSPENDED, None, InvalidTransition),
    (A.PAUSE, CRASHED, None, InvalidTransition),
    (A.PAUSE, UNKNOWN, None, InvalidTransition),
    (A.PAUSE, MISSING, None, UnknownInstance),
    (A.PAUSE, BUSY, None, HypervisorBusy),
    # unpause
    (A.UNPAUSE, USER_PAUSED, None, (P.UNPAUSE,)),
    (A.UNPAUSE, RUNNING, None, ALREADY),
    (A.UNPAUSE, IOERROR, None, InvalidTransition),
    (A.UNPAUSE, WATCHDOG, None, InvalidTransition),
    (A.UNPAUSE, SUSPENDED, None, InvalidTransition),
    (A.UNPAUSE, SHUTOFF, None, InvalidTransition),
    (A.UNPAUSE, CRASHED, None, InvalidTransition),
    (A.UNPAUSE, MISSING, None, UnknownInstance),
    (A.UNPAUSE, BUSY, None, HypervisorBusy),
    # suspend
    (A.SUSPEND, RUNNING, None, (P.SAVE,)),
    (A.SUSPEND, USER_PAUSED, None, (P.SAVE,)),
    (A.SUSPEND, SUSPENDED, None, ALREADY),
    (A.SUSPEND, SHUTOFF, None, InvalidTransition),
    (A.SUSPEND, PMSUSPENDED, None, InvalidTransition),
    (A.SUSPEND, CRASHED, None, InvalidTransition),
    (A.SUSPEND, MISSING, None, UnknownInstance),
    (A.SUSPEND, BUSY, None, HypervisorBusy),
    # resume
    (A.RESUME, SUSPENDED, None, (P.RESTORE,)),
    (A.RESUME, RUNNING, None, ALREADY),
    (A.RESUME, USER_PAUSED, None, InvalidTransition),
    (A.RESUME, IOERROR, None, InvalidTransition),
    (A.RESUME, SHUTOFF, None, InvalidTransition),
    (A.RESUME, PMSUSPENDED, None, InvalidTransition),
    (A.RESUME, MISSING, None, UnknownInstance),
    (A.RESUME, BUSY, None, HypervisorBusy),
    # ensure finds the path
    (A.ENSURE, RUNNING, T.RUNNING, ALREADY),
    (A.ENSURE, RUNNING, T.PAUSED, (P.PAUSE,)),
    (A.ENSURE, RUNNING, T.SUSPENDED, (P.SAVE,)),
    (A.ENSURE, USER_PAUSED, T.RUNNING, (P.UNPAUSE,)),
    (A.ENSURE, USER_PAUSED, T.PAUSED, ALREADY),
    (A.ENSURE, USER_PAUSED, T.SUSPENDED, (P.SAVE,)),
    (A.ENSURE, SUSPENDED, T.RUNNING, (P.RESTORE,)),
    (A.ENSURE, SUSPENDED, T.PAUSED, (P.RESTORE_PAUSED,)),
    (A.ENSURE, SUSPENDED, T.SUSPENDED, ALREADY),
    (A.ENSURE, IOERROR, T.RUNNING, InvalidTransition),
    (A.ENSURE, WATCHDOG, T.RUNNING, InvalidTransition),
    (A.ENSURE, IOERROR, T.PAUSED, ALREADY),
    (A.ENSURE, SHUTOFF, T.RUNNING, InvalidTransition),
    (A.ENSURE, SHUTOFF, T.SUSPENDED, InvalidTransition),
    (A.ENSURE, PMSUSPENDED, T.RUNNING, InvalidTransition),
    (A.ENSURE, CRASHED, T.PAUSED, InvalidTransition),
    (A.ENSURE, UNKNOWN, T.RUNNING, InvalidTransition),
    (A.ENSURE, MISSING, T.RUNNING, UnknownInstance),
    (A.ENSURE, BUSY, T.SUSPENDED, HypervisorBusy),
]


@pytest.mark.parametrize(("action", "observed", "target", "expected"), TABLE,
                         ids=[f"{a}-{o}-{t}" for a, o, t, _ in TABLE])
def test_plan_table(action: Action, observed: Observed, target: Target | None,
                    expected: object) -> None:
    if isinstance(expected, type) and issubclass(expected, Exception):
        with pytest.raises(expected):
            plan(action, observed, target)
        return
    result = plan(action, observed, target)
    assert result.target == (target or VERB_TARGET[action])
    if expected == ALREADY:
        assert result.already and result.steps == ()
    else:
        assert not result.already and result.steps == expected


def test_ensure_needs_a_target() -> None:
    with pytest.raises(ValueError, match="target"):
        plan(A.ENSURE, RUNNING)


def test_a_verb_ignores_any_target_it_is_given() -> None:
    assert plan(A.PAUSE, RUNNING, T.SUSPENDED) == Plan(T.PAUSED, (P.PAUSE,))


@pytest.mark.parametrize("reason", ["ioerror", "watchdog", "unknown", "crashed", "api_error"])
@pytest.mark.parametrize(("action", "target"), [(A.UNPAUSE, None), (A.ENSURE, T.RUNNING),
                                                (A.RESUME, None), (A.SUSPEND, None),
                                                (A.ENSURE, T.SUSPENDED)])
def test_a_hypervisor_pause_is_never_unpaused(reason: str, action: Action,
                                              target: Target | None) -> None:
    with pytest.raises(InvalidTransition) as info:
        plan(action, Observed(S.PAUSED, reason), target)
    assert reason in str(info.value)


def test_refusals_say_why() -> None:
    with pytest.raises(InvalidTransition, match="paused by the hypervisor \\(ioerror\\)"):
        plan(A.UNPAUSE, IOERROR)
    with pytest.raises(InvalidTransition, match="shut off with no saved memory image"):
        plan(A.RESUME, SHUTOFF)
    with pytest.raises(InvalidTransition, match="pause needs a guest that is running"):
        plan(A.PAUSE, SUSPENDED)
    with pytest.raises(InvalidTransition, match="unpause needs a guest that is paused"):
        plan(A.UNPAUSE, SUSPENDED)
    with pytest.raises(InvalidTransition, match="S3"):
        plan(A.SUSPEND, PMSUSPENDED)
    with pytest.raises(HypervisorBusy, match="save"):
        plan(A.PAUSE, BUSY)


# -- properties ------------------------------------------------------------------------------
observed_states = st.builds(
    Observed,
    st.sampled_from(list(State)),
    st.sampled_from(["", "user", "ioerror", "watchdog", "unknown", "shutting_down"]),
)
requests = st.one_of(
    st.tuples(st.sampled_from([a for a in Action if a is not A.ENSURE]), st.none()),
    st.tuples(st.just(A.ENSURE), st.sampled_from(list(Target))),
)


@given(observed=observed_states, request=requests)
def test_plan_properties(observed: Observed, request: tuple[Action, Target | None]) -> None:
    action, target = request
    try:
        result = plan(action, observed, target)
    except (InvalidTransition, UnknownInstance, HypervisorBusy) as exc:
        # Refusals are typed and only where a plan cannot exist.
        if observed.state is S.MISSING:
            assert isinstance(exc, UnknownInstance)
        elif observed.state is S.BUSY:
            assert isinstance(exc, HypervisorBusy)
        else:
            assert isinstance(exc, InvalidTransition)
            assert observed.state.value != (target or VERB_TARGET[action]).value
        return
    wanted = target or VERB_TARGET[action]
    assert result.target is wanted
    # `already` exactly when the observed state is the target.
    assert result.already == (observed.state.value == wanted.value)
    if result.steps:
        # Each step starts where the previous one left the guest; the last one ends at the target.
        assert STEP_RESULT[result.steps[-1]].value == wanted.value
        assert all(STEP_RESULT[s].value != observed.state.value for s in result.steps)
    # A guest paused by the hypervisor is never brought back to running.
    if observed.state is S.PAUSED and not observed.user_paused:
        assert not any(STEP_RESULT[s] is S.RUNNING for s in result.steps)
        assert Step.UNPAUSE not in result.steps
