"""Runs in Redis: ids, the once-only claim, reports, manifests and the work queue.

The other pieces of reclamation state have their own modules: the kill switch
(:mod:`worker.reclaim.killswitch`), CLI exemptions (:mod:`worker.reclaim.exemptions`), grace marks
(:mod:`worker.reclaim.marks`) and beat tick claims (:mod:`worker.reclaim.ticks`).

A run (nightly reclamation, drain or restore) is one hash ``run:<id>``: ``meta`` (JSON), one
``i:<uuid>`` field per instance (JSON: verdict, reason, numbers, outcome), and the counters
``todo``/``done``. Actions wait in ``run:<id>:queue``; each finished action takes the next one,
so at most ``cap`` run at once per host without any worker thread waiting. The manifest
``run:<id>:manifest`` lists exactly what the run suspended: what ``restore`` brings back.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import redis
from redis.commands.core import Script

from worker.core.errors import InvalidInput
from worker.reclaim import order
from worker.store import keys

ENTRY = "i:"
_RUN_ID = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,100}$")

# Finish one entry (see the header of lua/run_record.lua); registered once per client.
_RECORD = (Path(__file__).parent / "lua" / "run_record.lua").read_text()
_scripts: weakref.WeakKeyDictionary[redis.Redis, Script] = weakref.WeakKeyDictionary()


def _record_script(client: redis.Redis) -> Script:
    script = _scripts.get(client)
    if script is None:
        script = _scripts[client] = client.register_script(_RECORD)
    return script


def run_id(value: Any) -> str:
    """Validate a run id (it becomes part of Redis keys and request ids)."""
    if not isinstance(value, str) or not _RUN_ID.match(value):
        raise InvalidInput(f"malformed run id {value!r}: 1-100 characters of letters, digits "
                           "and ._:@+=-")
    return value


def stamp(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def nightly_id(host: str, day: dt.date) -> str:
    """One reclamation per host per night: ``<host>:<YYYY-MM-DD>``."""
    return f"{host}:{day.isoformat()}"


def manual_id(host: str, now: float, *, dry_run: bool = False) -> str:
    return f"{host}:{stamp(now)}" + (":dry" if dry_run else "")


def drain_id(host: str, now: float) -> str:
    return f"drain:{host}:{stamp(now)}"


def restore_id(of_run: str, now: float) -> str:
    return f"restore:{stamp(now)}:{of_run}"[:100]


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
    (worker/reclaim/order.py): the queue is in waves, each starting after the one before
    finished."""
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
    ahead of it finished (order.room decides; checked and popped in one transaction)."""
    if count <= 0:
        return []
    run, queue = keys.run(rid), keys.run_queue(rid)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(run)
                done, taken, waves = pipe.hmget(run, "done", "taken", "waves")
                n = order.room(json.loads(waves or "[]"), done=int(done or 0),
                               taken=int(taken or 0), want=count)
                if n <= 0:
                    pipe.unwatch()
                    return []
                pipe.multi()
                pipe.lpop(queue, n)
                pipe.hincrby(run, "taken", n)
                items, _ = pipe.execute()
                return cast(list[str], items or [])
            except redis.WatchError:  # an action finished meanwhile: decide again
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
    return {
        **json.loads(raw["meta"]),
        "todo": int(raw.get("todo", 0)),
        "done": int(raw.get("done", 0)),
        "entries": entries,
        "manifest": sorted(manifest(client, rid)),
    }


def manifest(client: redis.Redis, rid: str) -> set[str]:
    return cast(set[str], client.smembers(keys.run_manifest(rid)))


def latest(client: redis.Redis, *, count: int = 1) -> list[str]:
    """The newest run ids, newest first."""
    return cast(list[str], client.zrevrange(keys.RUNS, 0, count - 1))
