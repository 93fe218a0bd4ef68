"""Activity samples: one ``getAllDomainStats`` call per host, stored compactly per instance.

A sample holds *cumulative* counters (CPU ns, network and block bytes) at one moment. What is
stored is one small binary record per instance (:mod:`worker.reclaim.activity`: a row of four
one-byte rate codes per sample, ~1.4 KB for a day of 5-minute samples) and the list of times
its host sampled. Rates are worked out when a sample is stored, against the instance's
previous sample (kept raw in its record), so a missed sample costs nothing but resolution and
a counter going backwards (restart, restore) is recognised as a reset, not negative usage.

Every write drops what is older than the look-back window and makes the keys expire one
window after it, so instances that vanish clean up after themselves; the record also keeps
when the instance was first sampled (the minimum age). A per-host string (uuid -> last
sample time) lists what a host sampled.

Writing reads the host's times and its instances' records and writes them back in one
transaction (WATCH/MULTI; ~3 round trips per host whatever the number of guests), so two
samplers of one host never interleave their rows. Loading is one round trip.

Samples stored in the old form (a sorted set of JSON per instance, ``dormant:samples:<uuid>``,
and ``dormant:first-seen:<uuid>``) are converted by the first write after an upgrade and
read as they are until then; nothing is lost and nothing needs a migration step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.client import NEVER_DECODE

from worker.core.errors import InstanceBusy
from worker.reclaim import activity, window
from worker.reclaim.activity import NONE, Record, Sample, Times
from worker.reclaim.quantise import Thresholds
from worker.reclaim.window import EMPTY, Activity
from worker.store import keys

if TYPE_CHECKING:
    from worker.hypervisor import Hypervisor

__all__ = ["Sample", "collect", "first_seen", "load", "sampled", "store", "take"]

log = logging.getLogger("dormant.sampling")
RAW: dict[str, Any] = {NEVER_DECODE: []}  # binary values: bypass the client's decoding
WRITE_ATTEMPTS = 5  # a second sampler of the same host made us start over this many times

# The old form's state letters (read once, when converting).
_LEGACY_STATES = {"r": "running", "p": "paused", "s": "suspended", "o": "shutoff",
                  "m": "pmsuspended", "c": "crashed", "b": "busy", "x": "missing",
                  "u": "unknown"}


def collect(hv: Hypervisor, *, now: float, of: list[str] | None = None
            ) -> list[tuple[str, str, Sample]]:
    """Every domain of ``hv`` (or only those named in ``of``) as ``(uuid, name, sample)``,
    from one stats call."""
    return [
        (st.uuid, st.name, Sample(
            t=now, state=str(st.state), cpu_ns=st.cpu_time_ns, vcpus=st.vcpus,
            rx=st.net_rx_bytes, tx=st.net_tx_bytes, rd=st.block_rd_bytes, wr=st.block_wr_bytes,
        ))
        for st in (hv.stats() if of is None else hv.stats_of(of))
    ]


def _ttl(window: float) -> int:
    return max(1, math.ceil(window))


def _legacy(client: redis.Redis, uuids: list[str], since: float
            ) -> dict[str, tuple[list[Sample], float | None]]:
    """Old-form samples (``t >= since``) and first sightings of ``uuids``; one round trip."""
    if not uuids:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for uuid in uuids:
            pipe.zrangebyscore(keys.samples(uuid), since, "+inf")
            pipe.get(keys.first_seen(uuid))
        replies = pipe.execute()
    found = {}
    for i, uuid in enumerate(uuids):
        members, seen = replies[2 * i], replies[2 * i + 1]
        if not members and seen is None:
            continue
        samples = []
        for member in members:
            t, code, cpu, vcpus, rx, tx, rd, wr = json.loads(member)
            samples.append(Sample(float(t), _LEGACY_STATES.get(code, code), cpu, vcpus, rx, tx,
                                  rd, wr))
        found[uuid] = (sorted(samples), None if seen is None else float(seen))
    return found


def _adopt(legacy: tuple[list[Sample], float | None], host: str, th: Thresholds) -> Record:
    samples, seen = legacy
    if samples:
        return activity.from_samples(host, samples, th, first_seen=seen)
    return activity.new_record(host, cast(float, seen), th)


def _rehost(rec: Record, old: Times, host: str) -> Record:
    """A record written on another host (the guest moved): its rows keep their times, as
    explicit ones, and its next row starts a new run of this host's ticks."""
    stamps = rec.stamps(old)
    kept = [k for k, t in enumerate(stamps) if t is not None]
    cpu, rx, tx = (bytes(col[k] for k in kept) for col in (rec.cpu, rec.rx, rec.tx))
    disk = bytes((rec.disk[k] | activity.EXPLICIT_BIT) for k in kept)
    explicit = [(cast(int, stamps[k]), NONE) for k in kept]
    return Record(host, rec.first_seen, rec.thresholds, rec.last, NONE, NONE, cpu, rx, tx, disk,
                  explicit)


def store(client: redis.Redis, host: str, items: Iterable[tuple[str, str, Sample]], *,
          window: float, now: float, thresholds: Thresholds | None = None) -> int:
    """Store samples taken on ``host``; drop what is older than ``now - window``. Returns how
    many were stored.

    ``items`` may hold several samples of one instance (in time order). A sample older than
    the newest one already stored for its host or instance is dropped (and logged): rates
    are worked out against the previous sample, which must be the one before it in time.
    ``thresholds`` are the idle policy's (the codes are exact for them).
    """
    grouped: dict[str, list[Sample]] = {}
    for uuid, _name, sample in items:
        grouped.setdefault(uuid, []).append(sample)
    if not grouped:
        return 0
    th = thresholds or Thresholds()
    for _attempt in range(WRITE_ATTEMPTS):
        try:
            return _store_once(client, host, grouped, th, window=window, now=now)
        except redis.WatchError:
            continue
    raise InstanceBusy(f"samples of host {host}: another sampler kept writing them "
                       f"({WRITE_ATTEMPTS} attempts)")


def _store_once(client: redis.Redis, host: str, grouped: dict[str, list[Sample]],
                th: Thresholds, *, window: float, now: float) -> int:
    uuids = list(grouped)
    ticks_key, index_key = keys.activity_times(host), keys.activity_guests(host)
    record_keys = [keys.activity(u) for u in uuids]
    oldest = now - window
    oldest_ms = math.ceil(oldest * 1000)
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(ticks_key, index_key, *record_keys)
        raw_ticks, raw_index, *raw = pipe.execute_command("MGET", ticks_key, index_key,
                                                           *record_keys, **RAW)
        ticks = Times.unpack(raw_ticks)
        records = {u: Record.unpack(b) for u, b in zip(uuids, raw, strict=True) if b}
        adopted = _legacy(client, [u for u in uuids if u not in records], oldest)
        records |= {u: _adopt(found, host, th) for u, found in adopted.items()}
        for old_host in {r.host for r in records.values()} - {host}:
            old = Times.unpack(client.execute_command("GET", keys.activity_times(old_host),
                                                      **RAW))
            records |= {u: _rehost(r, old, host) for u, r in records.items()
                        if r.host == old_host}
        newest = ticks.ms[-1] if ticks.ms else None
        times = sorted({activity.millis(s.t) for ss in grouped.values() for s in ss})
        seq_of = {t: ticks.add(t) for t in times if newest is None or t >= newest}
        written, stored = {}, 0
        for uuid, samples in grouped.items():
            rec = records.get(uuid)
            if rec is None or (rec.last is not None and rec.last.t < oldest):
                # New, or unsampled for a whole window (its key would have expired): its
                # age starts again, as its evidence does.
                rec = activity.new_record(host, samples[0].t, th)
            if not rec.thresholds.same_as(th):
                rec = activity.requantised(rec, th)
            rows = []
            newest_ms = activity.millis(rec.last.t) if rec.last else None
            for s in samples:
                t_ms = activity.millis(s.t)
                if t_ms not in seq_of or (newest_ms is not None and t_ms < newest_ms):
                    log.warning("sample of %s at %.3f dropped: older than the newest stored "
                                "on %s", uuid, s.t, host)
                    continue
                stored_t = t_ms / 1000  # to the millisecond, as samples were always kept
                rows.append((s if s.t == stored_t else s._replace(t=stored_t), seq_of[t_ms]))
                newest_ms = t_ms
            stored += len(rows)
            written[uuid] = activity.drop_before(activity.extend(rec, rows), ticks, oldest_ms)
        ttl = _ttl(window)
        seen = activity.unpack_sampled(raw_index)
        pipe.multi()
        pipe.set(ticks_key, ticks.trimmed(oldest_ms).pack(), ex=ttl)
        for uuid, rec in written.items():
            if len(rec):
                pipe.set(keys.activity(uuid), rec.pack(), ex=ttl)
                assert rec.last is not None
                seen[uuid] = activity.millis(rec.last.t)
            else:
                pipe.delete(keys.activity(uuid))
        if adopted:
            pipe.delete(*(k for u in adopted for k in (keys.samples(u), keys.first_seen(u))))
        seen = {u: t for u, t in seen.items() if t >= oldest_ms}
        pipe.set(index_key, activity.pack_sampled(seen), ex=ttl)
        pipe.execute()
    return stored


def take(hv: Hypervisor, client: redis.Redis, host: str, *, window: float, now: float,
         thresholds: Thresholds | None = None) -> int:
    """Collect and store one sample of every domain of this host; how many were stored."""
    return store(client, host, collect(hv, now=now), window=window, now=now,
                 thresholds=thresholds)


def load(client: redis.Redis, uuids: Iterable[str], *, since: float, host: str | None = None
         ) -> dict[str, Activity]:
    """Each instance's samples with ``t >= since``. One round trip when ``host`` (whose
    times the records use) is given and every instance has a record; else one or two more."""
    wanted = list(uuids)
    if not wanted:
        return {}
    with client.pipeline(transaction=False) as pipe:
        pipe.execute_command("MGET", *(keys.activity(u) for u in wanted), **RAW)
        if host is not None:
            pipe.execute_command("GET", keys.activity_times(host), **RAW)
        replies = pipe.execute()
    ticks = {host: Times.unpack(replies[1])} if host is not None else {}
    records = {u: Record.unpack(b) for u, b in zip(wanted, replies[0], strict=True) if b}
    others = sorted({r.host for r in records.values()} - set(ticks))
    if others:
        with client.pipeline(transaction=False) as pipe:
            for other in others:
                pipe.execute_command("GET", keys.activity_times(other), **RAW)
            ticks |= {h: Times.unpack(b) for h, b in zip(others, pipe.execute(), strict=True)}
    found = {u: window.view(r, ticks[r.host]).since(since) for u, r in records.items()}
    legacy = _legacy(client, [u for u in wanted if u not in records], since)
    for uuid, old in legacy.items():
        rec = _adopt(old, host or "", Thresholds())
        found[uuid] = window.view(rec, Times()).since(since)
    return {u: found.get(u, EMPTY) for u in wanted}


_FIRST_SEEN = activity.HEADER_FIRST_SEEN


def first_seen(client: redis.Redis, uuids: Iterable[str]) -> dict[str, float | None]:
    """When each instance was first sampled (epoch seconds), or None if never (or long ago)."""
    wanted = list(uuids)
    if not wanted:
        return {}
    start, size = _FIRST_SEEN
    with client.pipeline(transaction=False) as pipe:
        for uuid in wanted:
            pipe.execute_command("GETRANGE", keys.activity(uuid), 0, start + size - 1, **RAW)
            pipe.get(keys.first_seen(uuid))  # the old form, until the first write converts it
        replies = pipe.execute()
    found: dict[str, float | None] = {}
    for i, uuid in enumerate(wanted):
        header, legacy = replies[2 * i], replies[2 * i + 1]
        if header:
            found[uuid] = activity.first_seen_of(header)
        else:
            found[uuid] = None if legacy is None else float(legacy)
    return found


def sampled(client: redis.Redis, host: str, *, since: float) -> list[str]:
    """UUIDs this host sampled at or after ``since`` (the instances it has evidence about),
    oldest last sample first."""
    seen = activity.unpack_sampled(client.execute_command("GET", keys.activity_guests(host),
                                                          **RAW))
    since_ms = since * 1000
    return [u for u, t in sorted(seen.items(), key=lambda kv: kv[1]) if t >= since_ms]
