"""Hypervisor.observe keeps a UUID's domain handle, yet always reads the state afresh."""

from __future__ import annotations

import threading

import libvirt

from tests.unit.conftest import DomainFactory
from worker.core.states import State
from worker.hypervisor import Hypervisor


def _lookups(monkeypatch, hypervisor: Hypervisor) -> list[str]:  # type: ignore[no-untyped-def]
    calls: list[str] = []
    real = hypervisor.guest

    def counting(instance: str):  # type: ignore[no-untyped-def]
        calls.append(instance)
        return real(instance)

    monkeypatch.setattr(hypervisor, "guest", counting)
    return calls


def test_second_observe_reuses_the_handle_and_sees_a_state_change(
        monkeypatch, hypervisor: Hypervisor, make_domain: DomainFactory) -> None:  # type: ignore[no-untyped-def]
    domain = make_domain()
    uuid = domain.UUIDString()
    lookups = _lookups(monkeypatch, hypervisor)
    guest, observed = hypervisor.observe(uuid)
    assert guest is not None and observed.state is State.RUNNING
    domain.suspend()  # behind dormant's back
    again, observed = hypervisor.observe(uuid)
    assert again is guest
    assert observed.state is State.PAUSED
    assert lookups == [uuid]


def test_a_removed_domain_is_missing_not_served_from_the_cache(
        hypervisor: Hypervisor, make_domain: DomainFactory) -> None:
    domain = make_domain()
    uuid = domain.UUIDString()
    assert hypervisor.observe(uuid)[0] is not None
    domain.destroy()
    domain.undefine()
    guest, observed = hypervisor.observe(uuid)
    assert guest is None
    assert observed.state is State.MISSING


def test_names_are_looked_up_every_time(monkeypatch, hypervisor: Hypervisor,  # type: ignore[no-untyped-def]
                                        make_domain: DomainFactory) -> None:
    domain = make_domain()
    lookups = _lookups(monkeypatch, hypervisor)
    hypervisor.observe(domain.name())
    hypervisor.observe(domain.name())
    assert lookups == [domain.name(), domain.name()]


def test_a_new_connection_starts_a_new_cache(monkeypatch, hypervisor: Hypervisor,  # type: ignore[no-untyped-def]
                                             make_domain: DomainFactory) -> None:
    uuid = make_domain().UUIDString()
    lookups = _lookups(monkeypatch, hypervisor)
    hypervisor.observe(uuid)
    hypervisor.close()  # as after a broken connection
    hypervisor.observe(uuid)
    assert lookups == [uuid, uuid]


def test_each_thread_has_its_own_handles(hypervisor: Hypervisor,
                                         make_domain: DomainFactory) -> None:
    uuid = make_domain().UUIDString()
    mine = hypervisor.observe(uuid)[0]
    theirs: list[object] = []
    worker = threading.Thread(target=lambda: theirs.append(hypervisor.observe(uuid)[0]))
    worker.start()
    worker.join(10)
    assert theirs and theirs[0] is not None and theirs[0] is not mine
    assert isinstance(mine._domain, libvirt.virDomain)  # type: ignore[union-attr]
