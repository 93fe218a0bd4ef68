"""Grace marks: an idle instance is marked on one run and suspended on a later one.

A mark is ``mark:<uuid>`` = ``{"run_id", "at"}`` with an expiry; only the caller that creates a
mark sends its one notice, so a redelivered run never notifies twice.
"""

from __future__ import annotations

import json

import redis

from worker.reclaim.selection import Mark
from worker.store import keys


def load(client: redis.Redis, uuids: list[str]) -> dict[str, Mark | None]:
    """The mark of each instance, None for the unmarked; one round trip."""
    if not uuids:
        return {}
    values = client.mget([keys.mark(u) for u in uuids])
    out: dict[str, Mark | None] = {}
    for u, raw in zip(uuids, values, strict=True):
        if raw is None:
            out[u] = None
            continue
        data = json.loads(raw)
        out[u] = Mark(run_id=data["run_id"], at=float(data["at"]))
    return out


def put(client: redis.Redis, instance_uuid: str, *, rid: str, now: float, ttl: int) -> bool:
    """Mark an instance; True only for the caller that created the mark (who notifies)."""
    body = json.dumps({"run_id": rid, "at": now})
    return bool(client.set(keys.mark(instance_uuid), body, nx=True, ex=ttl))


def clear(client: redis.Redis, instance_uuid: str) -> bool:
    return bool(client.delete(keys.mark(instance_uuid)))
