"""Maintenance-day order: which guests a restore (or drain) may act on now.

A guest's priority comes from dormant's element in its domain metadata (the same element as the
exemption)::

    <dormant:policy xmlns:dormant="https://dormant.dev/xmlns/1" priority="10"/>

Higher comes back first on ``restore`` (databases before the services that need them) and goes
down last on ``drain``. Guests of one priority form a *wave*; a wave starts only when every
action of the waves before it has finished (resumed, skipped or failed), and within a wave as
many run at once as the host cap allows. Pure functions over plain data, so the rules are
tested without Redis or libvirt (tests/unit/test_order.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from itertools import accumulate

DEFAULT_PRIORITY = 0
MAX_PRIORITY = 1000  # |priority| above this is a typo, not an intent


def metadata_priority(xml: str | None) -> int:
    """The ``priority`` attribute of dormant's metadata element; 0 when absent.

    ValueError (with the reason) for unreadable XML or a priority that is not an integer in
    [-1000, 1000]: the caller keeps the default and says why, it never guesses.
    """
    if not xml:
        return DEFAULT_PRIORITY
    try:
        raw = ET.fromstring(xml).get("priority")
    except ET.ParseError as exc:
        raise ValueError(f"unreadable dormant metadata: {exc}") from None
    if raw is None or not raw.strip():
        return DEFAULT_PRIORITY
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"priority {raw!r} is not an integer") from None
    if abs(value) > MAX_PRIORITY:
        raise ValueError(f"priority {value} is out of range [-{MAX_PRIORITY}, {MAX_PRIORITY}]")
    return value


def waves(priorities: Mapping[str, int], order: Sequence[str], *,
          kind: str) -> list[list[str]]:
    """``order``'s instances grouped by priority: highest first for ``restore``, lowest first
    for ``drain`` (and anything else); the given order is kept within a wave."""
    if kind not in {"restore", "drain"}:
        raise ValueError(f"waves are for restore or drain, not {kind!r}")
    levels = sorted({priorities.get(i, DEFAULT_PRIORITY) for i in order},
                    reverse=kind == "restore")
    grouped = [[i for i in order if priorities.get(i, DEFAULT_PRIORITY) == level]
               for level in levels]
    return [w for w in grouped if w]


def bounds(wave_sizes: Sequence[int]) -> list[int]:
    """Cumulative wave ends: sizes [2, 3, 1] -> [2, 5, 6] (what Redis keeps per run)."""
    return list(accumulate(int(n) for n in wave_sizes))


def room(wave_ends: Sequence[int], *, done: int, taken: int, want: int) -> int:
    """How many more queued actions may start now.

    ``done`` actions have finished and ``taken`` have been started, in queue order (waves are
    queued one after another). Only the current wave -- the first whose end is beyond ``done``
    -- may start; none of a later wave before it has finished. Without waves (``wave_ends``
    empty) the queue is one wave.
    """
    if want <= 0:
        return 0
    current_end = next((end for end in wave_ends if end > done), None)
    if current_end is None:  # no waves, or all finished: whatever is left is one wave
        return want
    return max(0, min(want, current_end - taken))
