"""The messages workers send on their own, kept until answered and sent again if not.

A worker sends tasks nobody waits for: the action of a reclamation, drain or restore run
(``dormant.run_item``), a transition forwarded from ``dormant.control`` to its host, the
auto-unpause of a due deadline. A failover of a Redis broker can lose such a message, and then
a run stalls for good, or a pause never ends. So each one is also written here, in the state
store, with what answers it (its request recorded, or its run entry finished); a timer on the
control workers (``tasks/timers.py``) checks the due ones, drops the answered, leaves alone the
ones whose guest is locked (under way), and sends the rest again with the same task id and
arguments (so the same request id) on worker/api/resend.py's schedule.

Keys: ``dormant:outbox`` (zset: task id -> when to check next) and ``dormant:outbox:entries``
(hash: task id -> the entry's JSON); an entry lives from its send to its answer, about 200
bytes, so the hash holds what is in flight. Each due entry is claimed by one worker as a lease
(lua/outbox_claim.lua): a worker that dies mid-check leaves it due again a minute later.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import redis
from redis.commands.core import Script

from worker.reclaim import run_store
from worker.store import keys
from worker.store.connection import translated

MAX_SENDS = 12  # copies of one message before it is given up (logged): ~1.3 h at 30 s
LEASE = 60.0  # seconds before a claimed entry whose claimer vanished comes due again

_CLAIM = (Path(__file__).parent / "lua" / "outbox_claim.lua").read_text()
_scripts: weakref.WeakKeyDictionary[redis.Redis, Script] = weakref.WeakKeyDictionary()


def _claim_script(client: redis.Redis) -> Script:
    script = _scripts.get(client)
    if script is None:
        script = _scripts[client] = client.register_script(_CLAIM)
    return script


@dataclass
class Entry:
    """One message a worker sent, and how to tell it was answered."""

    task_id: str
    task: str
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    instance: str = ""  # the guest: a held lock means the work is under way
    request_id: str = ""  # answered once this request is recorded (done or failed)
    run: str = ""  # or: answered once this run's entry for ``instance`` is finished
    sends: int = 1


def keep(client: redis.Redis, entry: Entry, *, check_at: float) -> None:
    """Remember a message just sent (first checked at ``check_at``)."""
    with translated(), client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.OUTBOX_ENTRIES, entry.task_id, json.dumps(asdict(entry)))
        pipe.zadd(keys.OUTBOX, {entry.task_id: check_at})
        pipe.execute()


def due(client: redis.Redis, now: float, *, limit: int = 100) -> list[Entry]:
    """The entries to check now, each returned to one caller only (for :data:`LEASE`)."""
    with translated():
        ids = cast(list[str], _claim_script(client)(keys=[keys.OUTBOX],
                                                     args=[now, now + LEASE, limit]))
        raw = cast(list[str | None], client.hmget(keys.OUTBOX_ENTRIES, ids)) if ids else []
    return [Entry(**json.loads(r)) for r in raw if r]


def answered(client: redis.Redis, entry: Entry) -> bool:
    """Whether what the message asked for has been recorded (a success or a failure)."""
    with translated():
        if entry.run:
            return bool((run_store.entry(client, entry.run, entry.instance) or {}).get("finished"))
        raw = client.get(keys.request(entry.request_id))
    return bool(raw) and json.loads(cast(str, raw)).get("status") in {"done", "failed"}


def under_way(client: redis.Redis, entry: Entry) -> bool:
    """Whether a transition holds the guest now (the message's, or one it waits behind)."""
    with translated():
        return bool(entry.instance) and bool(client.exists(keys.lock(entry.instance)))


def again(client: redis.Redis, entry: Entry, *, check_at: float) -> None:
    """Check the entry again later (after sending another copy, or because it is under way)."""
    keep(client, entry, check_at=check_at)


def drop(client: redis.Redis, entry: Entry) -> None:
    with translated(), client.pipeline(transaction=True) as pipe:
        pipe.hdel(keys.OUTBOX_ENTRIES, entry.task_id)
        pipe.zrem(keys.OUTBOX, entry.task_id)
        pipe.execute()
