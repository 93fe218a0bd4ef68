"""Activity statistics for reclamation: one ``getAllDomainStats`` call for every domain.

The call never waits for a domain's job (``NOWAIT``): without it, one guest in the middle of
a save, or with a stuck QEMU, held the whole host's sample until libvirt's job wait expired.
With it, libvirt leaves out of that guest's record what needs the job (block statistics
from QEMU's monitor), while its CPU time, read from the host, may stand still: so every
running guest's control state is read too (``controlInfo``, answered without waiting), and a
guest a job holds is reported ``busy`` -- a gap in its activity, never evidence of idleness.
A record that lacks its block counters is ``busy`` as well: another caller's query held the
guest for that instant (two stats calls at once), and a missing counter must not be stored
as zero, which would read as a reset.

Some guests' stats (:meth:`Hypervisor.stats_of`: the re-check just before a suspend) wait
for those guests' own jobs instead: the reading is about to decide whether to save one, and
two such readings of different guests no longer cut into each other's records.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import libvirt

from worker.core import states
from worker.core.errors import UnknownInstance
from worker.core.states import Observed, State
from worker.hypervisor.guest import Guest

if TYPE_CHECKING:
    from worker.hypervisor.host import Hypervisor


@dataclass(frozen=True)
class DomainStats:
    """One ``getAllDomainStats`` record, flattened to what reclamation needs."""

    uuid: str
    name: str
    state: State
    cpu_time_ns: int | None
    vcpus: int
    net_rx_bytes: int
    net_tx_bytes: int
    block_rd_bytes: int
    block_wr_bytes: int


ACTIVITY = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)


def collect(hypervisor: Hypervisor, *, activity: bool = True,
            wait_for_jobs: bool = False) -> Iterator[DomainStats]:
    """State, cpu, vcpu, net and block of every domain, from one ``getAllDomainStats`` call.

    ``activity=False`` asks for the state alone (the registry): libvirt answers that without
    a job on any guest, so it never cuts into a sample taken at the same moment, which would
    then find its guests held (busy, a gap in their evidence). The counters are then 0.
    ``wait_for_jobs``: the re-check of some guests (:meth:`Hypervisor.stats_of`).
    """
    hv = hypervisor
    conn, line = hv.connection(), hv.line()
    wanted = ACTIVITY if activity else libvirt.VIR_DOMAIN_STATS_STATE
    flags = 0 if wait_for_jobs else libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    records = hv.call("read domain stats", lambda: conn.getAllDomainStats(wanted, flags),
                      line=line)
    for domain, record in records:
        has_image = False
        state = record.get("state.state", libvirt.VIR_DOMAIN_NOSTATE)
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            try:
                has_image = bool(hv.call("check image", domain.hasManagedSaveImage,
                                         line=line))
            except UnknownInstance:  # undefined since the stats call: gone, not an error
                continue
        reason = record.get("state.reason", 0)
        job = False
        if state != libvirt.VIR_DOMAIN_SHUTOFF:
            try:  # a job holds it (its record may be partial), or a finished paused restore
                job = Guest(domain, hv, line).job_running()
            except UnknownInstance:
                continue
        observed = states.from_libvirt(state, reason, has_image, job_running=job)
        if (job or _partial(record)) and observed.state is not State.BUSY:
            observed = Observed(State.BUSY, "job")
        yield DomainStats(
            uuid=domain.UUIDString(),
            name=domain.name(),
            state=observed.state,
            cpu_time_ns=record.get("cpu.time"),
            vcpus=int(record.get("vcpu.current", record.get("vcpu.maximum", 1)) or 1),
            net_rx_bytes=_sum(record, "net", "rx.bytes"),
            net_tx_bytes=_sum(record, "net", "tx.bytes"),
            block_rd_bytes=_sum(record, "block", "rd.bytes"),
            block_wr_bytes=_sum(record, "block", "wr.bytes"),
        )


def _partial(record: dict[str, Any]) -> bool:
    """Whether libvirt left a disk's counters out of ``record`` (a job held the guest)."""
    count = int(record.get("block.count", 0))
    return any(f"block.{i}.rd.bytes" not in record or f"block.{i}.wr.bytes" not in record
               for i in range(count))


def _sum(record: dict[str, Any], group: str, field: str) -> int:
    count = int(record.get(f"{group}.count", 0))
    return sum(int(record.get(f"{group}.{i}.{field}", 0)) for i in range(count))
