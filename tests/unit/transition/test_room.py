"""Room before a save or a restore (worker/transition/room.py): the pure rule, the promises of
those in flight (fakeredis, the real Lua script) and the runner refusing before it touches
the guest (libvirt's test driver). Readings are injected here; the integration tests read a
real loop-mounted filesystem and the host's real memory (tests/integration/test_room.py)."""

from __future__ import annotations

import time
from typing import Any

import libvirt
import pytest

from tests.unit.conftest import DomainFactory
from worker.core import metrics
from worker.core.errors import (
    DormantError,
    HostMemoryShort,
    HypervisorRefused,
    InvalidTransition,
    RoomReserved,
    SaveDirectoryFull,
)
from worker.core.states import Observed, State
from worker.hypervisor import Hypervisor
from worker.hypervisor.resources import Disk, Memory, local, mem_available
from worker.store import keys
from worker.transition import failed_save
from worker.transition.context import Context, Request
from worker.transition.guards import Store
from worker.transition.room import Fit, Reserve, Room, judge
from worker.transition.runner import run
from worker.transition.table import Action, Step

MiB = 2**20


@pytest.mark.parametrize(("need", "free", "reserve", "in_flight", "fit"), [
    (64, 100, 10, 0, Fit.FITS),
    (90, 100, 10, 0, Fit.FITS),  # exactly the room left: fits
    (91, 100, 10, 0, Fit.SHORT),
    (50, 100, 10, 40, Fit.FITS),
    (50, 100, 10, 41, Fit.RESERVED),  # fits once those in flight finish
    (91, 100, 10, 50, Fit.SHORT),  # does not fit even then: refused for good
])
def test_judge(need: int, free: int, reserve: int, in_flight: int, fit: Fit) -> None:
    assert judge(need=need, free=free, reserve=reserve, in_flight=in_flight) is fit


def test_the_reserve_is_a_fraction_with_a_floor() -> None:
    r = Reserve(0.10, 2048 * MiB)
    assert r.of(100 * 2**30) == 10 * 2**30
    assert r.of(4 * 2**30) == 2048 * MiB


def test_mem_available_and_local_uris() -> None:
    text = "MemTotal:       24683784 kB\nMemFree:  1 kB\nMemAvailable:   23571616 kB\n"
    assert mem_available(text) == 23571616 * 1024
    assert mem_available("MemTotal: 1 kB\n") is None
    assert local("qemu:///system") and local("test:///default")
    assert not local("qemu+ssh://kvm1/system")


class Readings:
    """What the injected readers answer; tests change the figures."""

    def __init__(self) -> None:
        self.disk = Disk("/save", total=1000 * MiB, free=500 * MiB)
        self.memory: Memory | None = Memory(total=4096 * MiB, available=1024 * MiB,
                                            source="MemAvailable")


@pytest.fixture
def readings() -> Readings:
    return Readings()


def _room(store: Store, hypervisor: Hypervisor, readings: Readings, **kw: Any) -> Room:
    return Room(store.redis, hypervisor, "hv1", save_dir="/save",
                disk_reserve=Reserve(0.10, 10 * MiB), memory_reserve=Reserve(0.0, 100 * MiB),
                read_disk=lambda _d: readings.disk, read_memory=lambda _hv: readings.memory,
                clock=time.time, **kw)


@pytest.fixture
def room(store: Store, hypervisor: Hypervisor, readings: Readings) -> Room:
    return _room(store, hypervisor, readings)


@pytest.fixture
def ctx(hypervisor: Hypervisor, store: Store, room: Room) -> Context:
    return Context(hypervisor=hypervisor, store=store, host="hv1", lock_wait=0.2,
                   verify_timeout=2.0, clock=time.time, room=room)


def _promised(store: Store, resource: str) -> dict[Any, Any]:
    return dict(store.redis.hgetall(keys.reserved("hv1", resource)))


def test_a_save_that_fits_is_promised_its_room_until_it_returns(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    dom = make_domain()
    result = run(ctx, Request(action=Action.SUSPEND, instance=dom.UUIDString(),
                              request_id="s-1"))
    assert result["outcome"] == "changed" and dom.hasManagedSaveImage()
    assert _promised(store, "disk") == {}  # released when the save returned


def test_a_save_that_does_not_fit_is_refused_before_the_guest_is_touched(
        ctx: Context, store: Store, readings: Readings, make_domain: DomainFactory) -> None:
    dom = make_domain(memory_mib=460)  # 500 MiB free - 100 MiB reserve (10 % of 1000) = 400
    refused = metrics.ROOM_REFUSED.labels("hv1", "disk")._value.get()
    with pytest.raises(SaveDirectoryFull, match=r"save directory full: no room to suspend "
                       r".* in /save: 500 MiB free, 460 MiB needed \(its memory\) \+ 100 MiB"):
        run(ctx, Request(action=Action.SUSPEND, instance=dom.UUIDString(), request_id="s-2"))
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and not dom.hasManagedSaveImage()
    [entry] = store.journal(dom.UUIDString())
    assert entry["outcome"] == "failed" and entry["error_type"] == "SaveDirectoryFull"
    assert entry["details"] == {"resource": "disk", "where": "/save", "free_bytes": 500 * MiB,
                                "total_bytes": 1000 * MiB, "needed_bytes": 460 * MiB,
                                "reserve_bytes": 100 * MiB}
    assert "state_before" in (store.request("s-2") or {})  # recorded as failed, never started
    assert store.request("s-2")["status"] == "failed"  # type: ignore[index]
    assert metrics.ROOM_REFUSED.labels("hv1", "disk")._value.get() == refused + 1
    assert _promised(store, "disk") == {}


def test_room_promised_to_saves_in_flight_is_a_transient_refusal(
        ctx: Context, room: Room, store: Store, hypervisor: Hypervisor,
        make_domain: DomainFactory) -> None:
    first, second = make_domain(memory_mib=300), make_domain(memory_mib=200)
    # the first one's save is running (400 MiB of room)
    promise = room.promise(Step.SAVE, hypervisor.guest(first.UUIDString()), "suspend")
    assert promise is not None and _promised(store, "disk").keys() == {first.UUIDString()}
    with pytest.raises(RoomReserved, match=r"promised to others in flight.*300 MiB promised"):
        run(ctx, Request(action=Action.SUSPEND, instance=second.UUIDString(), request_id="s-3",
                         final_attempt=False))
    assert second.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert store.journal(second.UUIDString())[-1]["outcome"] == "retrying"
    room.release(promise)  # the first save returned: now it fits
    assert run(ctx, Request(action=Action.SUSPEND, instance=second.UUIDString(),
                            request_id="s-3"))["outcome"] == "changed"


def test_a_promise_whose_worker_died_lapses_past_its_deadline(
        store: Store, hypervisor: Hypervisor, readings: Readings,
        make_domain: DomainFactory) -> None:
    first, second = make_domain(memory_mib=300), make_domain(memory_mib=200)
    then = _room(store, hypervisor, readings)
    assert then.promise(Step.SAVE, hypervisor.guest(first.UUIDString()), "suspend")
    deadline = hypervisor.save_deadline(300 * MiB) + 60
    later = Room(store.redis, hypervisor, "hv1", save_dir="/save",
                 disk_reserve=Reserve(0.10, 10 * MiB), memory_reserve=Reserve(0.0, 0),
                 read_disk=lambda _d: readings.disk, read_memory=lambda _hv: None,
                 clock=lambda: time.time() + deadline + 1)
    assert later.promise(Step.SAVE, hypervisor.guest(second.UUIDString()), "suspend")
    assert _promised(store, "disk").keys() == {second.UUIDString()}  # the dead one dropped


def test_a_resume_that_does_not_fit_in_memory_is_refused_and_stays_suspended(
        ctx: Context, store: Store, readings: Readings, make_domain: DomainFactory) -> None:
    dom = make_domain(memory_mib=960)  # 1024 MiB available - 100 MiB reserve = 924 MiB of room
    readings.disk = Disk("/save", total=10000 * MiB, free=5000 * MiB)
    assert run(ctx, Request(action=Action.SUSPEND, instance=dom.UUIDString(),
                            request_id="m-1"))["outcome"] == "changed"
    with pytest.raises(HostMemoryShort, match=r"not enough memory to resume .*: 1.0 GiB "
                       r"available \(host memory \(MemAvailable\)\), 960 MiB needed"):
        run(ctx, Request(action=Action.RESUME, instance=dom.UUIDString(), request_id="m-2"))
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage()
    entry = store.journal(dom.UUIDString())[-1]
    assert entry["error_type"] == "HostMemoryShort"
    assert entry["details"]["needed_bytes"] == 960 * MiB
    readings.memory = Memory(total=4096 * MiB, available=2048 * MiB, source="MemAvailable")
    assert run(ctx, Request(action=Action.RESUME, instance=dom.UUIDString(),
                            request_id="m-3"))["outcome"] == "changed"
    assert _promised(store, "memory") == {}


def test_pause_and_unpause_need_no_room(
        ctx: Context, readings: Readings, make_domain: DomainFactory) -> None:
    readings.disk = Disk("/save", total=1000 * MiB, free=0)
    readings.memory = Memory(total=4096 * MiB, available=0, source="MemAvailable")
    dom = make_domain()
    for i, action in enumerate((Action.PAUSE, Action.UNPAUSE)):
        assert run(ctx, Request(action=action, instance=dom.UUIDString(),
                                request_id=f"p-{i}"))["outcome"] == "changed"


def test_unchecked_resources_are_not_refused(
        store: Store, hypervisor: Hypervisor, readings: Readings,
        make_domain: DomainFactory) -> None:
    """The test driver writes no image and has no node statistics: nothing to check."""
    readings.disk = Disk("/save", total=1000 * MiB, free=0)
    readings.memory = None
    ctx = Context(hypervisor=hypervisor, store=store, host="hv1", lock_wait=0.2,
                  verify_timeout=2.0, clock=time.time,
                  room=_room(store, hypervisor, readings, check_disk=False))
    dom = make_domain()
    for i, action in enumerate((Action.SUSPEND, Action.RESUME)):
        assert run(ctx, Request(action=action, instance=dom.UUIDString(),
                                request_id=f"u-{i}"))["outcome"] == "changed"


class _SettledGuest:
    """What failed_save.settle asks of a guest after libvirt failed its save."""

    name, uuid = "web-1", "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"

    def __init__(self, after: str, memory_mib: int = 64) -> None:
        self.after, self.memory = after, memory_mib * MiB

    def settle_failed_save(self, *, was_running: bool) -> list[str]:
        return ["partial image removed"] if was_running else []

    def observe(self) -> Observed:
        return Observed(State(self.after))

    def memory_bytes(self) -> int:
        return self.memory


@pytest.mark.parametrize(("error", "after", "free_mib", "expected"), [
    # libvirt's helper failed (ENOSPC says no more) and the directory has no room now.
    (HypervisorRefused("operation failed: ... No space left on device"), "running", 20,
     "SaveDirectoryFull"),
    # The same failure with room enough now (someone freed it since): libvirt's own error.
    (HypervisorRefused("operation failed: ..."), "running", 500, "HypervisorRefused"),
    # "Operation invalid" for a guest still running: libvirt will never save this one.
    (InvalidTransition("cannot migrate domain: ... 'ivshmem'"), "running", 500, "Unsavable"),
    # "Operation invalid" because it stopped meanwhile: not the guest's definition.
    (InvalidTransition("domain is not running"), "shutoff", 500, "InvalidTransition"),
])
def test_a_failed_save_is_named_by_what_the_host_and_the_guest_say_after_it(
        room: Room, readings: Readings, error: DormantError, after: str, free_mib: int,
        expected: str) -> None:
    readings.disk = Disk("/save", total=1000 * MiB, free=free_mib * MiB)
    named = failed_save.settle(error, _SettledGuest(after),  # type: ignore[arg-type]
                               Observed(State.RUNNING), room, "suspend")
    assert type(named).__name__ == expected
    assert named.details["settled"] == ["partial image removed"]
    assert named.details["state_after"] == after
    if expected == "SaveDirectoryFull":
        assert str(named).startswith("the save failed: save directory full")
        assert named.details["libvirt_error"] == str(error)
