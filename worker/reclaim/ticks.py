"""Beat tick claims: one fan-out per tick even when two beat processes run."""

from __future__ import annotations

import redis

from worker.store import keys


def claim(client: redis.Redis, slot: str, *, ttl: int) -> bool:
    """True for the first claimer of ``slot``; the claim lapses after ``ttl`` seconds."""
    return bool(client.set(keys.schedule_claim(slot), "1", nx=True, ex=max(1, ttl)))
