"""One worker per host: presence entries in Redis (fakeredis), the wait at start-up."""

from __future__ import annotations

import fakeredis

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
