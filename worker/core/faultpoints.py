"""Pause points for the fault suite: a transition stops at a named point until told to go on.

Off unless the worker's environment sets ``FAULTPOINT_DIR`` (bench/faults.py does; nothing
else should): then a point is armed for one instance by creating ``<dir>/<point>.<uuid>``;
the transition that reaches it renames that file to ``.reached`` (one shot) and waits until
``<dir>/<point>.<uuid>.go`` exists (at most :data:`LONGEST`). That is how the suite SIGKILLs
the Redis master between a fence ``INCR`` and the libvirt call without relying on luck.
A test hook, but a cheap one: unset, each point is one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "FAULTPOINT_DIR"
LONGEST = 600.0  # seconds a reached point waits for its go before going on anyway


def reached(point: str, instance: str) -> None:
    """Wait here if the fault suite armed ``point`` for ``instance``."""
    where = os.environ.get(ENV)
    if not where:
        return
    armed = Path(where) / f"{point}.{instance.lower()}"
    try:
        armed.rename(armed.with_name(armed.name + ".reached"))
    except FileNotFoundError:
        return  # not armed for this instance (or already used)
    go = armed.with_name(armed.name + ".go")
    deadline = time.monotonic() + LONGEST
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
