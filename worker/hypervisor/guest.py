"""``Guest``: one libvirt domain, with one method per meaning.

The names settle the vocabulary once: dormant's *pause* is libvirt's suspend (vCPUs stopped,
memory kept in RAM), dormant's *suspend* is libvirt's managed save (memory written to disk),
dormant's *resume* is starting from that image.
"""

from __future__ import annotations

import errno
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

import libvirt

from worker.core import states
from worker.core.errors import HypervisorRefused, InvalidTransition
from worker.core.states import Observed
from worker.transition.table import Step

if TYPE_CHECKING:
    from worker.hypervisor.calls import Line
    from worker.hypervisor.host import Hypervisor

T = TypeVar("T")
MONITOR_STUCK_MS = 1000  # a monitor call this old is a stuck QEMU, not another thread's query
# metadata(): no element of that namespace, or no definition (a transient domain).
_NO_COPY = {libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_OPERATION_INVALID}


def element_in(domain_xml: str, namespace: str) -> str | None:
    """The ``<metadata>`` child of ``namespace`` in a whole domain XML, or None."""
    metadata = ET.fromstring(domain_xml).find("metadata")
    for child in metadata if metadata is not None else ():
        if child.tag.startswith(f"{{{namespace}}}"):
            return ET.tostring(child, encoding="unicode")
    return None


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
        """Whether a libvirt job (save, restore, migration...) or a monitor call stuck for a
        while holds this guest now. Read from its control state, which libvirt answers
        without waiting for the job (``jobInfo`` waits up to 30 s for the domain's job lock).
        A query of another thread occupies the monitor for milliseconds: not a job."""
        try:
            control = self._call("read control state of", self._domain.controlInfo)
        except InvalidTransition:  # not running: no job can hold it
            return False
        except HypervisorRefused:  # a driver without control info: nothing runs
            return False
        if not control:
            return False
        state, _details, held_ms = control
        return bool(state == libvirt.VIR_DOMAIN_CONTROL_JOB or (
            state == libvirt.VIR_DOMAIN_CONTROL_OCCUPIED and held_ms >= MONITOR_STUCK_MS))

    def memory_bytes(self) -> int:
        """The most memory the guest may use (``maxMemory``): what a save writes at most, and
        what a restore needs."""
        return int(self._call("read memory size of", self._domain.maxMemory)) * 1024

    def _save_deadline(self) -> float:
        """Seconds a save or restore may take: a base plus a share per GiB of memory."""
        return self._hypervisor.save_deadline(self.memory_bytes())

    def definition_digest(self) -> str:
        """A digest of the persistent definition, ``<metadata>`` left out (dormant writes its
        own there): it changes when a device is added or removed, not when dormant acts."""
        xml = self._call("read definition of",
                         lambda: self._domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        root = ET.fromstring(xml)
        for element in root.findall("metadata"):
            root.remove(element)
        return hashlib.sha256(ET.tostring(root)).hexdigest()[:32]

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

    def settle_failed_save(self, *, was_running: bool) -> list[str]:
        """After a failed managed save: running again if it ran before, and no image left.

        libvirt resumes the guest itself (``running(save_canceled)``) but cannot promise it,
        and deletes an image it created, not one that was there before. A guest some other
        job holds (an operator's own save) is left alone: its image may be that job's.
        Returns what was done.
        """
        done: list[str] = []
        if self.job_running():
            return ["left alone: another libvirt job holds it"]
        state, reason = self._call("read state of", self._domain.state)
        if was_running and state == libvirt.VIR_DOMAIN_PAUSED \
                and states.left_paused_by_failed_save(reason):
            self.unpause()
            done.append(f"unpaused (libvirt left it paused, reason {reason})")
            state = libvirt.VIR_DOMAIN_RUNNING
        if state != libvirt.VIR_DOMAIN_SHUTOFF and self.discard_image():
            done.append("partial image removed")
        return done

    def discard_image(self) -> bool:
        """Remove the managed-save image; False when there was none. Only ever called on an
        active guest, whose image can only be a leftover (a restore deletes its own)."""
        def remove() -> bool:
            try:
                self._domain.managedSaveRemove(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR \
                        and exc.get_int1() == errno.ENOENT:  # the errno libvirt reports
                    return False
                raise
            return True
        return self._call("remove saved image of", remove)

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

    def metadata_copies(self, namespace: str) -> list[str]:
        """The element of ``namespace`` in every copy a later start could bring back: the
        running domain and its definition while active; the definition and the managed-save
        image while shut off (a restore brings back the image's live XML, not the
        definition's)."""
        def one(flags: int) -> str | None:
            try:
                return cast(str | None, self._domain.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, flags))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _NO_COPY:  # none there, or no definition (transient)
                    return None
                raise

        def read() -> list[str | None]:
            if self._domain.isActive():
                return [one(libvirt.VIR_DOMAIN_AFFECT_LIVE), one(libvirt.VIR_DOMAIN_AFFECT_CONFIG)]
            found = [one(libvirt.VIR_DOMAIN_AFFECT_CONFIG)]
            if self._domain.hasManagedSaveImage(0):
                try:
                    found.append(element_in(self._domain.managedSaveGetXMLDesc(0), namespace))
                except libvirt.libvirtError as exc:  # a driver that cannot read images
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
            return found
        return [xml for xml in self._call("read metadata of", read) if xml]

    def set_metadata(self, namespace: str, key: str, xml: str) -> None:
        """Write the element of ``namespace`` where it counts now: the running domain while
        active (a managed save carries it into the image), the definition while shut off.
        libvirt announces it with a metadata-change event, not a lifecycle one, so the drift
        watcher never sees it."""
        self._call("write metadata of", lambda: self._domain.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key, namespace,
            libvirt.VIR_DOMAIN_AFFECT_CURRENT))

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
