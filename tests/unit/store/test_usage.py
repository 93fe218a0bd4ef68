"""Every key dormant builds, and every key Celery and kombu write, belongs to a family with a
bound, and the bounds hold: journals, the run list, the host list, Celery results of what
dormant sends itself. (``dormant usage`` on a real redis-server:
tests/integration/test_usage.py.)"""

from __future__ import annotations

import inspect
import time
from types import SimpleNamespace
from typing import cast

import fakeredis
import pytest

from worker.core.settings import CONTROL_QUEUE, queue_for_host
from worker.fleet import registry
from worker.hypervisor import Hypervisor
from worker.reclaim import run_store
from worker.store import keys
from worker.store.usage import human, stratum
from worker.transition.guards import JOURNAL_MAXLEN, JOURNAL_TTL, Held, Store

BUILDERS = {name: fn for name, fn in vars(keys).items()
            if inspect.isfunction(fn) and fn.__module__ == keys.__name__ and name != "family"}
CONSTANTS = [keys.JOURNAL_ALL, keys.DEADLINES, keys.HOSTS, keys.KILL_SWITCH, keys.EXEMPT,
             keys.RUNS, keys.OUTBOX, keys.OUTBOX_ENTRIES]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_key_dormant_builds_has_a_family(name: str) -> None:
    arity = len(inspect.signature(BUILDERS[name]).parameters)
    key = BUILDERS[name](*["4dea22b3-1d52-d8f3-2516-782e98ab3fa0", "disk"][:arity])
    assert keys.family(key) is not keys.OTHER, key


@pytest.mark.parametrize("key", CONSTANTS)
def test_every_fixed_key_has_a_family(key: str) -> None:
    assert keys.family(key) is not keys.OTHER


@pytest.mark.parametrize(("key", "family"), [
    (keys.activity("u"), "samples"), (keys.activity_times("kvm1"), "samples"),
    (keys.samples("u"), "samples"), (keys.journal("u"), "journals"),
    (keys.JOURNAL_ALL, "journals"), (keys.request("suspend:x"), "idempotency records"),
    (keys.RUNS, "runs"), (keys.run_queue("kvm1:2026-12-06"), "runs"),
    (keys.mark("u"), "reclamation state"), (keys.host_workers("kvm1"), "registry"),
    (queue_for_host("kvm1"), "queues"), (CONTROL_QUEUE, "queues"),
    ("unacked", "unacked"), ("unacked_index", "unacked"),
    ("celery-task-meta-0b8d3a3e-6f5b-4d56-a7c5-1a7b1d1b1c11", "results"),
    ("2e0f4c56-9c4b-3c8a-9c24-bf5a1b1f0a11.reply.celery.pidbox", "remote control"),
    ("_kombu.binding.celery.pidbox", "bindings"), ("_kombu.binding_deadlines", "bindings"),
    ("something-else", "other"),
])
def test_keys_of_celery_and_kombu_are_named_too(key: str, family: str) -> None:
    assert keys.family(key).name == family


def test_every_family_says_what_bounds_it() -> None:
    names = [f.name for f in keys.FAMILIES]
    assert len(names) == len(set(names))
    assert all(f.bound and (f.prefixes or f.exact or f.suffixes) for f in keys.FAMILIES)


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (1000, "1000 B"), (1383, "1.35 KiB"), (1536, "1.5 KiB"),
    (52.7 * 2**20, "52.7 MiB"), (2.5 * 2**30, "2.5 GiB")])
def test_sizes_read_like_sizes(size: float, text: str) -> None:
    assert human(size) == text


# -- the bounds themselves --------------------------------------------------------------------
def test_every_journal_write_gives_the_instance_journal_its_lifetime(
        fake_redis: fakeredis.FakeRedis) -> None:
    store = Store(fake_redis, lock_ttl=30, result_ttl=3600)
    ways = {
        "finish": lambda u: store.finish(cast(Held, store.acquire("r-" + u, u, wait=1)),
                                         instance=u, request_id="r-" + u,
                                         entry={"outcome": "changed"}, record={"status": "done"}),
        "external": lambda u: store.record_external(u, {"outcome": "external"},
                                                    store.watch_point(u), clear_deadline=False),
        "journal_only": lambda u: store.journal_only({"outcome": "rejected"}, u),
    }
    for way, write in ways.items():
        write(way)
        assert 0 < fake_redis.ttl(keys.journal(way)) <= JOURNAL_TTL, way
    assert fake_redis.ttl(keys.JOURNAL_ALL) == -1  # the fleet journal is capped by length


def test_the_journal_of_one_instance_is_capped(fake_redis: fakeredis.FakeRedis) -> None:
    store = Store(fake_redis, lock_ttl=30, result_ttl=3600)
    for i in range(3 * JOURNAL_MAXLEN):
        store.journal_only({"n": i}, "u")
    assert JOURNAL_MAXLEN <= fake_redis.xlen(keys.journal("u")) < 1.2 * JOURNAL_MAXLEN


def test_the_list_of_runs_forgets_runs_whose_reports_are_gone(
        fake_redis: fakeredis.FakeRedis) -> None:
    for day in range(10):
        rid = f"h:2026-12-{day + 1:02d}"
        run_store.create(fake_redis, rid, {"run_id": rid, "started_at": day * 86400.0}, [],
                         queue=[], ttl=3 * 86400)
    assert run_store.latest(fake_redis, count=100) == [
        "h:2026-12-10", "h:2026-12-09", "h:2026-12-08", "h:2026-12-07"]


def test_hosts_unseen_for_a_week_leave_the_registry(
        fake_redis: fakeredis.FakeRedis, hypervisor: Hypervisor) -> None:
    fake_redis.zadd(keys.HOSTS, {"gone": time.time() - registry.FORGET_HOST - 60,
                                 "quiet": time.time() - 3600})
    registry.publish(fake_redis, hypervisor, "here", interval=60)
    assert sorted(registry.hosts(fake_redis)) == ["here", "quiet"]
    registry.set_watched(fake_redis, "here", {"u": "n"})
    assert 0 < fake_redis.ttl(keys.watched("here")) <= registry.FORGET_HOST


def test_what_dormant_sends_itself_keeps_no_celery_result(
        monkeypatch: pytest.MonkeyPatch, fake_redis: fakeredis.FakeRedis) -> None:
    """Beat's samples and nightly runs, a run's actions and auto-unpauses: their outcome is in
    Redis already (samples, reports, journals); a Celery result each would only cost memory."""
    from tasks import reclaim, timers
    from tasks.celery_app import app

    sent: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(app, "send_task", lambda name, **kw: sent.append((name, kw))
                        or SimpleNamespace(id=f"task-{len(sent)}"))
    monkeypatch.setattr(reclaim.run_item, "apply_async",
                        lambda **kw: sent.append(("dormant.run_item", kw)))
    monkeypatch.setattr(reclaim, "_hosts", lambda _s: ["h1", "h2"])
    monkeypatch.setattr(reclaim, "context", lambda: SimpleNamespace(
        store=SimpleNamespace(redis=fake_redis)))
    reclaim.sample_fleet()
    reclaim.reclaim_fleet()
    store = SimpleNamespace(claim_due_deadlines=lambda _now: [
        {"instance": "u1", "host": "h1", "request_id": "p1"}], redis=fake_redis)
    monkeypatch.setattr(timers, "context", lambda: SimpleNamespace(store=store))
    reclaim.reclaimer().send_item("h1:run", "u1")  # a run's action, kept in the outbox
    assert timers.expire_deadlines(app) == 1
    names = [name for name, _ in sent]
    assert names.count("dormant.sample") == 2 and names.count("dormant.reclaim") == 2
    assert names.count("dormant.run_item") == 1 and names.count("dormant.unpause") == 1
    assert all(kw.get("ignore_result") is True for _, kw in sent), sent


@pytest.mark.parametrize(("key", "kind"), [
    (keys.where("4dea22b3-1d52-d8f3-2516-782e98ab3fa0"), ("dormant:where:", 0, "")),
    (keys.host_instances("kvm-7"), ("dormant:host:", 1, "instances")),
    (keys.host_workers("kvm-7"), ("dormant:host:", 1, "workers")),
    (keys.run("kvm-7:2026-12-06"), ("dormant:run:", 1, "")),
    (keys.run_queue("kvm-7:2026-12-06"), ("dormant:run:", 2, "queue")),
    (keys.HOSTS, ("", 1, "hosts")),  # exact names: a kind of their own
])
def test_keys_of_one_family_are_sampled_by_kind(key: str, kind: tuple[str, int, str]) -> None:
    assert stratum(keys.family(key), key) == kind
