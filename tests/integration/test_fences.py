"""Fences at the guest on real libvirtd and QEMU: every transition that acts leaves its fence in
the guest's metadata, through a managed save and a restore, and the guest refuses a fence it
has already seen.

The runner is called in this process over ``qemu:///system`` and the private redis-server (the
Celery side is not what is tested here; tests/integration/test_events.py checks that 50 such
metadata writes leave no ``external`` entry in the drift journal). Each guest's element is read
with libvirt by the test itself, in the running domain and in its stored definition.
"""

from __future__ import annotations

import libvirt
import pytest

from tests.support.journal import real_state
from worker.hypervisor import Hypervisor
from worker.hypervisor.guest import element_in
from worker.store import keys
from worker.store.connection import connect
from worker.transition import fencing
from worker.transition.context import Context, Request
from worker.transition.guards import Store
from worker.transition.runner import run
from worker.transition.table import Action

pytestmark = pytest.mark.integration
LIVE, CONFIG = libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG


def copies(domain: libvirt.virDomain) -> dict[str, int]:
    """The fence in each copy of the guest's element: live (while active), config, and the
    managed-save image (while saved)."""
    found = {}
    for name, flags in (("live", LIVE), ("config", CONFIG)):
        try:
            xml = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, fencing.NAMESPACE, flags)
        except libvirt.libvirtError:
            continue
        found[name] = fencing.parse(xml).value
    if domain.hasManagedSaveImage(0):
        image = element_in(domain.managedSaveGetXMLDesc(0), fencing.NAMESPACE)
        found["image"] = fencing.parse(image).value
    return found


@pytest.fixture
def ctx(redis_clean):  # type: ignore[no-untyped-def]
    hv = Hypervisor("qemu:///system")
    store = Store(connect(redis_clean.url(2)), lock_ttl=30, result_ttl=600)
    yield Context(hypervisor=hv, store=store, host="hv-test", lock_wait=5, verify_timeout=30)
    hv.close()


@pytest.mark.slow
def test_the_guest_carries_every_fence_through_save_and_restore(ctx, guests) -> None:  # type: ignore[no-untyped-def]
    guest = guests.create("idle")
    fences = []
    for n, action in enumerate([Action.PAUSE, Action.SUSPEND, Action.RESUME, Action.PAUSE,
                                Action.UNPAUSE]):
        result = run(ctx, Request(action=action, instance=guest.uuid, request_id=f"f{n}"))
        assert result["outcome"] == "changed", result
        fences.append(result["fence"])
        seen = copies(guest.domain)
        assert max(seen.values()) == result["fence"], (action, seen)
        if action is Action.PAUSE:
            assert seen["live"] == result["fence"]  # the running domain only: cheaper
        if action is Action.SUSPEND:
            assert seen["image"] == result["fence"]  # the save carried it into its image
        if action is Action.RESUME:
            # The resume wrote the definition while the guest was shut off; QEMU's restore
            # brought back the image's live XML, older. The newest copy counts.
            assert seen["config"] == result["fence"] and seen["live"] < result["fence"]
    assert fences == sorted(set(fences))
    history = fencing.read(ctx.hypervisor.guest(guest.uuid)).claims
    assert [c.value for c in history] == fences[::-1]
    assert [c.request for c in history] == [f"f{n}" for n in range(4, -1, -1)]


def test_a_fence_the_guest_has_seen_is_refused_then_a_newer_one_acts(ctx, guests) -> None:  # type: ignore[no-untyped-def]
    guest = guests.create("idle")
    first = run(ctx, Request(action=Action.PAUSE, instance=guest.uuid, request_id="before"))
    # A failover lost the last fence: the promoted replica's counter is one behind the guest.
    ctx.store.redis.set(keys.fence(guest.uuid), first["fence"] - 1)
    second = run(ctx, Request(action=Action.UNPAUSE, instance=guest.uuid, request_id="after"))
    assert second["outcome"] == "changed" and second["fence"] == first["fence"] + 1
    assert real_state(guest.domain) == "running"
    stale = [e for e in ctx.store.journal(guest.uuid) if e["outcome"] == "stale"]
    assert [(e["fence"], e["guest_fence"], e["error_type"]) for e in stale] == [
        (first["fence"], first["fence"], "StaleLock")]
