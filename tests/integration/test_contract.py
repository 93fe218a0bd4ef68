"""The task contract against real worker processes, a real redis-server and KVM guests:
a request id is bound to what it first asked for, and every malformed call on every task is
an ``InvalidInput`` naming the argument — journaled, not retried, no traceback in the log.
"""

from __future__ import annotations

import json

import pytest

from tests.support.journal import STATE_DB, base_state, journal, real_state

pytestmark = pytest.mark.integration

JSON_LOGS = {"DORMANT_LOG_JSON": "true"}


def _dormant_entries(redis_server, instance=None):
    """Journal entries of dormant's own calls (not libvirt events seen behind its back)."""
    return [e for e in journal(redis_server, instance) if e.get("outcome") != "external"]


def _refused(client_app, queue, task, args, kwargs):
    result = client_app.send_task(task, args=args, kwargs=kwargs, queue=queue)
    with pytest.raises(Exception) as caught:
        result.get(timeout=20)
    assert type(caught.value).__name__ == "InvalidInput", (task, args, kwargs, caught.value)
    assert result.state == "FAILURE" and (result.retries or 0) == 0
    return str(caught.value), result.id


def _no_error_records(worker) -> None:
    """No record above INFO and no traceback anywhere in the worker's JSON log."""
    for line in worker.log().splitlines():
        if not line.startswith("{"):
            assert "Traceback" not in line, line
            continue
        doc = json.loads(line)
        assert doc["level"] in {"debug", "info"}, doc
        assert "exc" not in doc, doc


def test_a_request_id_reused_for_anything_else_is_refused(
        start_worker, client_app, host_name, guests, redis_clean):
    worker = start_worker(pool="threads", concurrency=2, env=JSON_LOGS)
    g, h = guests.create("idle"), guests.create("idle")
    queue = f"dormant.{host_name}"

    first = client_app.send_task("dormant.pause", args=[g.name],
                                 kwargs={"request_id": "nightly-42"}, queue=queue).get(timeout=30)
    assert first["outcome"] == "changed" and real_state(g.domain) == "paused(user)"

    # The three sequences: another action, another guest, other parameters.
    reuses = [
        ("dormant.unpause", [g.name], {"request_id": "nightly-42"}),
        ("dormant.pause", [h.uuid], {"request_id": "nightly-42"}),
        ("dormant.pause", [g.uuid], {"request_id": "nightly-42", "max_seconds": 60}),
    ]
    refused_ids = []
    for task, args, kwargs in reuses:
        message, task_id = _refused(client_app, queue, task, args, kwargs)
        assert "'nightly-42'" in message and f"pause of {g.uuid} ({g.name})" in message, message
        refused_ids.append(task_id)
    assert real_state(g.domain) == "paused(user)" and real_state(h.domain) == "running"
    state = redis_clean.client(STATE_DB)
    assert state.zscore("dormant:deadlines", g.uuid) is None

    # Each refusal is journaled once, as rejected; nothing else was written for them.
    fleet = [e for e in journal(redis_clean) if e.get("task_id") in refused_ids]
    assert [e["outcome"] for e in fleet] == ["rejected"] * 3
    assert all(e["error_type"] == "InvalidInput" for e in fleet)
    assert [e["outcome"] for e in _dormant_entries(redis_clean, g.uuid)] == [
        "changed", "rejected", "rejected"]
    assert [e["outcome"] for e in _dormant_entries(redis_clean, h.uuid)] == ["rejected"]
    _no_error_records(worker)


def test_name_and_uuid_of_one_guest_are_one_instance(
        start_worker, client_app, host_name, guests, redis_clean):
    start_worker(pool="threads", concurrency=2)
    g = guests.create("idle")
    queue = f"dormant.{host_name}"
    answers = [client_app.send_task("dormant.suspend", args=[ref],
                                    kwargs={"request_id": "maint-7"}, queue=queue).get(timeout=60)
               for ref in (g.name, g.uuid, g.uuid.upper(), g.name)]
    assert [a["outcome"] for a in answers] == ["changed", "duplicate", "duplicate", "duplicate"]
    assert base_state(real_state(g.domain)) == "suspended"
    assert [e["outcome"] for e in _dormant_entries(redis_clean, g.uuid)] == ["changed"]


def test_every_malformed_call_on_every_task_is_invalid_input(
        start_worker, client_app, host_name, guests, redis_clean):
    worker = start_worker(pool="threads", concurrency=2, env=JSON_LOGS)
    g = guests.create("idle")
    queue = f"dormant.{host_name}"
    # (task, args, kwargs, words the message must contain)
    table = [
        ("dormant.pause", [], {}, "missing required argument 'instance'"),
        ("dormant.pause", [g.uuid], {"reqest_id": "x"}, "unknown argument 'reqest_id'"),
        ("dormant.pause", [g.uuid], {"target": "paused"}, "unknown argument 'target'"),
        ("dormant.pause", [g.uuid, "r", 5, 6], {}, "at most 3 positional argument(s)"),
        ("dormant.unpause", [], {"request_id": "r"}, "missing required argument 'instance'"),
        ("dormant.unpause", [g.uuid], {"max_seconds": 5}, "unknown argument 'max_seconds'"),
        ("dormant.suspend", [g.uuid, "r", "extra"], {}, "at most 2 positional"),
        ("dormant.resume", [g.uuid], {"instance": g.uuid}, "'instance' given twice"),
        ("dormant.ensure", [g.uuid], {}, "missing required argument 'target'"),
        ("dormant.ensure", [g.uuid, "asleep"], {}, "unknown target 'asleep'"),
        ("dormant.pause", [g.uuid], {"max_seconds": 0}, "max_seconds"),
        ("dormant.status", [g.uuid, "x"], {}, "at most 1 positional"),
        ("dormant.status", ["../etc"], {}, "malformed instance"),
        ("dormant.ping", [1], {}, "at most 0 positional"),
        ("dormant.sample", [], {"host": "x"}, "unknown argument 'host'"),
        ("dormant.sample_fleet", [1], {}, "at most 0 positional"),
        ("dormant.reclaim_fleet", [], {"now": 1}, "unknown argument 'now'"),
        ("dormant.reclaim", [], {"dry_run": "yes"}, "dry_run must be true or false"),
        ("dormant.reclaim", [], {"run": "x"}, "unknown argument 'run'"),
        ("dormant.run_item", ["r1"], {}, "missing required argument 'instance'"),
        ("dormant.restore", [], {}, "missing required argument 'run_id'"),
        ("dormant.restore", ["no-such-run"], {}, "unknown run"),
        ("dormant.drain", [], {"instances": "web-1"}, "instances must be a non-empty list"),
        ("dormant.drain", [], {"host": "x"}, "unknown argument 'host'"),
    ]
    ids = {}
    for task, args, kwargs, words in table:
        message, task_id = _refused(client_app, queue, task, args, kwargs)
        assert words in message, (task, message)
        ids[task_id] = (task, args)

    fleet = {e["task_id"]: e for e in journal(redis_clean) if e.get("task_id") in ids}
    assert set(fleet) == set(ids), "every refused call is in the fleet journal"
    assert {e["outcome"] for e in fleet.values()} <= {"rejected", "failed"}
    # Calls that name the real guest are in its own journal too; no other journal was made.
    mine = {e["task_id"] for e in _dormant_entries(redis_clean, g.uuid)}
    assert mine == {t for t, (_task, args) in ids.items() if args[:1] == [g.uuid]}
    assert real_state(g.domain) == "running"
    _no_error_records(worker)
