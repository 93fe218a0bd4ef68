"""Unit-test fixtures: a fakeredis-backed Store and libvirt's in-process test driver.

Nothing here starts a service. ``test:///default`` is one fake hypervisor shared by every
connection of this process, so each test defines its own uniquely named domains and removes
them afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import fakeredis
import libvirt
import pytest

from worker.hypervisor import Hypervisor
from worker.store.connection import Boundary
from worker.transition.guards import Store

TEST_URI = "test:///default"


class FakeStateRedis(Boundary, fakeredis.FakeRedis):
    """fakeredis behind dormant's Redis error boundary, like the workers' real client."""

    server: fakeredis.FakeServer  # set by the fixture: toggle ``connected`` for an outage


@pytest.fixture
def fake_redis() -> FakeStateRedis:
    """A private in-memory Redis (Lua scripts work) for one test; ``fake_redis.server``
    toggles ``connected`` to simulate an outage."""
    server = fakeredis.FakeServer()
    client = FakeStateRedis(server=server, decode_responses=True)
    client.server = server
    return client


@pytest.fixture
def store(fake_redis: fakeredis.FakeRedis) -> Store:
    return Store(fake_redis, lock_ttl=30, result_ttl=3600, registry_ttl=600)


@pytest.fixture
def hypervisor() -> Iterator[Hypervisor]:
    hv = Hypervisor(TEST_URI)
    yield hv
    hv.close()


@pytest.fixture
def test_conn() -> Iterator[libvirt.virConnect]:
    """A separate connection to the same in-process fake, to check state behind dormant."""
    conn = libvirt.open(TEST_URI)
    yield conn
    conn.close()


DomainFactory = Callable[..., libvirt.virDomain]


@pytest.fixture
def make_domain(test_conn: libvirt.virConnect) -> Iterator[DomainFactory]:
    """Define (and by default start) a uniquely named test domain; removed after the test."""
    made: list[libvirt.virDomain] = []

    def make(*, start: bool = True, prefix: str = "unit",
             memory_mib: int = 64) -> libvirt.virDomain:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        xml = (
            f"<domain type='test'><name>{name}</name>"
            f"<memory unit='MiB'>{memory_mib}</memory>"
            "<vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        )
        domain = test_conn.defineXML(xml)
        made.append(domain)
        if start:
            domain.create()
        return domain

    yield make
    for domain in made:
        try:
            if domain.isActive():
                domain.destroy()
            if domain.hasManagedSaveImage():
                domain.managedSaveRemove()
            domain.undefine()
        except libvirt.libvirtError:
            pass
