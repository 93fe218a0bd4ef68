"""hypervisor: error translation by code and domain, and the adapter on libvirt's test driver."""

from __future__ import annotations

import threading
import uuid

import fakeredis
import libvirt
import pytest

from tests.unit.conftest import TEST_URI, DomainFactory
from worker import hypervisor as hv_module
from worker.core.errors import (
    HypervisorBusy,
    HypervisorRefused,
    HypervisorUnavailable,
    InvalidTransition,
    PermanentError,
    TransientError,
    UnknownInstance,
)
from worker.core.states import Observed, State
from worker.hypervisor import Hypervisor, translate
from worker.transition.table import Step


def _error(code: int | None, domain: int | None, message: str = "boom") -> libvirt.libvirtError:
    exc = libvirt.libvirtError("unused default")
    exc.err = None if code is None else (code, domain, message, 2, "", None, None, 0, 0)
    return exc


REMOTE, RPC = libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC
QEMU, TEST = libvirt.VIR_FROM_QEMU, libvirt.VIR_FROM_TEST

TRANSLATIONS = [
    # Connection lost: system/internal errors only count when the remote/RPC layer raised them.
    (libvirt.VIR_ERR_SYSTEM_ERROR, REMOTE, HypervisorUnavailable),
    (libvirt.VIR_ERR_SYSTEM_ERROR, RPC, HypervisorUnavailable),
    (libvirt.VIR_ERR_INTERNAL_ERROR, REMOTE, HypervisorUnavailable),
    (libvirt.VIR_ERR_INTERNAL_ERROR, RPC, HypervisorUnavailable),
    (libvirt.VIR_ERR_SYSTEM_ERROR, QEMU, HypervisorRefused),
    (libvirt.VIR_ERR_INTERNAL_ERROR, QEMU, HypervisorRefused),
    (libvirt.VIR_ERR_INTERNAL_ERROR, TEST, HypervisorRefused),
    # Codes that mean "no connection" wherever they come from.
    (libvirt.VIR_ERR_NO_CONNECT, REMOTE, HypervisorUnavailable),
    (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, HypervisorUnavailable),
    (libvirt.VIR_ERR_RPC, RPC, HypervisorUnavailable),
    (libvirt.VIR_ERR_AUTH_UNAVAILABLE, REMOTE, HypervisorUnavailable),
    # Busy: the state-change lock (68) or an unresponsive agent.
    (libvirt.VIR_ERR_OPERATION_TIMEOUT, QEMU, HypervisorBusy),
    (68, QEMU, HypervisorBusy),
    (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, QEMU, HypervisorBusy),
    # Permanent.
    (42, QEMU, UnknownInstance),
    (libvirt.VIR_ERR_NO_DOMAIN, REMOTE, UnknownInstance),
    (55, QEMU, InvalidTransition),
    (libvirt.VIR_ERR_OPERATION_INVALID, REMOTE, InvalidTransition),
    (libvirt.VIR_ERR_NO_SUPPORT, TEST, HypervisorRefused),
    (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, QEMU, HypervisorRefused),
    (libvirt.VIR_ERR_OPERATION_FAILED, QEMU, HypervisorRefused),
    (libvirt.VIR_ERR_ACCESS_DENIED, REMOTE, HypervisorRefused),
    (None, None, HypervisorRefused),
]


@pytest.mark.parametrize(("code", "domain", "expected"), TRANSLATIONS)
def test_translate(code: int | None, domain: int | None, expected: type[Exception]) -> None:
    err = translate(_error(code, domain, "the message"), "pause web-1")
    assert type(err) is expected
    text = str(err)
    assert "pause web-1" in text
    if code is not None:
        assert "the message" in text and f"libvirt error {code}" in text


def test_translation_never_reads_the_message() -> None:
    """A message that sounds like connection loss does not change the class."""
    err = translate(_error(libvirt.VIR_ERR_OPERATION_FAILED, QEMU,
                           "Cannot recv data: Connection reset by peer"), "x")
    assert isinstance(err, HypervisorRefused)


def test_retryable_branch() -> None:
    assert issubclass(HypervisorUnavailable, TransientError)
    assert issubclass(HypervisorBusy, TransientError)
    for permanent in (UnknownInstance, InvalidTransition, HypervisorRefused):
        assert issubclass(permanent, PermanentError)


def test_connect_failure_is_unavailable() -> None:
    broken = Hypervisor("test:///nonexistent-uri-form")
    with pytest.raises(HypervisorUnavailable, match="cannot connect to test:///nonexistent"):
        broken.connection()
    with pytest.raises(HypervisorUnavailable):
        broken.guest("web-1")


def test_unknown_instances(hypervisor: Hypervisor) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(UnknownInstance):
        hypervisor.guest(missing)
    with pytest.raises(UnknownInstance):
        hypervisor.guest("no-such-guest-at-all")
    assert hypervisor.observe(missing) == (None, Observed(State.MISSING))


def test_guest_steps_really_change_state(hypervisor: Hypervisor, make_domain: DomainFactory,
                                         test_conn: libvirt.virConnect) -> None:
    dom = make_domain()
    by_uuid = hypervisor.guest(dom.UUIDString())
    by_name = hypervisor.guest(dom.name())
    assert (by_uuid.uuid, by_uuid.name) == (by_name.uuid, by_name.name) == (
        dom.UUIDString(), dom.name())
    assert by_uuid.observe() == Observed(State.RUNNING)
    by_uuid.run(Step.PAUSE)
    assert dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]
    assert by_name.observe() == Observed(State.PAUSED, "user")
    by_uuid.run(Step.SAVE)
    assert dom.hasManagedSaveImage()
    assert by_uuid.observe() == Observed(State.SUSPENDED)
    by_uuid.run(Step.RESTORE)
    assert by_uuid.observe() == Observed(State.RUNNING)  # saved paused, restored running
    by_uuid.run(Step.PAUSE)
    by_uuid.run(Step.UNPAUSE)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    dom.destroy()
    assert by_uuid.observe() == Observed(State.SHUTOFF)
    _, observed = hypervisor.observe(dom.name())
    assert observed == Observed(State.SHUTOFF)


def test_a_refused_call_is_permanent_and_keeps_the_connection(
        hypervisor: Hypervisor, make_domain: DomainFactory) -> None:
    """The test driver says 'internal error: not paused' (code 1, domain TEST): not a lost link."""
    dom = make_domain()
    guest = hypervisor.guest(dom.name())
    conn = hypervisor.connection()
    with pytest.raises(HypervisorRefused, match="unpause"):
        guest.unpause()
    assert hypervisor.connection() is conn


def test_a_lost_connection_is_dropped_and_reopened(hypervisor: Hypervisor) -> None:
    conn = hypervisor.connection()
    assert hypervisor.connection() is conn

    def lost() -> None:
        raise _error(libvirt.VIR_ERR_SYSTEM_ERROR, RPC, "End of file while reading data")

    with pytest.raises(HypervisorUnavailable):
        hypervisor.call("read state of web-1", lost)
    fresh = hypervisor.connection()
    assert fresh is not conn
    assert fresh.getURI() == TEST_URI


def test_one_connection_per_thread(hypervisor: Hypervisor) -> None:
    mine = hypervisor.connection()
    theirs: list[libvirt.virConnect] = []
    thread = threading.Thread(target=lambda: theirs.append(hypervisor.connection()))
    thread.start()
    thread.join(timeout=10)
    assert theirs and theirs[0] is not mine


def test_stats_report_every_guest_with_its_state(hypervisor: Hypervisor,
                                                 make_domain: DomainFactory) -> None:
    running, paused, saved = make_domain(), make_domain(), make_domain()
    paused.suspend()
    saved.managedSave(0)
    by_uuid = {s.uuid: s for s in hypervisor.stats()}
    assert by_uuid[running.UUIDString()].state is State.RUNNING
    assert by_uuid[paused.UUIDString()].state is State.PAUSED
    assert by_uuid[saved.UUIDString()].state is State.SUSPENDED
    assert by_uuid[running.UUIDString()].name == running.name()
    assert by_uuid[running.UUIDString()].vcpus >= 1
    assert {g.uuid for g in hypervisor.guests()} >= {running.UUIDString(), saved.UUIDString()}


def test_metadata_absent_is_none(hypervisor: Hypervisor, make_domain: DomainFactory) -> None:
    guest = hypervisor.guest(make_domain().name())
    assert guest.metadata("https://example.invalid/dormant") is None


def test_shared_hypervisor_seeds_the_demo_fleet_once() -> None:
    from worker.demo.bringup import FLEET

    shared = hv_module.shared(TEST_URI)
    assert hv_module.shared(TEST_URI) is shared
    uuids = {g.name: g.uuid for g in shared.guests()}
    assert {g.name: g.uuid for g in FLEET}.items() <= uuids.items()  # the real demo's UUIDs
    assert shared.guest("dormant-demo-web").observe().state in {State.RUNNING, State.PAUSED,
                                                         State.SUSPENDED}


class _FakeDomain:
    """Just enough of a virDomain to reproduce what QEMU reports (test driver cannot)."""

    def __init__(self, state: tuple[int, int], job: int | None,
                 uuid_: str = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0", held_ms: int = 0) -> None:
        self._state, self._job, self._uuid, self._held_ms = state, job, uuid_, held_ms

    def UUIDString(self) -> str:
        return self._uuid

    def name(self) -> str:
        return f"fake-{self._uuid[:4]}"

    def state(self) -> list[int]:
        return list(self._state)

    def controlInfo(self) -> list[int]:
        if self._job is None:
            raise _error(libvirt.VIR_ERR_NO_SUPPORT, TEST, "not supported")
        return [self._job, 0, self._held_ms]


P = libvirt.VIR_DOMAIN_PAUSED


@pytest.mark.parametrize(
    ("state", "job", "expected"),
    [
        # QEMU reports a managed-save image restored paused as PAUSED/MIGRATION for good.
        ((P, libvirt.VIR_DOMAIN_PAUSED_MIGRATION), libvirt.VIR_DOMAIN_CONTROL_OK,
         Observed(State.PAUSED, "user")),
        ((P, libvirt.VIR_DOMAIN_PAUSED_MIGRATION), libvirt.VIR_DOMAIN_CONTROL_JOB,
         Observed(State.BUSY, "migration")),
        ((P, libvirt.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT), libvirt.VIR_DOMAIN_CONTROL_OK,
         Observed(State.PAUSED, "user")),
        ((P, libvirt.VIR_DOMAIN_PAUSED_SAVE), libvirt.VIR_DOMAIN_CONTROL_JOB,
         Observed(State.BUSY, "save")),
        ((P, libvirt.VIR_DOMAIN_PAUSED_IOERROR), libvirt.VIR_DOMAIN_CONTROL_OK,
         Observed(State.PAUSED, "ioerror")),
        ((P, libvirt.VIR_DOMAIN_PAUSED_USER), None, Observed(State.PAUSED, "user")),
    ],
)
def test_a_settled_restore_pause_is_a_pause_not_a_job(
        hypervisor: Hypervisor, state: tuple[int, int], job: int | None,
        expected: Observed) -> None:
    guest = hv_module.Guest(_FakeDomain(state, job), hypervisor)  # type: ignore[arg-type]
    assert guest.observe() == expected


@pytest.mark.parametrize(("control", "held_ms", "job"), [
    (libvirt.VIR_DOMAIN_CONTROL_OK, 0, False),
    (libvirt.VIR_DOMAIN_CONTROL_JOB, 0, True),  # an async job: a save, a migration, a dump
    (libvirt.VIR_DOMAIN_CONTROL_OCCUPIED, 20, False),  # another thread's query, right now
    (libvirt.VIR_DOMAIN_CONTROL_OCCUPIED, 5000, True),  # a monitor call stuck: QEMU hangs
    (libvirt.VIR_DOMAIN_CONTROL_ERROR, 0, False),  # a sync job between its steps
])
def test_only_a_job_or_a_stuck_monitor_holds_a_guest(
        hypervisor: Hypervisor, control: int, held_ms: int, job: bool) -> None:
    running = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
    guest = hv_module.Guest(_FakeDomain(running, control, held_ms=held_ms),  # type: ignore[arg-type]
                            hypervisor)
    assert guest.job_running() is job


class _FakeStatsConnection:
    """A connection whose getAllDomainStats answers as libvirt does with NOWAIT while one
    guest's job holds it: its record lacks what needs the job, its CPU time stands still."""

    def __init__(self, records: list[tuple[_FakeDomain, dict[str, int]]]) -> None:
        self.records, self.stats, self.flags = records, -1, -1

    def getAllDomainStats(self, stats: int, flags: int) -> list[tuple[_FakeDomain, dict[str, int]]]:
        self.stats, self.flags = stats, flags
        return self.records


def test_the_registry_asks_for_states_only_so_it_never_holds_up_a_sample(
        hypervisor: Hypervisor, fake_redis: fakeredis.FakeRedis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Block statistics need a job on each guest (QEMU's monitor); a sample taken at the same
    moment with NOWAIT would find those guests held and store them busy (CI saw it: the
    registry refreshes every 5 s in the integration tests)."""
    from worker.fleet import registry

    running = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
    guest = _FakeDomain(running, libvirt.VIR_DOMAIN_CONTROL_OK, str(uuid.uuid4()))
    conn = _FakeStatsConnection([(guest, {"state.state": running[0],
                                          "state.reason": running[1]})])
    monkeypatch.setattr(hypervisor, "connection", lambda: conn)
    assert registry.publish(fake_redis, hypervisor, "h1", interval=60) == {"running": 1}
    assert conn.stats == libvirt.VIR_DOMAIN_STATS_STATE
    assert fake_redis.get(f"dormant:where:{guest.UUIDString()}") == "h1"
    list(hypervisor.stats())  # a sample asks for the activity counters
    assert conn.stats & libvirt.VIR_DOMAIN_STATS_BLOCK


def test_stats_never_wait_for_a_job_and_report_a_held_guest_busy(
        hypervisor: Hypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    running = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
    held = _FakeDomain(running, libvirt.VIR_DOMAIN_CONTROL_JOB, str(uuid.uuid4()))
    free = _FakeDomain(running, libvirt.VIR_DOMAIN_CONTROL_OK, str(uuid.uuid4()))
    queried = _FakeDomain(running, libvirt.VIR_DOMAIN_CONTROL_OK, str(uuid.uuid4()))
    conn = _FakeStatsConnection([
        (held, {"state.state": running[0], "state.reason": running[1], "cpu.time": 5,
                "block.count": 1}),  # no block.0.rd.bytes: that needs the job
        (free, {"state.state": running[0], "state.reason": running[1], "cpu.time": 7,
                "block.count": 1, "block.0.rd.bytes": 3, "block.0.wr.bytes": 4}),
        # Another caller's query held it for that instant: its disk counters left out.
        (queried, {"state.state": running[0], "state.reason": running[1], "cpu.time": 9,
                   "block.count": 1, "block.0.name": 0}),
    ])
    monkeypatch.setattr(hypervisor, "connection", lambda: conn)
    stats = {s.uuid: s for s in hypervisor.stats()}
    assert conn.flags & libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    assert stats[held.UUIDString()].state is State.BUSY  # a gap, never evidence of idleness
    assert stats[queried.UUIDString()].state is State.BUSY  # not counters read as zero
    assert stats[free.UUIDString()].state is State.RUNNING
    assert stats[free.UUIDString()].block_rd_bytes == 3


def test_after_a_failed_save_a_guest_another_job_holds_is_left_alone(
        hypervisor: Hypervisor) -> None:
    """An operator's own save running beside ours: its image must not be removed."""
    running = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_SAVE_CANCELED)
    guest = hv_module.Guest(_FakeDomain(running, libvirt.VIR_DOMAIN_CONTROL_JOB),  # type: ignore[arg-type]
                            hypervisor)
    assert guest.settle_failed_save(was_running=True) == [
        "left alone: another libvirt job holds it"]
