"""Tiny real KVM guests for tests and benchmarks: a 512-byte boot sector, no OS image.

A *busy* guest spins (``jmp $``) and burns one vCPU; an *idle* guest halts (``cli; hlt``); a
*writer* writes one disk sector per timer tick (~18 a second, the BIOS's extended write to
ever higher sectors of a sparse disk): a bystander whose writes fail, and which QEMU pauses
(``paused(ioerror)``), when the filesystem holding its disk fills.
The recipe (boot sectors, domain XML) is worker/demo/bootsector.py, shared with ``make run``'s demo.
Guests are persistent (defined) so managedsave works, uniquely named, and always destroyed,
undefined and stripped of their managed-save image by :meth:`GuestFactory.cleanup`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import libvirt

from worker.demo.bootsector import BOOT_SECTORS, boot_sector, domain_type, domain_xml, kvm_usable

__all__ = ["BOOT_SECTORS", "NAME_PREFIX", "GuestFactory", "TestGuest", "boot_sector",
           "kvm_usable", "remove_domain", "remove_leftovers"]

NAME_PREFIX = "dormant-test-"

# cli; xor ax,ax; mov ds,ax; mov ss,ax; mov sp,0x7c00; sti
# loop: mov si,dap; mov ah,0x43; xor al,al; mov dl,0x80; int 0x13  (write 1 sector, LBA dap+8)
#       add word [dap+8],1; adc word [dap+10],0; hlt (until the next timer tick); jmp loop
# dap (at 0x7c23): size 16, 1 sector, buffer 0000:7c00 (this very sector), LBA 1
WRITER = bytes.fromhex(
    "fa31c08ed88ed0bc007cfb"
    "be237cb44330c0b280cd13"
    "83062b7c0183162d7c00f4ebe8"
    "1000010000" "7c0000" "0100000000000000")


@dataclass
class TestGuest:
    name: str
    uuid: str
    kind: str
    domain: libvirt.virDomain

    def state(self) -> tuple[int, int]:
        return self.domain.state()


class GuestFactory:
    """Creates tiny guests on ``conn`` and removes every one of them on :meth:`cleanup`."""

    def __init__(self, conn: libvirt.virConnect, workdir: Path | None = None) -> None:
        self.conn = conn
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dormant-guests-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.domain_type = domain_type()
        self.created: list[TestGuest] = []

    def create(self, kind: str = "idle", *, name: str | None = None, start: bool = True,
               metadata: str = "", memory_mib: int = 32, disk_dir: Path | None = None,
               disk_mib: int = 64, devices: str = "") -> TestGuest:
        """``kind``: idle, busy or writer (whose sparse disk of ``disk_mib`` lies in
        ``disk_dir``); ``devices``: more XML for ``<devices>`` (an ivshmem ``<shmem>``)."""
        # The creating pid is part of the name: remove_leftovers spares live sessions' guests.
        name = name or f"{NAME_PREFIX}{kind}-{uuid.uuid4().hex[:8]}-p{os.getpid()}"
        disk = (disk_dir or self.workdir) / f"{name}.img"
        if kind == "writer":
            disk.write_bytes(WRITER + bytes(510 - len(WRITER)) + b"\x55\xaa")
            os.truncate(disk, disk_mib * 2**20)
        else:
            disk.write_bytes(boot_sector(kind))
        # A writer runs under TCG: under this machine's nested KVM (PVM) SeaBIOS never gets
        # past an IDE disk of more than one sector (measured: stuck in the BIOS for minutes).
        kvm = self.domain_type if kind != "writer" else "qemu"
        xml = domain_xml(name, disk, uuid=str(uuid.uuid4()), domain_type=kvm,
                         metadata=metadata, memory_mib=memory_mib)
        if devices:
            xml = xml.replace("</devices>", f"  {devices}\n  </devices>")
        domain = self.conn.defineXML(xml)
        guest = TestGuest(name=name, uuid=domain.UUIDString(), kind=kind, domain=domain)
        self.created.append(guest)
        if start:
            domain.create()
        return guest

    def cleanup(self) -> None:
        for guest in self.created:
            remove_domain(self.conn, guest.name)
        self.created.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    """Destroy, drop the managed-save image and undefine; quiet when already gone."""
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    with suppress(libvirt.libvirtError):
        domain.destroy()
    with suppress(libvirt.libvirtError):
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                             | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def remove_leftovers(conn: libvirt.virConnect) -> None:
    """Remove guests an earlier, killed test session left behind."""
    for domain in conn.listAllDomains():
        if domain.name().startswith(NAME_PREFIX) and not _owner_alive(domain.name()):
            remove_domain(conn, domain.name())


def _owner_alive(name: str) -> bool:
    """True when the name carries the pid of another live process (a concurrent session)."""
    _, _, pid = name.rpartition("-p")
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
