"""states.from_libvirt: libvirt's (state, reason, managed-save image) -> dormant's Observed."""

from __future__ import annotations

import libvirt
import pytest

from worker.core.states import Observed, State, from_libvirt, needs_job_check


@pytest.mark.parametrize(
    ("state", "reason", "image", "expected"),
    [
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED, False,
         Observed(State.RUNNING)),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_RESTORED, False,
         Observed(State.RUNNING)),
        (libvirt.VIR_DOMAIN_BLOCKED, 0, False, Observed(State.RUNNING)),
        (libvirt.VIR_DOMAIN_SHUTDOWN, 1, False, Observed(State.RUNNING, "shutting_down")),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED, True,
         Observed(State.SUSPENDED)),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, False,
         Observed(State.SHUTOFF)),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, False,
         Observed(State.SHUTOFF)),
        # A managed-save image decides, not the reason: a guest destroyed after an earlier
        # managedsave still restores from its image.
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, True,
         Observed(State.SUSPENDED)),
        (libvirt.VIR_DOMAIN_CRASHED, 0, False, Observed(State.CRASHED)),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, 0, False, Observed(State.PMSUSPENDED)),
        (libvirt.VIR_DOMAIN_NOSTATE, 0, False, Observed(State.UNKNOWN, "libvirt_state_0")),
        (42, 0, False, Observed(State.UNKNOWN, "libvirt_state_42")),
    ],
)
def test_every_domain_state(state: int, reason: int, image: bool, expected: Observed) -> None:
    assert from_libvirt(state, reason, image) == expected


def test_every_libvirt_domain_state_is_mapped_without_guessing() -> None:
    """Each virDomainState this libvirt knows maps to a dormant state other than UNKNOWN."""
    known = [v for k, v in vars(libvirt).items()
             if k.startswith("VIR_DOMAIN_") and k[len("VIR_DOMAIN_"):] in {
                 "RUNNING", "BLOCKED", "PAUSED", "SHUTDOWN", "SHUTOFF", "CRASHED",
                 "PMSUSPENDED"}]
    assert len(known) == 7
    for value in known:
        assert from_libvirt(value, 0, False).state is not State.UNKNOWN


PAUSED = libvirt.VIR_DOMAIN_PAUSED


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (libvirt.VIR_DOMAIN_PAUSED_USER, Observed(State.PAUSED, "user")),
        (libvirt.VIR_DOMAIN_PAUSED_IOERROR, Observed(State.PAUSED, "ioerror")),
        (libvirt.VIR_DOMAIN_PAUSED_WATCHDOG, Observed(State.PAUSED, "watchdog")),
        (libvirt.VIR_DOMAIN_PAUSED_UNKNOWN, Observed(State.PAUSED, "unknown")),
        (libvirt.VIR_DOMAIN_PAUSED_SHUTTING_DOWN, Observed(State.PAUSED, "shutting_down")),
        (libvirt.VIR_DOMAIN_PAUSED_CRASHED, Observed(State.PAUSED, "crashed")),
        (libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED, Observed(State.PAUSED, "postcopy_failed")),
        (14, Observed(State.PAUSED, "api_error")),  # VIR_DOMAIN_PAUSED_API_ERROR (libvirt 9.2)
        # Paused because a libvirt job is moving the guest: busy, not paused.
        (libvirt.VIR_DOMAIN_PAUSED_MIGRATION, Observed(State.BUSY, "migration")),
        (libvirt.VIR_DOMAIN_PAUSED_SAVE, Observed(State.BUSY, "save")),
        (libvirt.VIR_DOMAIN_PAUSED_DUMP, Observed(State.BUSY, "dump")),
        (libvirt.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT, Observed(State.BUSY, "from_snapshot")),
        (libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT, Observed(State.BUSY, "snapshot")),
        (libvirt.VIR_DOMAIN_PAUSED_STARTING_UP, Observed(State.BUSY, "starting_up")),
        (libvirt.VIR_DOMAIN_PAUSED_POSTCOPY, Observed(State.BUSY, "postcopy")),
        (99, Observed(State.PAUSED, "reason_99")),
    ],
)
def test_paused_reasons(reason: int, expected: Observed) -> None:
    assert from_libvirt(PAUSED, reason, False) == expected


def test_only_a_user_pause_counts_as_user_paused() -> None:
    assert from_libvirt(PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, False).user_paused
    for reason in range(16):
        if reason != libvirt.VIR_DOMAIN_PAUSED_USER:
            assert not from_libvirt(PAUSED, reason, False).user_paused
    assert not Observed(State.RUNNING, "user").user_paused


def test_observed_prints_reason_only_when_present() -> None:
    assert str(Observed(State.PAUSED, "ioerror")) == "paused(ioerror)"
    assert str(Observed(State.SUSPENDED)) == "suspended"


@pytest.mark.parametrize("reason", [libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
                                    libvirt.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT])
def test_a_pause_a_finished_job_left_behind_is_a_user_pause(reason: int) -> None:
    """A START_PAUSED restore (or a paused snapshot revert) keeps its job's reason for good:
    only whether a job still runs says busy or paused."""
    assert needs_job_check(PAUSED, reason)
    assert from_libvirt(PAUSED, reason, False, job_running=False) == Observed(State.PAUSED,
                                                                               "user")
    assert from_libvirt(PAUSED, reason, False, job_running=True).state is State.BUSY


def test_other_states_need_no_job_check() -> None:
    assert not needs_job_check(PAUSED, libvirt.VIR_DOMAIN_PAUSED_SAVE)  # a save never settles
    assert not needs_job_check(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED_MIGRATION)
    assert from_libvirt(PAUSED, libvirt.VIR_DOMAIN_PAUSED_SAVE, False,
                        job_running=False).state is State.BUSY
