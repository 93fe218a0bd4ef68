"""``make run``'s demo fleet: tiny real guests on the local libvirtd, some busy, some idle.

Boot-sector guests (worker/demo/bootsector.py: 32 MiB, 1 vCPU; KVM, TCG where /dev/kvm is
missing) named ``dormant-demo-*``, so they never meet the test suite's ``dormant-test-*``
guests. Their UUIDs derive from their names (uuid5): Redis history, samples and request ids
stay attached to the same guest from one ``make run`` to the next. ``up`` first removes what a
killed run left behind, then creates and starts the fleet; ``down`` destroys, undefines (with
the managed-save image) and deletes the disks. scripts/run.sh holds a machine-wide lock around
both, so two demos never share the names.

Where libvirtd cannot run, the same names and UUIDs are seeded into libvirt's in-process test
driver instead (``worker.hypervisor.testdriver``, from the data in
``worker.demo.fleet``).

    python -m worker.demo.bringup up|down [--uri qemu:///system] [--disks DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from worker.core.errors import DormantError
from worker.demo import bootsector
from worker.demo.fleet import FLEET, PREFIX, DemoGuest
from worker.demo.fleet import demo_uuid as demo_uuid  # re-exported: the demo's public name
from worker.hypervisor import Hypervisor

DEFAULT_URI = "qemu:///system"
DEFAULT_DISKS = Path("/var/lib/libvirt/images/dormant-demo")


def disk_path(disks: Path, name: str) -> Path:
    return disks / f"{name}.img"


def down(hv: Hypervisor, disks: Path) -> list[str]:
    """Remove every ``dormant-demo-*`` domain (this run's or a killed run's) and its disk."""
    names = {g.name for g in hv.guests() if g.name.startswith(PREFIX)}
    removed = [name for name in sorted(names) if hv.remove(name)]
    for guest in FLEET:
        disk_path(disks, guest.name).unlink(missing_ok=True)
    for leftover in disks.glob(f"{PREFIX}*.img") if disks.is_dir() else ():
        leftover.unlink(missing_ok=True)
    return removed


def up(hv: Hypervisor, disks: Path) -> list[DemoGuest]:
    """Create and start the fleet afresh (after removing any leftovers)."""
    down(hv, disks)
    disks.mkdir(parents=True, exist_ok=True)
    kind = bootsector.domain_type()
    for guest in FLEET:
        disk = disk_path(disks, guest.name)
        disk.write_bytes(bootsector.boot_sector(guest.kind))
        hv.define_and_start(bootsector.domain_xml(guest.name, disk, uuid=guest.uuid,
                                                  domain_type=kind))
    return list(FLEET)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.demo.bringup", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--uri", default=DEFAULT_URI)
    parser.add_argument("--disks", type=Path, default=DEFAULT_DISKS)
    args = parser.parse_args(argv)
    hv = Hypervisor(args.uri)
    try:
        if args.action == "up":
            guests = up(hv, args.disks)
            virt = "KVM" if bootsector.kvm_usable() else "TCG emulation (no usable /dev/kvm)"
            print(f"demo fleet on {args.uri} ({virt}, 32 MiB, 1 vCPU each):")
            for guest in guests:
                print(f"    {guest.name:<22} {guest.uuid}  {guest.role}")
        else:
            removed = down(hv, args.disks)
            print(f"demo fleet removed from {args.uri}: {', '.join(removed) or 'nothing left'}")
    except DormantError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        hv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
