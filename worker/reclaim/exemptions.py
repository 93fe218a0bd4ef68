"""Instances an operator exempted from reclamation with ``dormant exempt`` (a Redis set).

The other way to opt out, a guest's own domain metadata, is read by :mod:`worker.reclaim.selection`.
"""

from __future__ import annotations

from typing import cast

import redis

from worker.store import keys


def add(client: redis.Redis, instance_uuid: str) -> bool:
    """Exempt an instance; False when it already was."""
    return bool(client.sadd(keys.EXEMPT, instance_uuid))


def remove(client: redis.Redis, instance_uuid: str) -> bool:
    """Lift an exemption; False when there was none."""
    return bool(client.srem(keys.EXEMPT, instance_uuid))


def members(client: redis.Redis) -> set[str]:
    return cast(set[str], client.smembers(keys.EXEMPT))


def contains(client: redis.Redis, instance_uuid: str) -> bool:
    return bool(client.sismember(keys.EXEMPT, instance_uuid))
