"""Tiny real KVM guests for tests and benchmarks: a 512-byte boot sector, no OS image.

A *busy* guest spins (``jmp $``) and burns one vCPU; an *idle* guest halts (``cli; hlt``).
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

BOOT_SECTORS = {
    "busy": bytes([0xEB, 0xFE]),  # jmp $
    "idle": bytes([0xFA, 0xF4, 0xEB, 0xFD]),  # cli; hlt; jmp back to hlt
}
NAME_PREFIX = "dormant-test-"


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def boot_sector(kind: str) -> bytes:
    code = BOOT_SECTORS[kind]
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def domain_xml(name: str, disk: Path, *, domain_type: str, memory_mib: int = 32,
               metadata: str = "") -> str:
    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <metadata>{metadata}</metadata>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""


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
        self.domain_type = "kvm" if kvm_usable() else "qemu"
        self.created: list[TestGuest] = []

    def create(self, kind: str = "idle", *, name: str | None = None, start: bool = True,
               metadata: str = "") -> TestGuest:
        # The creating pid is part of the name: remove_leftovers spares live sessions' guests.
        name = name or f"{NAME_PREFIX}{kind}-{uuid.uuid4().hex[:8]}-p{os.getpid()}"
        disk = self.workdir / f"{name}.img"
        disk.write_bytes(boot_sector(kind))
        xml = domain_xml(name, disk, domain_type=self.domain_type, metadata=metadata)
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
