"""Tiny real guests from a 512-byte boot sector: no OS image, no download.

A *busy* guest spins (``jmp $``) and burns one vCPU; an *idle* guest halts (``cli; hlt``) and
uses ~0.02 % of one. ``make run``'s demo fleet (worker/demo/bringup.py) and the test suite's guests
(tests/support/guests.py) are both built from this recipe. Pure: it only makes bytes and XML.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from xml.sax.saxutils import escape

BOOT_SECTORS = {
    "busy": bytes([0xEB, 0xFE]),  # jmp $
    "idle": bytes([0xFA, 0xF4, 0xEB, 0xFD]),  # cli; hlt; jmp back to hlt
}


def kvm_usable() -> bool:
    """KVM when /dev/kvm is usable, else the guests run under TCG (``type='qemu'``)."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def domain_type() -> str:
    return "kvm" if kvm_usable() else "qemu"


def boot_sector(kind: str) -> bytes:
    """The 512-byte disk of a ``busy`` or ``idle`` guest (bytes 510-511 = 55 AA)."""
    code = BOOT_SECTORS[kind]
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def domain_xml(name: str, disk: Path, *, uuid: str, domain_type: str, memory_mib: int = 32,
               metadata: str = "") -> str:
    """A persistent domain booting ``disk`` (IDE, writable: IDE refuses ``<readonly/>``)."""
    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    return f"""<domain type='{domain_type}'>
  <name>{escape(name)}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <metadata>{metadata}</metadata>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{escape(str(disk))}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""
