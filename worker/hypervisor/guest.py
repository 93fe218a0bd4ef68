"""``Guest``: one libvirt domain, with one method per meaning.

The names settle the vocabulary once: dormant's *pause* is libvirt's suspend (vCPUs stopped,
memory kept in RAM), dormant's *suspend* is libvirt's managed save (memory written to disk),
dormant's *resume* is starting from that image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

import libvirt

from worker.core import states
from worker.core.errors import HypervisorRefused
from worker.core.states import Observed
from worker.transition.table import Step

if TYPE_CHECKING:
    from worker.hypervisor.calls import Line
    from worker.hypervisor.host import Hypervisor

T = TypeVar("T")


class Guest:
    """One libvirt domain, with methods named for what they mean to dormant."""

    def __init__(self, domain: libvirt.virDomain, hypervisor: Hypervisor,
                 line: Line | None = None) -> None:
        self._domain = domain
        self._hypervisor = hypervisor
        self._line = line  # the connection the handle belongs to; its calls go there
        self.uuid: str = domain.UUIDString()
        self.name: str = domain.name()
        self.cached_epoch = 0  # Hypervisor.observe's cache: the epoch this handle was kept at

    @property
    def domain(self) -> libvirt.virDomain:
        """The libvirt handle (for calls that take several domains, in this package only)."""
        return self._domain

    def _call(self, what: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        return self._hypervisor.call(f"{what} {self.name}", fn, line=self._line,
                                     timeout=timeout)

    def observe(self) -> Observed:
        """Read the real state from libvirt (never from a cache)."""
        state, reason = self._call("read state of", self._domain.state)
        has_image = False
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            has_image = bool(self._call("check saved image of", self._domain.hasManagedSaveImage))
        job = self.job_running() if states.needs_job_check(state, reason) else True
        return states.from_libvirt(state, reason, has_image, job_running=job)

    def job_running(self) -> bool:
        """Whether a libvirt job (save, restore, migration...) is moving this guest now."""
        try:
            info = self._call("read job of", self._domain.jobInfo)
        except HypervisorRefused:  # a driver without job info (test driver): nothing runs
            return False
        return bool(info) and info[0] != libvirt.VIR_DOMAIN_JOB_NONE

    def _save_deadline(self) -> float:
        """Seconds a save or restore may take: a base plus a share per GiB of memory."""
        kib = self._call("read memory size of", self._domain.maxMemory)
        return self._hypervisor.save_deadline(int(kib) * 1024)

    def pause(self) -> None:
        """Stop the vCPUs, keep memory in RAM (virDomainSuspend)."""
        self._call("pause", self._domain.suspend)

    def unpause(self) -> None:
        self._call("unpause", self._domain.resume)

    def save_memory_to_disk(self) -> None:
        """Managed save; the guest restores *running* whatever state it was saved in."""
        flags = libvirt.VIR_DOMAIN_SAVE_RUNNING | self._hypervisor.save_flags
        self._call("suspend", lambda: self._domain.managedSave(flags),
                   timeout=self._save_deadline())

    def restore(self) -> None:
        """Start from the managed-save image (virDomainCreate)."""
        flags = self._hypervisor.restore_flags
        self._call("resume", lambda: self._domain.createWithFlags(flags),
                   timeout=self._save_deadline())

    def restore_paused(self) -> None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED | self._hypervisor.restore_flags
        self._call(
            "resume paused",
            lambda: self._domain.createWithFlags(flags),
            timeout=self._save_deadline(),
        )

    def run(self, step: Step) -> None:
        """Perform one planned step."""
        {
            Step.PAUSE: self.pause,
            Step.UNPAUSE: self.unpause,
            Step.SAVE: self.save_memory_to_disk,
            Step.RESTORE: self.restore,
            Step.RESTORE_PAUSED: self.restore_paused,
        }[step]()

    def metadata(self, namespace: str) -> str | None:
        """The element dormant keeps in the domain's ``<metadata>``, or None."""
        def read() -> str | None:
            try:
                return cast(str | None, self._domain.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise
        return self._call("read metadata of", read)
