"""What the host has room for: free space where libvirtd writes save images, available memory.

Readings only; :mod:`worker.transition.room` decides what fits.

**Disk**: ``statvfs`` of the save directory (``DORMANT_SAVE_DIR``; libvirt 9.0 has no setting
for it: ``/var/lib/libvirt/qemu/save``), so the worker must see that directory (read-only is
enough). Free space is ``f_bavail``, what an unprivileged writer may still use: libvirtd
writes images as root and could dig into the root-reserved blocks, but QEMU writes guests'
disks on the same filesystem as an unprivileged user, and those are what a full filesystem
pauses (``paused(ioerror)``).

**Memory**: what a restored guest may take without the host swapping. libvirt's node
statistics (``getMemoryStats``: total, free, buffers, cached) describe the hypervisor wherever
the worker runs, but ``free + buffers + cached`` counts shared memory as if it could be
dropped: tmpfs, and the RAM of guests backed by memfd or shared memory (virtiofs,
vhost-user), which is all "cached". The kernel's ``MemAvailable`` (``/proc/meminfo``) leaves
that out: it is the estimate of memory available for new work without swapping, which is the
question. So a worker on its hypervisor (a local URI, the supported deployment) takes the
smaller of the two; a remote URI has only libvirt's. A driver without node statistics (the
test driver) gives ``None``: not checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import libvirt

from worker.core.errors import ConfigurationError, HypervisorRefused

if TYPE_CHECKING:
    from worker.hypervisor.host import Hypervisor

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class Disk:
    """The save directory's filesystem, in bytes."""

    directory: str
    total: int
    free: int


@dataclass(frozen=True)
class Memory:
    """The host's memory, in bytes; ``source`` says where ``available`` came from."""

    total: int
    available: int
    source: str


def disk(directory: str) -> Disk:
    """The filesystem holding ``directory``; ConfigurationError when it cannot be read (a
    worker that cannot see the save directory must not guess: the save is refused)."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read free space of the save directory {directory!r} ({exc.strerror}): "
            "the worker must see libvirt's save directory (DORMANT_SAVE_DIR; a read-only "
            "mount is enough)") from None
    return Disk(directory, total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


def mem_available(text: str) -> int | None:
    """``MemAvailable`` of a ``/proc/meminfo`` text, in bytes (None when absent)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def local(uri: str) -> bool:
    """Whether ``uri`` is a hypervisor on this machine (no host part: ``qemu:///system``)."""
    return not urlsplit(uri).netloc


def memory(hv: Hypervisor) -> Memory | None:
    """The host's total and available memory (see the module docstring); None when the
    driver has no node statistics."""
    conn = hv.connection()
    try:
        stats = hv.call("read node memory statistics",
                        lambda: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0))
    except HypervisorRefused:  # VIR_ERR_NO_SUPPORT: libvirt's test driver
        return None
    kib = {k: int(v) for k, v in stats.items()}
    total = kib.get("total", 0) * 1024
    available = (kib.get("free", 0) + kib.get("buffers", 0) + kib.get("cached", 0)) * 1024
    source = "libvirt free+buffers+cached"
    if local(hv.uri):
        try:
            kernel = mem_available(MEMINFO.read_text())
        except OSError:
            kernel = None
        if kernel is not None and kernel < available:
            available, source = kernel, "MemAvailable"
    return Memory(total=total, available=available, source=source)
