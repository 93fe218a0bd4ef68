"""Activity samples: one ``getAllDomainStats`` call per host, stored compactly per instance.

A sample holds *cumulative* counters (CPU ns, network and block bytes) at one moment; rates are
worked out later by :mod:`worker.reclaim.idle` from consecutive samples, which is why a missed
sample costs nothing but resolution and why counters going backwards (restart, restore) can be
recognised as resets instead of being read as negative usage.

Storage, per instance: a sorted set scored by sample time whose members are short JSON arrays
``[t, state code, cpu_ns|null, vcpus, rx, tx, rd, wr]`` (~60 bytes), trimmed to the look-back
window on every write and expiring one window after the last write, so instances that vanish
clean up after themselves. A per-host sorted set (uuid -> last sample time) lists what a host
sampled, and ``first_seen`` remembers when an instance was first observed (minimum age).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from worker.store import keys

if TYPE_CHECKING:
    import redis

    from worker.hypervisor import Hypervisor


class Sample(NamedTuple):
    """Cumulative counters of one instance at time ``t`` (epoch seconds).

    A NamedTuple rather than a dataclass: immutable and keyword-constructible all the same, but
    ``zip(*samples)`` turns a window into columns in C, which keeps
    :func:`worker.reclaim.idle.decide` fast at fleet scale, and decoding creates one cheaply.
    """

    t: float
    state: str  # a worker.core.states.State value: "running", "paused", "suspended", ...
    cpu_ns: int | None  # None when the driver reports no cpu.time (libvirt's test driver)
    vcpus: int
    rx: int  # network bytes received, all interfaces
    tx: int  # network bytes sent
    rd: int  # block bytes read, all disks
    wr: int  # block bytes written


# One letter per common state keeps a day of 5-minute samples small; any other state is
# stored spelled out, so nothing is lost if worker.core.states grows.
_CODES = {
    "running": "r",
    "paused": "p",
    "suspended": "s",
    "shutoff": "o",
    "pmsuspended": "m",
    "crashed": "c",
    "busy": "b",
    "missing": "x",
    "unknown": "u",
}
_STATES = {code: state for state, code in _CODES.items()}


def encode(sample: Sample) -> str:
    """The sorted-set member for ``sample`` (unique per sample time and counters)."""
    return json.dumps(
        [round(sample.t, 3), _CODES.get(sample.state, sample.state), sample.cpu_ns,
         sample.vcpus, sample.rx, sample.tx, sample.rd, sample.wr],
        separators=(",", ":"),
    )


def decode(member: str | bytes) -> Sample:
    t, code, cpu, vcpus, rx, tx, rd, wr = json.loads(member)
    return Sample(float(t), _STATES.get(code, code), cpu, vcpus, rx, tx, rd, wr)


def collect(hv: Hypervisor, *, now: float) -> list[tuple[str, str, Sample]]:
    """Every domain of ``hv`` as ``(uuid, name, sample)`` from one ``getAllDomainStats`` call."""
    return [
        (st.uuid, st.name, Sample(
            t=now, state=str(st.state), cpu_ns=st.cpu_time_ns, vcpus=st.vcpus,
            rx=st.net_rx_bytes, tx=st.net_tx_bytes, rd=st.block_rd_bytes, wr=st.block_wr_bytes,
        ))
        for st in hv.stats()
    ]


def _ttl(window: float) -> int:
    return max(1, math.ceil(window))


def store(client: redis.Redis, host: str, items: Iterable[tuple[str, str, Sample]], *,
          window: float, now: float) -> int:
    """Append samples, trim to ``now - window``, note first sightings; one round trip.

    Samples at exactly ``now - window`` are kept (the window is closed at its start, like
    :func:`worker.reclaim.idle.decide`'s). Keys expire one window after their last write, and the
    expiry of ``first_seen`` is refreshed with every sample, so an instance's age survives as
    long as it keeps being sampled and restarts after it was gone a whole window.
    """
    ttl = _ttl(window)
    oldest = now - window
    count = 0
    index = keys.sampled(host)
    with client.pipeline(transaction=False) as pipe:
        for uuid, _name, sample in items:
            key = keys.samples(uuid)
            pipe.zadd(key, {encode(sample): sample.t})
            pipe.zremrangebyscore(key, "-inf", f"({oldest!r}")
            pipe.expire(key, ttl)
            seen = keys.first_seen(uuid)
            pipe.set(seen, repr(float(sample.t)), nx=True)
            pipe.expire(seen, ttl)
            pipe.zadd(index, {uuid: sample.t})
            count += 1
        if count:
            pipe.zremrangebyscore(index, "-inf", f"({oldest!r}")
            pipe.expire(index, ttl)
            pipe.execute()
    return count


def take(hv: Hypervisor, client: redis.Redis, host: str, *, window: float, now: float) -> int:
    """Collect and store one sample of every domain of this host; how many were stored."""
    return store(client, host, collect(hv, now=now), window=window, now=now)


def load(client: redis.Redis, uuids: Iterable[str], *, since: float) -> dict[str, list[Sample]]:
    """Samples with ``t >= since`` per instance, sorted by time; one round trip."""
    wanted = list(uuids)
    if not wanted:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for uuid in wanted:
            pipe.zrangebyscore(keys.samples(uuid), since, "+inf")
        replies = pipe.execute()
    return {uuid: [decode(m) for m in members]
            for uuid, members in zip(wanted, replies, strict=True)}


def first_seen(client: redis.Redis, uuids: Iterable[str]) -> dict[str, float | None]:
    """When each instance was first sampled (epoch seconds), or None if never (or long ago)."""
    wanted = list(uuids)
    if not wanted:
        return {}
    values: list[Any] = client.mget([keys.first_seen(u) for u in wanted])
    return {u: (None if v is None else float(v)) for u, v in zip(wanted, values, strict=True)}


def sampled(client: redis.Redis, host: str, *, since: float) -> list[str]:
    """UUIDs this host sampled at or after ``since`` (the instances it has evidence about)."""
    members = cast(list[str | bytes], client.zrangebyscore(keys.sampled(host), since, "+inf"))
    return [m.decode() if isinstance(m, bytes) else m for m in members]
