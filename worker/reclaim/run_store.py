"""Runs in Redis: ids, the once-only claim, reports, manifests and the work queue.

The other pieces of reclamation state have their own modules: the kill switch
(:mod:`worker.reclaim.killswitch`), CLI exemptions (:mod:`worker.reclaim.exemptions`), grace marks
(:mod:`worker.reclaim.marks`) and beat tick claims (:mod:`worker.reclaim.ticks`).

Run ids. The nightly run is ``<host>:<date>`` (``<host>:<UTC start of the period>`` with
``DORMANT_RECLAIM_EVERY``): one claim per host per night, however many beats trigger it. A
run an operator starts (``dormant reclaim``, ``drain``, ``restore``) is one request, and its
id is unique to it: a UTC time for reading plus a random token
(``drain:kvm1:20261201T101010Z-3f9a1c2e``), so two drains in the same second are two runs. A
task caller that gives no run id gets one built from the task's id, the same on a
redelivery of that message.

A run (nightly reclamation, drain or restore) is one hash ``run:<id>``: ``meta`` (JSON), one
``i:<uuid>`` field per instance (JSON: verdict, reason, numbers, outcome), the counters
``todo``/``done``, and ``restored:<uuid>`` (which restore brought a guest back). Actions wait
in ``run:<id>:queue``; each finished action takes the next one, so at most ``cap`` run at
once per host without any worker thread waiting. The manifest
``run:<id>:manifest`` lists exactly what the run suspended: what ``restore`` brings back.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import redis
from redis.commands.core import Script

from worker.core.errors import InvalidInput
from worker.core.validation import quote
from worker.store import keys

ENTRY = "i:"
_RUN_ID = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,100}$")

# Finish one entry (see the header of worker/lua/run_record.lua); registered once per client.
_RECORD = (Path(__file__).parent / "lua" / "run_record.lua").read_text()
_TAKE = (Path(__file__).parent / "lua" / "run_take.lua").read_text()
_scripts: weakref.WeakKeyDictionary[redis.Redis, Script] = weakref.WeakKeyDictionary()
_takes: weakref.WeakKeyDictionary[redis.Redis, Script] = weakref.WeakKeyDictionary()


def _record_script(client: redis.Redis) -> Script:
    script = _scripts.get(client)
    if script is None:
        script = _scripts[client] = client.register_script(_RECORD)
    return script


def _take_script(client: redis.Redis) -> Script:
    script = _takes.get(client)
    if script is None:
        script = _takes[client] = client.register_script(_TAKE)
    return script


def run_id(value: Any) -> str:
    """Validate a run id (it becomes part of Redis keys and request ids)."""
    if not isinstance(value, str) or not _RUN_ID.match(value):
        raise InvalidInput(f"malformed run id {quote(value)}: 1-100 characters of letters, "
                           "digits and ._:@+=-")
    return value


def stamp(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dT%H%M%SZ")


TOKEN_BYTES = 4  # 8 hex digits: what tells apart two runs started in the same second


def token() -> str:
    """The random part of an operator's run id."""
    return secrets.token_hex(TOKEN_BYTES)


def nightly_id(host: str, day: dt.date) -> str:
    """One reclamation per host per night: ``<host>:<YYYY-MM-DD>``."""
    return f"{host}:{day.isoformat()}"


def periodic_id(host: str, period_start: float) -> str:
    """One reclamation per host per ``DORMANT_RECLAIM_EVERY`` period: ``<host>:<UTC start>``."""
    return f"{host}:{stamp(period_start)}"


def manual_id(host: str, now: float, *, dry_run: bool = False, unique: str = "") -> str:
    """A reclamation started now by an operator: ``<host>:<UTC time>-<token>[:dry]``."""
    return f"{host}:{stamp(now)}-{unique or token()}" + (":dry" if dry_run else "")


def drain_id(host: str, now: float, *, unique: str = "") -> str:
    """A drain started now: ``drain:<host>:<UTC time>-<token>``."""
    return f"drain:{host}:{stamp(now)}-{unique or token()}"


def restore_id(of_run: str, now: float, *, unique: str = "") -> str:
    """A restore of ``of_run`` started now: ``restore:<UTC time>-<token>:<run id>`` (cut to the
    100 characters of a run id; the unique part comes first, so a cut never merges two)."""
    return f"restore:{stamp(now)}-{unique or token()}:{of_run}"[:100]


def for_task(kind: str, host: str, task_id: str, *, of_run: str = "",
             dry_run: bool = False) -> str:
    """The run id of a task sent without one: unique to the request, and the same on a
    redelivery of its message (the task id, not the clock, makes it unique)."""
    if kind == "restore":
        return f"restore:{task_id}:{of_run}"[:100]
    rid = f"{host}:{task_id}" if kind == "reclaim" else f"{kind}:{host}:{task_id}"
    return rid + (":dry" if dry_run else "")


# -- what was queued, and cancelling ------------------------------------------------------------
def note_queued(client: redis.Redis, rid: str, *, kind: str, host: str, task_id: str,
                at: float, ttl: int) -> None:
    """Remember a run sent to a host before any worker has started it (see ``queued``)."""
    client.set(keys.run_queued(rid), json.dumps(
        {"run_id": rid, "kind": kind, "host": host, "task_id": task_id, "queued_at": at},
        sort_keys=True), ex=ttl)


def queued(client: redis.Redis, rid: str) -> dict[str, Any] | None:
    """What was sent under ``rid`` (kind, host, task id, time), or None."""
    raw = client.get(keys.run_queued(rid))
    return json.loads(raw) if raw else None


def cancel(client: redis.Redis, rid: str, *, by: str, at: float, ttl: int) -> dict[str, Any]:
    """Cancel a run: no action of it starts after this (those under way finish). Returns the
    cancel record (the first one, when the run was cancelled before)."""
    record = json.dumps({"by": by, "at": at}, sort_keys=True)
    client.set(keys.run_cancel(rid), record, nx=True, ex=ttl)
    return cancelled(client, rid) or json.loads(record)


def cancelled(client: redis.Redis, rid: str) -> dict[str, Any] | None:
    """Who cancelled the run and when, or None."""
    raw = client.get(keys.run_cancel(rid))
    return json.loads(raw) if raw else None


def cancel_reason(record: dict[str, Any]) -> str:
    at = record.get("at")
    when = f" at {stamp(float(at))}" if isinstance(at, int | float) else ""
    return f"cancelled by {record.get('by', 'unknown')}{when} (dormant cancel)"


# -- claim ------------------------------------------------------------------------------------
def claim(client: redis.Redis, rid: str, owner: str, *, ttl: int) -> bool:
    """True for the first claimer of ``rid`` and for a redelivery of the same task (same
    owner); False for anyone else (a second beat, a second trigger)."""
    if client.set(keys.run_claim(rid), owner, nx=True, ex=ttl):
        return True
    return client.get(keys.run_claim(rid)) == owner


# -- reports ----------------------------------------------------------------------------------
def create(client: redis.Redis, rid: str, meta: dict[str, Any],
           entries: Iterable[dict[str, Any]], *, queue: list[str], ttl: int,
           wave_ends: list[int] | None = None) -> None:
    """Write a run's report and its work queue in one transaction. ``wave_ends``
    (worker/order.py): the queue is in waves, each starting after the one before finished."""
    mapping = {ENTRY + e["instance"]: json.dumps(e, sort_keys=True) for e in entries}
    mapping["meta"] = json.dumps(meta, sort_keys=True)
    mapping["todo"] = str(len(queue))
    mapping["done"] = "0"
    mapping["taken"] = "0"
    mapping["waves"] = json.dumps(list(wave_ends or []))
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(keys.run(rid), keys.run_queue(rid))
        pipe.hset(keys.run(rid), mapping=mapping)
        pipe.expire(keys.run(rid), ttl)
        if queue:
            pipe.rpush(keys.run_queue(rid), *queue)
            pipe.expire(keys.run_queue(rid), ttl)
        started = meta.get("started_at", time.time())
        pipe.zadd(keys.RUNS, {rid: started})
        pipe.zremrangebyscore(keys.RUNS, "-inf", f"({started - ttl!r}")  # their reports are gone
        pipe.execute()


def meta(client: redis.Redis, rid: str) -> dict[str, Any] | None:
    raw = client.hget(keys.run(rid), "meta")
    return json.loads(raw) if raw else None


def update_meta(client: redis.Redis, rid: str, **changes: Any) -> None:
    current = meta(client, rid) or {}
    current.update(changes)
    client.hset(keys.run(rid), "meta", json.dumps(current, sort_keys=True))


def entry(client: redis.Redis, rid: str, instance: str) -> dict[str, Any] | None:
    raw = client.hget(keys.run(rid), ENTRY + instance)
    return json.loads(raw) if raw else None


def record(client: redis.Redis, rid: str, instance: str, changes: dict[str, Any], *,
           suspended: bool, ttl: int) -> tuple[bool, int, int]:
    """Finish one entry (merging ``changes``); add it to the manifest when it was suspended.
    Returns (first time recorded, done, todo); the caller that sees done == todo first
    closes the run."""
    current = entry(client, rid, instance) or {"instance": instance}
    current.update(changes, finished=True)
    first, done, todo = _record_script(client)(
        keys=[keys.run(rid), keys.run_manifest(rid)],
        args=[ENTRY + instance, json.dumps(current, sort_keys=True),
              "1" if suspended else "0", ttl, instance],
    )
    return bool(first), int(done), int(todo)


def next_item(client: redis.Redis, rid: str) -> str | None:
    """The next instance waiting in the run's queue (each is handed out once)."""
    return cast(str | None, client.lpop(keys.run_queue(rid)))


def take(client: redis.Redis, rid: str, count: int) -> list[str]:
    """Up to ``count`` instances from the queue, never one of a later wave before the waves
    ahead of it finished (``order.room``'s rule, in one Lua step: lua/run_take.lua)."""
    if count <= 0:
        return []
    items = _take_script(client)(keys=[keys.run(rid), keys.run_queue(rid)], args=[count])
    return [i.decode() if isinstance(i, bytes) else str(i) for i in items or []]


def stop(client: redis.Redis, rid: str, stopped: dict[str, Any]) -> list[str]:
    """Start nothing more in ``rid``: note why in its meta (``stopped``) and take every action
    still queued, whatever its wave, in one transaction; the caller records them skipped."""
    run, queue = keys.run(rid), keys.run_queue(rid)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(run, queue)
                raw = pipe.hget(run, "meta")
                left = cast(list[str], pipe.lrange(queue, 0, -1))
                current = json.loads(raw) if raw else {}
                current.setdefault("stopped", stopped)  # the first reason stays
                pipe.multi()
                pipe.hset(run, "meta", json.dumps(current, sort_keys=True))
                pipe.delete(queue)
                pipe.hincrby(run, "taken", len(left))
                pipe.execute()
                return left
            except redis.WatchError:  # an action finished or was taken meanwhile: again
                continue


def wave_end(client: redis.Redis, rid: str, done: int) -> bool:
    """Whether ``done`` finished actions close a wave with more to come (then the caller
    that recorded the last one starts the next wave, up to the cap)."""
    raw = cast(str | None, client.hget(keys.run(rid), "waves"))
    ends = json.loads(raw or "[]")
    return done in ends[:-1]


def load(client: redis.Redis, rid: str) -> dict[str, Any] | None:
    """The whole report: meta, counters, entries (sorted by name) and the manifest."""
    raw = cast(dict[str, str], client.hgetall(keys.run(rid)))
    if not raw or "meta" not in raw:
        return None
    entries = sorted((json.loads(v) for k, v in raw.items() if k.startswith(ENTRY)),
                     key=lambda e: (e.get("name") or "", e["instance"]))
    report = {
        **json.loads(raw["meta"]),
        "todo": int(raw.get("todo", 0)),
        "done": int(raw.get("done", 0)),
        "entries": entries,
        "manifest": sorted(manifest(client, rid)),
    }
    stopped = cancelled(client, rid)
    if stopped is not None:
        report["cancelled"] = stopped
    return report


RESTORED = "restored:"  # field of a drained or reclaimed run: which restore resumed a guest


def note_restored(client: redis.Redis, of_run: str, instance: str, restore: str) -> None:
    """Restore ``restore`` resumed ``instance``, which run ``of_run`` had suspended (so a later
    restore of the same run can say who brought it back)."""
    if client.exists(keys.run(of_run)):
        client.hset(keys.run(of_run), RESTORED + instance, restore)


def restored_by(client: redis.Redis, of_run: str, instance: str) -> str | None:
    """The restore that last resumed ``instance`` for run ``of_run``, or None."""
    return cast(str | None, client.hget(keys.run(of_run), RESTORED + instance))


def manifest(client: redis.Redis, rid: str) -> set[str]:
    return cast(set[str], client.smembers(keys.run_manifest(rid)))


def latest(client: redis.Redis, *, count: int = 1) -> list[str]:
    """The newest run ids, newest first."""
    return cast(list[str], client.zrevrange(keys.RUNS, 0, count - 1))


LATEST_PAGE = 50  # run ids read per round trip while looking for the newest of one kind


def latest_of_kind(client: redis.Redis, kind: str) -> str | None:
    """The newest run of ``kind`` (``reclaim``, ``drain``, ``restore``) whose report is
    still kept, or None."""
    start = 0
    while True:
        rids = cast(list[str], client.zrevrange(keys.RUNS, start, start + LATEST_PAGE - 1))
        if not rids:
            return None
        with client.pipeline(transaction=False) as pipe:
            for rid in rids:
                pipe.hget(keys.run(rid), "meta")
            metas = pipe.execute()
        for rid, raw in zip(rids, metas, strict=True):
            if raw and json.loads(raw).get("kind") == kind:
                return rid
        start += LATEST_PAGE
