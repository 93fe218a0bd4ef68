"""make run's demo fleet (worker/demo/bringup.py) on libvirt's test driver: stable names and UUIDs,
leftovers of a killed run removed before the fleet is created again, nothing left by down."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from worker.core.states import State
from worker.demo import bootsector
from worker.demo import bringup as demo
from worker.hypervisor import Hypervisor


@pytest.fixture
def private_hv(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A test-driver hypervisor of its own (a file URI: a private, empty node)."""
    node = tmp_path / "node.xml"
    node.write_text("<node></node>\n")
    hv = Hypervisor(f"test://{node}")
    yield hv
    hv.close()


def test_fleet_is_named_apart_from_test_guests_with_uuids_derived_from_names() -> None:
    names = [g.name for g in demo.FLEET]
    assert all(n.startswith("dormant-demo-") for n in names) and len(set(names)) == len(names)
    assert {g.kind for g in demo.FLEET} == {"busy", "idle"}
    assert [g.kind for g in demo.FLEET].count("busy") == 1  # a spinning guest burns a core
    for g in demo.FLEET:
        assert uuid.UUID(g.uuid).version == 5
        assert g.uuid == demo.demo_uuid(g.name)
    assert len({g.uuid for g in demo.FLEET}) == len(demo.FLEET)
    # Fixed for good: Redis keeps history and request ids by UUID from one run to the next.
    assert demo.demo_uuid("dormant-demo-web") == "0b28e4d8-ab03-5501-85af-fbd2cbf7b332"


def test_up_replaces_leftovers_and_down_removes_guests_and_disks(private_hv: Hypervisor,
                                                                 tmp_path: Path) -> None:
    disks = tmp_path / "disks"
    demo.up(private_hv, disks)
    running = {g.name: (g.uuid, g.observe().state) for g in private_hv.guests()}
    assert running == {g.name: (g.uuid, State.RUNNING) for g in demo.FLEET}
    for g in demo.FLEET:
        assert demo.disk_path(disks, g.name).read_bytes() == bootsector.boot_sector(g.kind)

    # A killed run left its guests (one of them paused, one a stray older name): up again
    # removes them all and creates the fleet afresh, with the same UUIDs.
    private_hv.guest("dormant-demo-db").pause()
    private_hv.define_and_start(bootsector.domain_xml(
        "dormant-demo-old", disks / "dormant-demo-old.img", uuid=demo.demo_uuid("old"),
        domain_type="kvm"))
    demo.up(private_hv, disks)
    again = {g.name: (g.uuid, g.observe().state) for g in private_hv.guests()}
    assert again == running

    assert demo.down(private_hv, disks) == sorted(g.name for g in demo.FLEET)
    assert private_hv.guests() == []
    assert list(disks.iterdir()) == []
    assert demo.down(private_hv, disks) == []  # nothing left: quiet


def test_boot_sectors_spin_or_halt_and_end_with_the_boot_signature() -> None:
    busy, idle = bootsector.boot_sector("busy"), bootsector.boot_sector("idle")
    assert len(busy) == len(idle) == 512
    assert busy[:2] == b"\xeb\xfe" and idle[:2] == b"\xfa\xf4"
    assert busy[-2:] == idle[-2:] == b"\x55\xaa"
    xml = bootsector.domain_xml("a<b", Path("/x/a.img"), uuid="u-1", domain_type="qemu")
    assert "<name>a&lt;b</name>" in xml and "<uuid>u-1</uuid>" in xml
    assert "<domain type='qemu'>" in xml and "bus='ide'" in xml


def test_every_dormant_variable_run_sh_reads_is_a_setting() -> None:
    """`DORMANT_CONCURRENCY=4 make run` once died: run.sh read a name the settings reject."""
    from dataclasses import fields

    from worker.core import settings

    script = (Path(__file__).resolve().parents[3] / "scripts" / "run.sh").read_text()
    used = set(re.findall(r"\bDORMANT_[A-Z0-9_]+", script))
    known = {settings.PREFIX + f.name.upper() for f in fields(settings.Settings)}
    assert "DORMANT_CONCURRENCY" in used and "DORMANT_RECLAIM_EVERY" in used
    assert used <= known, used - known
    loaded = settings.load({"DORMANT_CONCURRENCY": "4", "DORMANT_RECLAIM_EVERY": "240"})
    assert (loaded.concurrency, loaded.reclaim_every) == (4, 240)
