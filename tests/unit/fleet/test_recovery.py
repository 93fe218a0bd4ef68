"""One worker per host: presence entries in Redis (fakeredis), the wait at start-up, and
which unacknowledged deliveries a host's sweep reads and restores."""

from __future__ import annotations

import json

import fakeredis
import pytest

from worker.fleet import recovery
from worker.fleet.recovery import Presence


def test_presence_sees_other_workers_of_the_host_until_they_lapse(
        fake_redis: fakeredis.FakeRedis) -> None:
    mine = Presence(fake_redis, "kvm1", "a@kvm1", ttl=0.3)
    other = Presence(fake_redis, "kvm1", "b@kvm1", ttl=0.3)
    elsewhere = Presence(fake_redis, "kvm2", "c@kvm2", ttl=30)
    for p in (mine, other, elsewhere):
        p.announce()
    assert set(mine.others()) == {"b@kvm1"}
    other.leave()
    assert mine.others() == {}


def test_start_up_waits_for_a_dead_workers_entry_to_lapse(
        fake_redis: fakeredis.FakeRedis) -> None:
    Presence(fake_redis, "kvm1", "dead@kvm1", ttl=0.6).announce()  # never renewed again
    assert recovery.wait_alone(Presence(fake_redis, "kvm1", "new@kvm1", ttl=0.6),
                               poll=0.05) == {}


def test_start_up_reports_a_live_worker_of_the_same_host(
        fake_redis: fakeredis.FakeRedis) -> None:
    live = Presence(fake_redis, "kvm1", "live@kvm1", ttl=0.6)
    live.announce()
    live.keep()  # renewed every ttl/3
    try:
        others = recovery.wait_alone(Presence(fake_redis, "kvm1", "new@kvm1", ttl=0.6),
                                     poll=0.05)
    finally:
        live.leave()
    assert set(others) == {"live@kvm1"}


def test_worker_start_up_wires_presence_and_recovery_to_the_state_store(
        fake_redis: fakeredis.FakeRedis, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tasks import celery_app
    from worker.core import settings
    from worker.store import connection

    calls = []
    monkeypatch.setattr(connection, "connect", lambda url, **_options: fake_redis)
    monkeypatch.setattr(recovery, "recover",
                        lambda app, client, **kw: calls.append((client, kw)) or (None, []))
    monkeypatch.setattr(celery_app, "_presence", [])

    class Worker:
        hostname = "dormant@kvm1"

    celery_app._on_worker_init(sender=Worker())
    [(client, kw)] = calls
    s = settings.get()
    assert client is fake_redis
    assert kw == {"host": s.host, "queue": s.host_queue, "node": "dormant@kvm1",
                  "ttl": s.host_claim_ttl}


class FakeChannel:
    """What restore_unacked uses of a kombu Redis channel: its client, the unacked hash and
    its index (kombu writes both in one transaction), and restore_by_tag."""

    unacked_key, unacked_index_key = "unacked", "unacked_index"

    def __init__(self, client: fakeredis.FakeRedis) -> None:
        self.client = client
        self.qos = self
        self.restored: list[str] = []

    def deliver(self, tag: str, queue: str, task_id: str, at: float) -> None:
        message = json.dumps([{"headers": {"id": task_id}, "body": "..."}, queue, queue])
        self.client.hset(self.unacked_key, tag, message)
        self.client.zadd(self.unacked_index_key, {tag: at})

    def restore_by_tag(self, tag: str, client: object = None, leftmost: bool = False) -> None:
        self.restored.append(tag)


def test_a_sweep_reads_only_old_deliveries_and_restores_only_its_queues(
        fake_redis: fakeredis.FakeRedis, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every worker sweeps every 30 s: reading every host's deliveries each time would grow
    with the square of the hosts. Only deliveries older than the cut are read at all."""
    channel = FakeChannel(fake_redis)
    for h in range(50):  # the rest of the fleet, busy
        for i in range(8):
            channel.deliver(f"t{h}-{i}", f"dormant.h{h:03d}", f"task-{h}-{i}", at=1000.0 + i)
    channel.deliver("mine-old", "dormant.h0", "task-old", at=10.0)
    channel.deliver("mine-kept", "dormant.h0", "task-kept", at=10.0)
    channel.deliver("mine-new", "dormant.h0", "task-new", at=2000.0)
    channel.deliver("prefix", "dormant.h00", "task-other", at=10.0)  # another host's queue
    monkeypatch.setattr(fake_redis, "hscan_iter",
                        lambda *a, **k: pytest.fail("the whole unacked hash was scanned"))
    read: list[int] = []
    hmget = fake_redis.hmget
    monkeypatch.setattr(fake_redis, "hmget", lambda key, tags: read.append(len(tags)) or
                        hmget(key, tags))
    connection = type("Connection", (), {"default_channel": channel})()
    restored = recovery.restore_unacked(connection, "dormant.h0", delivered_before=500.0,
                                        keep=frozenset({"task-kept"}))
    assert restored == ["task-old"] and channel.restored == ["mine-old"]
    assert sum(read) == 3  # the three deliveries older than the cut, not the fleet's 400
