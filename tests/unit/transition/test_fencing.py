"""Fences at the guest (worker/transition/fencing.py): each transition that acts records its fence
in the guest's own libvirt metadata first, and a fence not newer than the guest's is refused.

On libvirt's in-process test driver (its metadata calls are libvirt's own) and a fakeredis Store;
the guest's element is read back through a separate connection, not through dormant.
"""

from __future__ import annotations

import threading
from typing import Any

import libvirt
import pytest

from tests.unit.conftest import DomainFactory
from worker.core.errors import InstanceBusy, StaleLock
from worker.hypervisor import Hypervisor
from worker.reclaim import selection
from worker.store import keys
from worker.transition import fencing
from worker.transition.context import Context, Request
from worker.transition.fencing import Claim, Mark
from worker.transition.guards import Store
from worker.transition.runner import FENCE_TRIES, run
from worker.transition.table import Action

ELEMENT = libvirt.VIR_DOMAIN_METADATA_ELEMENT


def _ctx(hypervisor: Hypervisor, store: Store) -> Context:
    return Context(hypervisor=hypervisor, store=store, host="hv1", lock_wait=0.5,
                   verify_timeout=2.0)


def _mark(dom: libvirt.virDomain) -> Mark:
    try:
        return fencing.parse(dom.metadata(ELEMENT, fencing.NAMESPACE, 0))
    except libvirt.libvirtError:
        return Mark()


def test_the_element_reads_back_what_was_written_and_keeps_a_short_history() -> None:
    mark = Mark()
    for n in range(1, fencing.HISTORY + 3):
        mark = fencing.claimed(mark, Claim(n, f"req-{n}", "hv1", 1000.0 + n))
    assert fencing.parse(fencing.render(mark)) == mark
    assert mark.value == fencing.HISTORY + 2 and len(mark.claims) == fencing.HISTORY
    assert [c.value for c in mark.claims] == list(range(fencing.HISTORY + 2, 2, -1))
    assert fencing.newest([Mark(3), mark, Mark()]) is mark
    assert fencing.parse(None) == fencing.parse("<fence value='x'/>") == Mark()  # no fence


def test_a_transition_records_its_fence_at_the_guest_before_acting(
        hypervisor: Hypervisor, store: Store, make_domain: DomainFactory) -> None:
    dom = make_domain()
    policy = "<policy exempt='true'/>"  # as `virsh metadata ... --key dormant --set` does
    dom.setMetadata(ELEMENT, policy, "dormant", selection.NAMESPACE,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    ctx = _ctx(hypervisor, store)
    paused = run(ctx, Request(action=Action.PAUSE, instance=dom.UUIDString(), request_id="p1"))
    again = run(ctx, Request(action=Action.PAUSE, instance=dom.UUIDString(), request_id="p2"))
    resumed = run(ctx, Request(action=Action.UNPAUSE, instance=dom.UUIDString(),
                               request_id="u1"))
    assert again["outcome"] == "already"  # nothing done, nothing claimed
    mark = _mark(dom)
    assert mark.value == resumed["fence"] > paused["fence"]
    assert [(c.value, c.request, c.host) for c in mark.claims] == [
        (resumed["fence"], "u1", "hv1"), (paused["fence"], "p1", "hv1")]
    # The operators' policy element (another namespace) is left as it was.
    assert selection.metadata_exempt(dom.metadata(ELEMENT, selection.NAMESPACE, 0))


def test_a_fence_the_guest_has_seen_is_refused_and_a_newer_one_taken(
        hypervisor: Hypervisor, store: Store, make_domain: DomainFactory) -> None:
    """What a failover that lost fence numbers looks like: Redis hands out a fence that already
    reached the guest. The stale holder does not act; the request goes on under a fence above
    the guest's."""
    dom = make_domain()
    uuid = dom.UUIDString()
    ahead = fencing.claimed(Mark(), Claim(41, "lost-in-failover", "hv1", 1.0))
    dom.setMetadata(ELEMENT, fencing.render(ahead), fencing.KEY, fencing.NAMESPACE,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    store.redis.set(keys.fence(uuid), 40)  # the promoted replica's counter: behind
    result = run(_ctx(hypervisor, store),
                 Request(action=Action.PAUSE, instance=uuid, request_id="after-failover"))
    assert result["outcome"] == "changed" and result["fence"] == 42
    stale = [e for e in store.journal(uuid) if e["outcome"] == "stale"]
    assert len(stale) == 1 and stale[0]["error_type"] == "StaleLock"
    assert (stale[0]["fence"], stale[0]["guest_fence"]) == (41, 41)
    assert "lost-in-failover" in stale[0]["error"]
    assert [c.value for c in _mark(dom).claims] == [42, 41]  # never backwards at the guest
    assert store.redis.get(keys.lock(uuid)) is None


def test_a_guest_that_keeps_refusing_fails_the_request_as_stale(
        hypervisor: Hypervisor, store: Store, make_domain: DomainFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dom = make_domain()
    reads = iter(range(1, 100))
    monkeypatch.setattr(fencing, "read", lambda _guest: Mark(10_000 * next(reads)))
    with pytest.raises(StaleLock, match="fences in a row"):
        run(_ctx(hypervisor, store), Request(action=Action.PAUSE, instance=dom.UUIDString(),
                                             request_id="r"))
    outcomes = [e["outcome"] for e in store.journal(dom.UUIDString())]
    assert outcomes == ["stale"] * FENCE_TRIES + ["failed"]
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # never acted


def test_one_transition_at_a_time_per_guest_in_a_process() -> None:
    entered = threading.Event()
    release = threading.Event()
    errors: list[Any] = []

    def holder() -> None:
        with fencing.exclusive("G-1", timeout=1):
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(5)
    try:
        with pytest.raises(InstanceBusy), fencing.exclusive("g-1", timeout=0.1):
            errors.append("entered while held")
        with fencing.exclusive("g-2", timeout=0.1):  # another guest is not held up
            pass
    finally:
        release.set()
        thread.join()
    with fencing.exclusive("g-1", timeout=0.1):
        pass
    assert errors == []
