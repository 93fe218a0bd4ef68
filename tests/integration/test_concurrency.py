"""Concurrency on one guest across real worker processes: one request id runs once, and
conflicting requests are serialised by the per-instance lock (journal intervals never overlap).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.journal import base_state, journal, real_state, record, saving
from tests.support.services import wait_until

pytestmark = pytest.mark.integration


def _two_workers(start_worker):
    """A threads worker (the production pool) and a prefork one on the same host queue."""
    start_worker(pool="threads", concurrency=8)
    start_worker(pool="prefork", concurrency=2)


def test_same_request_id_fifty_times_changes_the_guest_once(
        start_worker, client_app, host_name, guests, redis_clean):
    _two_workers(start_worker)
    guest = guests.create("idle")
    rid = f"once-{uuid.uuid4().hex[:8]}"

    def send(_n: int):
        return client_app.send_task("dormant.suspend", args=[guest.uuid],
                                    kwargs={"request_id": rid}, queue=f"dormant.{host_name}")

    with ThreadPoolExecutor(max_workers=10) as pool:
        pending = list(pool.map(send, range(50)))
    results = [r.get(timeout=90) for r in pending]

    outcomes = [r["outcome"] for r in results]
    assert outcomes.count("changed") == 1, outcomes
    assert outcomes.count("duplicate") == 49, outcomes
    changed = next(r for r in results if r["outcome"] == "changed")
    for dup in results:
        if dup["outcome"] == "duplicate":  # the recorded result, pointing at the one that ran
            assert dup["original_task_id"] == changed["task_id"]
            assert dup["state_after"] == "suspended" and dup["request_id"] == rid
    assert len({r["task_id"] for r in results}) == 50
    assert real_state(guest.domain) == "suspended"

    entries = [e for e in journal(redis_clean, guest.uuid) if e.get("request_id") == rid]
    assert [e["outcome"] for e in entries] == ["changed"]
    assert entries[0]["task_id"] == changed["task_id"]
    assert record(redis_clean, rid)["status"] == "done"


VERBS = ["dormant.pause", "dormant.unpause", "dormant.suspend", "dormant.resume"]
TARGETS = ["running", "paused", "suspended"]


def _request(rng: random.Random) -> tuple[str, dict[str, str]]:
    if rng.random() < 0.5:
        return "dormant.ensure", {"target": rng.choice(TARGETS)}
    return rng.choice(VERBS), {}


def _overlaps(entries: list[dict]) -> list[tuple[dict, dict]]:
    spans = sorted((e["started_at"], e["finished_at"], e) for e in entries)
    return [(a[2], b[2]) for a, b in itertools.pairwise(spans) if b[0] < a[1]]


@pytest.mark.slow
def test_conflicting_requests_from_several_clients_never_overlap(
        start_worker, client_app, host_name, guests, redis_clean):
    _two_workers(start_worker)
    guest = guests.create("idle")
    queue = f"dormant.{host_name}"
    rng = random.Random(2)  # 16 requests: 3 saves, every verb and target
    plans = [[_request(rng) for _ in range(4)] for _client in range(4)]

    def client(requests):
        results = []
        for task, kwargs in requests:
            sent = client_app.send_task(task, args=[guest.uuid], kwargs=kwargs, queue=queue)
            try:
                results.append(sent.get(timeout=90))
            except Exception as exc:  # refusals are expected: resume a running guest, ...
                results.append({"error": type(exc).__name__, "message": str(exc)})
        return results

    with ThreadPoolExecutor(max_workers=len(plans)) as pool:
        answers = [a for batch in pool.map(client, plans) for a in batch]

    refused = [a for a in answers if "error" in a]
    assert all(a["error"] == "InvalidTransition" for a in refused), refused
    entries = journal(redis_clean, guest.uuid)
    assert len(entries) == 16  # every request journaled once, whatever its outcome
    ran = [e for e in entries if e["outcome"] in {"changed", "already"}]
    changed = [e for e in ran if e["outcome"] == "changed"]
    assert len(changed) >= 3, [e["outcome"] for e in entries]  # the test really interleaved
    # Everything that held the lock ran alone: no two intervals overlap.
    held = ran + [e for e in entries if e.get("state_before")]
    assert _overlaps(list({id(e): e for e in held}.values())) == []
    # Journal order is the order the lock was held in; the last one that ran decides the state.
    finish_order = [e["finished_at"] for e in ran]
    assert finish_order == sorted(finish_order)
    assert base_state(real_state(guest.domain)) == base_state(ran[-1]["state_after"])
    # Each step started from the state the previous one left.
    for previous, current in itertools.pairwise(ran):
        assert base_state(current["state_before"]) == base_state(previous["state_after"])


@pytest.mark.slow
def test_a_holder_whose_lock_expired_cannot_record_over_the_newer_holder(
        start_worker, client_app, host_name, guests, redis_clean):
    """Fencing: a frozen worker's lock lapses, a second worker takes the instance; when the
    first wakes up its result is refused (journaled as such), the newer one stands."""
    short = {"DORMANT_LOCK_TTL": "1", "DORMANT_VERIFY_TIMEOUT": "2",
             "DORMANT_RETRY_BACKOFF": "1", "DORMANT_RETRY_BACKOFF_MAX": "1",
             "DORMANT_MAX_RETRIES": "20"}
    frozen = start_worker(pool="prefork", concurrency=1, env=short)
    other_host = f"{host_name}-b"
    start_worker(pool="threads", concurrency=2, env=short, host=other_host)
    guest = guests.create("idle")
    state = redis_clean.client(2)
    [child] = frozen.children()

    first = client_app.send_task("dormant.suspend", args=[guest.uuid],
                                 kwargs={"request_id": "old-holder"},
                                 queue=f"dormant.{host_name}")
    wait_until(lambda: saving(guest.domain), timeout=30, interval=0.01,
               message="managedSave in progress")
    os.kill(child, signal.SIGSTOP)  # alive but silent: its lock keeper stops renewing
    try:
        wait_until(lambda: not state.keys("dormant:lock:*"), timeout=10,
                   message="the frozen holder's lock expires")
        newer = client_app.send_task("dormant.ensure", args=[guest.uuid],
                                     kwargs={"target": "running", "request_id": "new-holder"},
                                     queue=f"dormant.{other_host}").get(timeout=60)
        assert newer["outcome"] == "changed" and real_state(guest.domain) == "running"
    finally:
        os.kill(child, signal.SIGCONT)

    with pytest.raises(Exception) as caught:
        first.get(timeout=60)
    assert type(caught.value).__name__ in {"StaleLock", "TransitionNotReached"}
    assert real_state(guest.domain) == "running"  # the newer holder's result stands
    assert record(redis_clean, "new-holder")["status"] == "done"
    old = record(redis_clean, "old-holder")
    assert old is None or old["status"] != "done"  # nothing recorded over the newer one
    entries = journal(redis_clean, guest.uuid)
    old_entries = [e for e in entries if e["request_id"] == "old-holder"]
    # Its failure is journaled as stale: the result was discarded because the lock was lost.
    assert [e["outcome"] for e in old_entries] == ["stale"], old_entries
    assert "expired while held" in old_entries[0]["lock_error"]
    fences = [e["fence"] for e in entries if e.get("fence")]
    assert fences == sorted(fences)
