"""libvirt's in-process test driver as ``make run``'s fallback hypervisor."""

from __future__ import annotations

import logging

import libvirt

from worker.demo.fleet import FLEET

log = logging.getLogger("dormant.hypervisor")


def seed_demo_fleet(conn: libvirt.virConnect) -> None:
    """Give libvirt's in-process test driver ``make run``'s demo fleet (the fallback where
    libvirtd cannot run): the same names and UUIDs as the real one (worker/demo/fleet.py).

    ``test:///default`` is the embedded default hypervisor; it starts with one domain and is
    private to this process, so defining a demo fleet here touches nothing real. Its guests
    report no CPU time, so reclamation never finds them idle.
    """
    if conn.getURI() != "test:///default":
        return
    existing = set(conn.listDefinedDomains()) | {d.name() for d in conn.listAllDomains()}
    for guest in FLEET:
        if guest.name in existing:
            continue
        xml = (
            f"<domain type='test'><name>{guest.name}</name><uuid>{guest.uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        )
        try:
            conn.defineXML(xml).create()
        except libvirt.libvirtError as exc:  # another thread seeded it first
            log.debug("demo fleet: %s", exc.get_error_message())
