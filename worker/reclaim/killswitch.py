"""The global kill switch: while it is on, reclamation decides and reports but suspends nothing.

Two sources: ``DORMANT_RECLAIM_ENABLED=false`` in the settings, and a Redis flag any operator
can flip with ``dormant kill-switch on|off`` (it records who turned it on and when).
"""

from __future__ import annotations

import json
from typing import Any, cast

import redis

from worker.reclaim.run_store import stamp
from worker.store import keys


def read(client: redis.Redis) -> dict[str, Any] | None:
    """Who turned reclamation off and when, or None when it is on."""
    raw = client.get(keys.KILL_SWITCH)
    if raw is None:
        return None
    try:
        return cast(dict[str, Any], json.loads(raw))
    except ValueError:
        return {"by": "unknown", "value": raw}


def turn(client: redis.Redis, on: bool, *, by: str, now: float) -> None:
    """``on=True`` stops reclamation (the switch is *on*); False lets it run again."""
    if on:
        client.set(keys.KILL_SWITCH, json.dumps({"by": by, "at": now}))
    else:
        client.delete(keys.KILL_SWITCH)


def disabled_reason(client: redis.Redis, *, enabled_setting: bool) -> str:
    """Why reclamation is off, or "" when it may act."""
    if not enabled_setting:
        return "kill switch on: DORMANT_RECLAIM_ENABLED=false"
    switch = read(client)
    if switch is not None:
        at = switch.get("at")
        when = f" at {stamp(float(at))}" if isinstance(at, int | float) else ""
        return f"kill switch on: set by {switch.get('by', 'unknown')}{when} (dormant kill-switch)"
    return ""
