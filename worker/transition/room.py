"""Room on the host before a save or a restore, counting those already in flight there.

A managed save writes the guest's memory (at most ``maxMemory``, plus a little device state)
into the save directory's filesystem, which may hold other guests' disks: when it fills, their
writes fail and QEMU pauses them (``paused(ioerror)``), and the save itself fails. A restore
needs the guest's memory available on the host, or the host swaps or its OOM killer takes a
running guest. So before either, the worker reads what is free now
(:mod:`worker.hypervisor.resources`) and refuses what does not fit while keeping a *reserve*
free: a fraction of the filesystem (or of the host's memory), but at least a floor.

Saves and restores already running on the host still have to write (or fill) their share, so
each holds a *promise* of its bytes in Redis (``keys.reserved``; taken and checked against the
others in one Lua script, ``lua/reserve.lua``), released when its libvirt call returns and
lapsing by itself past the call's deadline if its worker died. A running save's whole memory
is counted although it has written part of it already (conservative): so what fits only once
those in flight finish is the transient :class:`RoomReserved` (retried), and only what does
not fit even with nothing in flight is refused for good (:class:`SaveDirectoryFull`,
:class:`HostMemoryShort`). Either refusal comes before anything touches the guest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis

from worker.core import metrics
from worker.core.errors import HostMemoryShort, RoomReserved, SaveDirectoryFull
from worker.hypervisor import Guest, Hypervisor, resources
from worker.hypervisor.resources import Disk, Memory
from worker.store import keys
from worker.transition.table import Step

log = logging.getLogger("dormant.transition")

_RESERVE = (Path(__file__).with_name("lua") / "reserve.lua").read_text()
PROMISE_MARGIN = 60.0  # seconds a promise outlives its call's deadline


class Resource(StrEnum):
    DISK = "disk"  # the save directory's filesystem: what a save needs
    MEMORY = "memory"  # the host's available memory: what a restore needs


# What each step needs room for (pause and unpause keep the guest where it is).
NEEDS: dict[Step, Resource] = {
    Step.SAVE: Resource.DISK,
    Step.RESTORE: Resource.MEMORY,
    Step.RESTORE_PAUSED: Resource.MEMORY,
}


@dataclass(frozen=True)
class Reserve:
    """What stays free: ``fraction`` of the total, but at least ``floor`` bytes."""

    fraction: float
    floor: int

    def of(self, total: int) -> int:
        return max(int(total * self.fraction), self.floor)


class Fit(StrEnum):
    FITS = "fits"
    RESERVED = "reserved"  # fits once those in flight finish
    SHORT = "short"  # does not fit even with nothing in flight


def judge(*, need: int, free: int, reserve: int, in_flight: int) -> Fit:
    """Whether ``need`` bytes fit in ``free`` with ``reserve`` kept free (pure)."""
    room = free - reserve
    if need > room:
        return Fit.SHORT
    if need + in_flight > room:
        return Fit.RESERVED
    return Fit.FITS


def size(n: float) -> str:
    """Bytes for a person: ``512 MiB``, ``16.0 GiB``."""
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Promise:
    """Room promised to one guest's save or restore until :meth:`Room.release`."""

    resource: Resource
    uuid: str
    bytes: int


class Room:
    """The room checks of one worker's host (readers injectable for unit tests)."""

    def __init__(self, client: redis.Redis, hypervisor: Hypervisor, host: str, *,
                 save_dir: str, disk_reserve: Reserve, memory_reserve: Reserve,
                 check_disk: bool = True,
                 read_disk: Callable[[str], Disk] = resources.disk,
                 read_memory: Callable[[Hypervisor], Memory | None] = resources.memory,
                 clock: Callable[[], float] = time.time) -> None:
        self.client, self.hypervisor, self.host = client, hypervisor, host
        self.save_dir, self.check_disk = save_dir, check_disk
        self.reserves = {Resource.DISK: disk_reserve, Resource.MEMORY: memory_reserve}
        self.read_disk, self.read_memory, self.clock = read_disk, read_memory, clock
        self._reserve = client.register_script(_RESERVE)

    def reading(self, resource: Resource) -> tuple[int, int, str] | None:
        """(free, total, where) of ``resource`` now; None when it is not checked here."""
        if resource is Resource.DISK:
            if not self.check_disk:
                return None
            d = self.read_disk(self.save_dir)
            return d.free, d.total, d.directory
        m = self.read_memory(self.hypervisor)
        if m is None:
            return None
        return m.available, m.total, f"host memory ({m.source})"

    def promise(self, step: Step, guest: Guest, action: str) -> Promise | None:
        """Promise the room ``step`` needs for ``guest``, or refuse before it is touched."""
        resource = NEEDS.get(step)
        read = self.reading(resource) if resource is not None else None
        if resource is None or read is None:
            return None
        free, total, where = read
        need = guest.memory_bytes()
        reserve = self.reserves[resource].of(total)
        figures = {"resource": str(resource), "where": where, "free_bytes": free,
                   "total_bytes": total, "needed_bytes": need, "reserve_bytes": reserve}
        if judge(need=need, free=free, reserve=reserve, in_flight=0) is Fit.SHORT:
            raise self.refusal(resource, guest.name, action, figures)
        now = self.clock()
        expiry = now + self.hypervisor.save_deadline(need) + PROMISE_MARGIN
        got, in_flight = self._reserve(
            keys=[keys.reserved(self.host, resource)],
            args=[guest.uuid, need, free - reserve, int(now * 1000), int(expiry * 1000)])
        if not got:
            raise RoomReserved(
                f"room to {action} {guest.name} is promised to others in flight on this host: "
                f"{size(free)} free in {where}, {size(need)} needed + {size(reserve)} kept "
                f"free, {size(in_flight)} promised to saves or restores running now; retried "
                "once they finish", **figures, in_flight_bytes=int(in_flight))
        return Promise(resource, guest.uuid, need)

    def release(self, promise: Promise | None) -> None:
        if promise is not None:
            self.client.hdel(keys.reserved(self.host, promise.resource), promise.uuid)

    def refusal(self, resource: Resource, name: str, action: str, figures: dict[str, Any], *,
                failed: str = "") -> SaveDirectoryFull | HostMemoryShort:
        """The permanent refusal for ``resource``, counted in the metrics."""
        metrics.room_refused(self.host, str(resource))
        free, need, reserve = (figures["free_bytes"], figures["needed_bytes"],
                               figures["reserve_bytes"])
        if resource is Resource.DISK:
            return SaveDirectoryFull(
                f"{failed}save directory full: no room to {action} {name} in "
                f"{figures['where']}: {size(free)} free, {size(need)} needed (its memory) + "
                f"{size(reserve)} kept free", **figures)
        return HostMemoryShort(
            f"not enough memory to {action} {name} on this host: {size(free)} available "
            f"({figures['where']}), {size(need)} needed (its memory) + {size(reserve)} kept "
            "available", **figures)

    def after_failed_save(self, guest: Guest, action: str) -> SaveDirectoryFull | None:
        """A save failed: was the save directory what stopped it? (Someone else filled it
        since the check: libvirt says only that its helper failed.) The refusal if the guest
        does not fit now, else None."""
        read = self.reading(Resource.DISK)
        if read is None:
            return None
        free, total, where = read
        need = guest.memory_bytes()
        reserve = self.reserves[Resource.DISK].of(total)
        if judge(need=need, free=free, reserve=reserve, in_flight=0) is not Fit.SHORT:
            return None
        figures = {"resource": str(Resource.DISK), "where": where, "free_bytes": free,
                   "total_bytes": total, "needed_bytes": need, "reserve_bytes": reserve}
        refusal = self.refusal(Resource.DISK, guest.name, action, figures,
                               failed="the save failed: ")
        assert isinstance(refusal, SaveDirectoryFull)
        return refusal
