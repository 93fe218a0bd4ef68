"""What each family of keys costs Redis: key count, items and memory (``dormant usage``).

One SCAN walks every key of a database in batches (never KEYS: Redis keeps serving), and each
key is counted in its family (:data:`worker.store.keys.FAMILIES`, matched by prefix). Memory is
``MEMORY USAGE`` of every key of a small family and of a uniform sample of a large one
(reservoir sampling during the scan), scaled to the count -- per *kind* of key of a family
(:func:`stratum`), since one family may hold a hundred thousand 100-byte keys and fifty
100-kilobyte ones: a few hundred commands per kind whatever the number of keys, so the command
is safe to run against a busy fleet's Redis.
Items say more than keys where a key holds many things: messages in queues, unacknowledged
deliveries, journal entries.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import redis

from worker.store import keys

SAMPLE = 200  # keys measured per family; 0 = every key
SCAN_COUNT = 1000  # keys per SCAN call
_ITEMS = {"queues": "llen", "unacked": "hlen", "journals": "xlen"}


@dataclass
class FamilyUsage:
    """One family's keys in one store (broker, results, state; joined when they share a
    database)."""

    store: str
    family: str
    bound: str
    keys: int = 0
    bytes: int = 0  # MEMORY USAGE, summed, or estimated from ``measured`` keys
    measured: int = 0
    items: int | None = None  # messages, deliveries or entries, where they mean more than keys
    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "estimated": self.measured < self.keys}


def stratum(fam: keys.Family, key: str) -> tuple[str, int, str]:
    """Which kind of key of its family ``key`` is -- its prefix, how many ``:`` parts follow,
    and the last one when it is a word (``dormant:host:<h>:instances`` vs
    ``dormant:host:<h>:workers``, ``dormant:run:<id>`` vs ``dormant:run:<id>:queue``): a
    family can hold tiny keys and large ones, and each kind is sampled apart."""
    head = next((p for p in fam.prefixes if key.startswith(p)), "")
    rest = key[len(head):]
    last = rest.rsplit(":", 1)[-1] if ":" in rest else ""
    return head, rest.count(":"), last if last.replace("-", "").isalpha() else ""


def scan(client: redis.Redis, store: str, *, sample: int = SAMPLE, scan_count: int = SCAN_COUNT,
         rng: random.Random | None = None) -> list[FamilyUsage]:
    """Every key of ``client``'s database counted in its family, then measured: up to
    ``sample`` keys of each kind of key of a family (a uniform sample of each), scaled."""
    rng = rng or random.Random()
    found: dict[str, FamilyUsage] = {}
    strata: dict[tuple[str, tuple[str, int, str]], tuple[list[str], list[int]]] = {}
    for raw in client.scan_iter(count=scan_count):
        key = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        fam = keys.family(key)
        usage = found.get(fam.name)
        if usage is None:
            usage = found[fam.name] = FamilyUsage(store, fam.name, fam.bound)
        usage.keys += 1
        picked, seen = strata.setdefault((fam.name, stratum(fam, key)), ([], [0]))
        seen[0] += 1
        if not sample or len(picked) < sample:  # reservoir sampling (algorithm R)
            picked.append(key)
        elif (slot := rng.randrange(seen[0])) < sample:
            picked[slot] = key
    for (name, _kind), (picked, seen) in strata.items():
        _measure(client, found[name], picked, seen[0])
    return sorted(found.values(), key=lambda u: -u.bytes)


def _measure(client: redis.Redis, usage: FamilyUsage, picked: list[str], count: int) -> None:
    """Add one kind of key's memory (and items), measured on ``picked`` of its ``count``."""
    counter = _ITEMS.get(usage.family)
    with client.pipeline(transaction=False) as pipe:
        for key in picked:
            pipe.memory_usage(key)
            if counter:
                getattr(pipe, counter)(key)
        replies = pipe.execute(raise_on_error=False)
    step = 2 if counter else 1
    sizes = [r for r in replies[::step] if isinstance(r, int)]
    usage.measured += len(sizes)
    if sizes:
        usage.bytes += round(sum(sizes) * count / len(sizes))
    if counter:
        counts = [r for r in replies[1::2] if isinstance(r, int)]
        added = round(sum(counts) * count / len(counts)) if counts else 0
        usage.items = (usage.items or 0) + added


def server(client: redis.Redis) -> dict[str, Any]:
    """The server's own memory figures (INFO memory, server) and its keys per database."""
    info = client.info("memory")
    about = client.info("server")
    spaces = client.info("keyspace")
    return {"redis_version": about.get("redis_version"),
            "used_memory": int(info.get("used_memory", 0)),
            "used_memory_peak": int(info.get("used_memory_peak", 0)),
            "used_memory_dataset": int(info.get("used_memory_dataset", 0)),
            "maxmemory": int(info.get("maxmemory", 0)),
            "maxmemory_policy": info.get("maxmemory_policy"),
            "keys": {db: int(v.get("keys", 0)) for db, v in spaces.items()}}


def human(size: float) -> str:
    """Bytes as B, KiB, MiB or GiB with three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} TiB"  # pragma: no cover - the loop returns first
