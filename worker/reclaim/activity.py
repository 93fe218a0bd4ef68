"""Activity as stored: one compact binary record per instance, and one list of sample times
per host.

Why this shape (bench/RESULTS.md "Fleet scale" has the alternatives measured): the idle rule
needs, per interval between two samples, only whether each rate was under its threshold, the
interval's length, and why an interval is no evidence -- not the counters. So each sample is
stored as one **row of four one-byte codes** (:mod:`worker.reclaim.quantise`): CPU % per
vCPU, network rx, tx and disk rates of the interval that ends at it, the CPU code doubling as
"not running", "no CPU time" or "counter reset". Sample *times* must stay exact to the
millisecond (the window's edge, gaps and the observed span are printed in reasons), but one
``getAllDomainStats`` call samples every guest of a host at the same moment: the times live
once per host in :class:`Times`, and a row refers to its host tick implicitly -- the row after
a row at tick *s* is at tick *s + 1*. A row that is not (a guest that missed ticks, or rows
written on another host) carries its time in the record's small *explicit* list instead.

Memory, one instance, a day of 5-minute samples (288 rows): a ``Record`` is 79 bytes of
header + the host name + 4 bytes per row = ~1,250 bytes, written with SET so Redis allocates
it exactly (1,280-byte jemalloc class; APPEND would over-allocate up to 2x): **1,384 bytes per
guest-day** by ``MEMORY USAGE`` (1,456 by ``used_memory``), plus the host's ticks, 8 bytes per
sample per *host* (~23 bytes per guest at 100 guests a host). The old JSON sorted set took
~54,000. Rows outside the window are dropped on every write, so a record never holds more
than one window.

The header keeps the newest sample's raw counters (rates need the previous sample) and when
the instance was first sampled (the minimum age), so nothing else is stored per instance.
Reading is :mod:`worker.reclaim.window`; storing and loading, :mod:`worker.reclaim.sampling`.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from worker.reclaim.quantise import (
    CPU_GRID,
    DISK_GRID,
    NET_GRID,
    NO_CPU,
    NOT_RUNNING,
    RESET,
    SPECIAL,
    Coder,
    Grid,
    Thresholds,
    coder,
    representatives,
)

RUNNING = "running"


class Sample(NamedTuple):
    """Cumulative counters of one instance at time ``t`` (epoch seconds), as libvirt gives
    them. Immutable and cheap to build; ``zip(*samples)`` turns a window into columns in C."""

    t: float
    state: str  # a worker.core.states.State value: "running", "paused", "suspended", ...
    cpu_ns: int | None  # None when the driver reports no cpu.time (libvirt's test driver)
    vcpus: int
    rx: int  # network bytes received, all interfaces
    tx: int  # network bytes sent
    rd: int  # block bytes read, all disks
    wr: int  # block bytes written


def millis(t: float) -> int:
    """``t`` in whole milliseconds: samples were always kept to the millisecond."""
    return round(round(t, 3) * 1000)


def row_codes(prev: Sample | None, cur: Sample, codes: Coder) -> tuple[int, int, int, int]:
    """(cpu, rx, tx, disk) codes of the interval from ``prev`` to ``cur``, with the same
    arithmetic on the same floats as :func:`worker.reclaim.idle.decide` on raw samples.

    Only what the reader cannot see itself is decided here: a sample not running, a missing
    CPU counter, a counter going backwards. Intervals of zero or negative length, and gaps
    (the policy's ``max_gap``), are judged from the times when deciding.
    """
    if cur.state != RUNNING:
        return NOT_RUNNING, 0, 0, 0
    if prev is None or prev.state != RUNNING:
        return 0, 0, 0, 0  # no interval, or one the previous row already marks not running
    dt = cur.t - prev.t
    if dt <= 0:
        return 0, 0, 0, 0
    if prev.cpu_ns is None or cur.cpu_ns is None:
        return NO_CPU, 0, 0, 0
    dc, dr, dx = cur.cpu_ns - prev.cpu_ns, cur.rx - prev.rx, cur.tx - prev.tx
    dd = cur.rd + cur.wr - prev.rd - prev.wr  # reads + writes, one counter
    if dc < 0 or dr < 0 or dx < 0 or dd < 0:
        return RESET, 0, 0, 0
    cpu = dc / (dt * max(min(prev.vcpus, cur.vcpus), 1) * 1e7)  # % of the allocated vCPUs
    return codes.codes(cpu, dr / dt, dx / dt, dd / dt)


# -- a host's sample times ---------------------------------------------------------------------
_TIMES = struct.Struct("<BI")  # version, seq of the first time kept
NONE = 0xFFFFFFFF  # no tick


@dataclass
class Times:
    """The times (ms) a host sampled, oldest first; the i-th has sequence ``first_seq + i``."""

    first_seq: int = 0
    ms: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seconds = [t / 1000 for t in self.ms]
        self.cache: dict[object, object] = {}  # what readers work out once per host

    @property
    def next_seq(self) -> int:
        return self.first_seq + len(self.ms)

    def time(self, seq: int) -> int | None:
        i = seq - self.first_seq
        return self.ms[i] if 0 <= i < len(self.ms) else None

    def add(self, t_ms: int) -> int:
        """Append a time; its sequence number."""
        self.ms.append(t_ms)
        self.seconds.append(t_ms / 1000)
        self.cache.clear()
        return self.next_seq - 1

    def trimmed(self, oldest_ms: int) -> Times:
        cut = bisect_left(self.ms, oldest_ms)
        return Times(self.first_seq + cut, self.ms[cut:])

    def pack(self) -> bytes:
        return _TIMES.pack(1, self.first_seq) + struct.pack(f"<{len(self.ms)}q", *self.ms)

    @classmethod
    def unpack(cls, data: bytes | None) -> Times:
        if not data:
            return cls()
        _version, first = _TIMES.unpack_from(data)
        count = (len(data) - _TIMES.size) // 8
        return cls(first, list(struct.unpack_from(f"<{count}q", data, _TIMES.size)))


# -- which guests a host sampled ---------------------------------------------------------------
_SEEN = struct.Struct("<qB")  # last sample (ms), length of the uuid that follows


def pack_sampled(last: dict[str, int]) -> bytes:
    """uuid -> time (ms) of its last sample on a host, as one string (~45 bytes a guest,
    where a sorted set of them took ~200 -- most of a guest-day again)."""
    return b"".join(_SEEN.pack(t, len(u)) + u.encode() for u, t in last.items())


def unpack_sampled(data: bytes | None) -> dict[str, int]:
    out: dict[str, int] = {}
    at = 0
    while data and at < len(data):
        t, size = _SEEN.unpack_from(data, at)
        at += _SEEN.size
        out[data[at:at + size].decode()] = t
        at += size
    return out


# -- one instance's record ---------------------------------------------------------------------
# version, flags, first seen, last sample (t ms, cpu ns, vcpus, rx, tx, rd + wr), thresholds,
# seq of row 0 and of the last row, explicit rows, length of the host name
_HEADER = struct.Struct("<BBdqqHQQQ16sIIHB")
HEADER_FIRST_SEEN = (2, 8)  # offset and size of "first seen" (GETRANGE reads only that)
_EXPLICIT = struct.Struct("<qI")  # a row's own time (ms) and its tick (NONE: another host's)
_HAS_LAST, _RUNNING, _HAS_CPU = 1, 2, 4
EXPLICIT_BIT = 0x80  # in the disk column: this row's time is in the explicit list
DISK_ONLY = bytes(c & 0x7F for c in range(256))  # translate table: the disk codes alone
_U64 = (1 << 64) - 1


def _u64(value: int) -> int:
    return min(max(int(value), 0), _U64)


@dataclass
class Record:
    """What is stored for one instance (see the module docstring)."""

    host: str
    first_seen: float
    thresholds: Thresholds
    last: Sample | None = None  # the newest sample's counters (t: its stored time)
    first_seq: int = NONE  # tick of row 0 when it has no explicit time
    last_seq: int = NONE  # tick of the newest row (NONE: not one of this host's)
    cpu: bytes = b""
    rx: bytes = b""
    tx: bytes = b""
    disk: bytes = b""  # with EXPLICIT_BIT
    explicit: list[tuple[int, int]] = field(default_factory=list)  # (t ms, seq), row order

    def __len__(self) -> int:
        return len(self.cpu)

    def pack(self) -> bytes:
        last = self.last
        flags = 0
        if last is not None:
            flags = _HAS_LAST | (_RUNNING if last.state == RUNNING else 0) | (
                _HAS_CPU if last.cpu_ns is not None else 0)
        host = self.host.encode()[:255]
        head = _HEADER.pack(
            1, flags, self.first_seen, millis(last.t) if last else 0,
            _u64(last.cpu_ns or 0) if last else 0, min(last.vcpus, 0xFFFF) if last else 0,
            _u64(last.rx) if last else 0, _u64(last.tx) if last else 0,
            _u64(last.rd + last.wr) if last else 0, self.thresholds.pack(),
            self.first_seq, self.last_seq, len(self.explicit), len(host))
        tail = b"".join(_EXPLICIT.pack(t, s) for t, s in self.explicit)
        return b"".join((head, host, self.cpu, self.rx, self.tx, self.disk, tail))

    @classmethod
    def unpack(cls, data: bytes) -> Record:
        (_version, flags, first_seen, t_ms, cpu_ns, vcpus, rx_bytes, tx_bytes, disk_bytes, th,
         first_seq, last_seq, n_explicit, host_len) = _HEADER.unpack_from(data)
        at = _HEADER.size
        host = data[at:at + host_len].decode()
        at += host_len
        n = (len(data) - at - n_explicit * _EXPLICIT.size) // 4
        cpu, rx, tx, disk = (data[at + i * n:at + (i + 1) * n] for i in range(4))
        at += 4 * n
        explicit = [_EXPLICIT.unpack_from(data, at + i * _EXPLICIT.size)
                    for i in range(n_explicit)]
        last = None
        if flags & _HAS_LAST:
            last = Sample(t_ms / 1000, RUNNING if flags & _RUNNING else "other",
                          cpu_ns if flags & _HAS_CPU else None, vcpus, rx_bytes, tx_bytes,
                          disk_bytes, 0)
        return cls(host, first_seen, Thresholds.unpack(th), last, first_seq, last_seq,
                   cpu, rx, tx, disk, explicit)

    # -- which tick each row is -----------------------------------------------------------
    def stamps(self, ticks: Times) -> list[int | None]:
        """Each row's time (ms), or None where its tick is no longer (or not) in ``ticks``."""
        n = len(self)
        if not self.explicit:
            return [ticks.time(self.first_seq + k) for k in range(n)]
        out: list[int | None] = []
        pending = iter(self.explicit)
        seq = NONE
        for k in range(n):
            if self.disk[k] & EXPLICIT_BIT:
                t_ms, seq = next(pending)
                out.append(t_ms)
            else:
                seq = self.first_seq if k == 0 else seq + 1
                out.append(ticks.time(seq) if seq != NONE else None)
        return out

    def seqs(self) -> list[int]:
        """Each row's tick (NONE for rows whose time is explicit and not one of this host's)."""
        pending = iter(self.explicit)
        out, seq = [], NONE
        for k in range(len(self)):
            if self.disk[k] & EXPLICIT_BIT:
                seq = next(pending)[1]
            else:
                seq = self.first_seq if k == 0 else seq + 1
            out.append(seq)
        return out


def first_seen_of(header: bytes) -> float:
    """"First seen" from the start of a packed record (``HEADER_FIRST_SEEN``)."""
    return float(struct.unpack_from("<d", header, HEADER_FIRST_SEEN[0])[0])


def new_record(host: str, first_seen: float, thresholds: Thresholds) -> Record:
    return Record(host, first_seen, thresholds)


def extend(rec: Record, rows: Iterable[tuple[Sample, int]]) -> Record:
    """``rec`` with more rows: each ``(sample, seq)`` is a sample (its ``t`` already a stored
    time) at tick ``seq`` of the record's host (NONE: a time that is not one of its ticks)."""
    cols = [bytearray(c) for c in (rec.cpu, rec.rx, rec.tx, rec.disk)]
    explicit = list(rec.explicit)
    last, first_seq, last_seq = rec.last, rec.first_seq, rec.last_seq
    n = len(rec)
    th = coder(rec.thresholds)
    for sample, seq in rows:
        codes = row_codes(last, sample, th)
        disk = codes[3]
        if n == 0 and seq != NONE:
            first_seq = seq
        elif n == 0 or last_seq == NONE or seq != last_seq + 1:
            explicit.append((millis(sample.t), seq))
            disk |= EXPLICIT_BIT
        for col, code in zip(cols, (codes[0], codes[1], codes[2], disk), strict=True):
            col.append(code)
        last, last_seq, n = sample, seq, n + 1
    return replace(rec, last=last, first_seq=first_seq, last_seq=last_seq,
                   cpu=bytes(cols[0]), rx=bytes(cols[1]), tx=bytes(cols[2]),
                   disk=bytes(cols[3]), explicit=explicit)


def append(rec: Record, sample: Sample, seq: int) -> Record:
    """``rec`` with one more row (see :func:`extend`)."""
    return extend(rec, [(sample, seq)])


def drop_before(rec: Record, ticks: Times, oldest_ms: int) -> Record:
    """``rec`` without its rows older than ``oldest_ms`` or whose tick ``ticks`` no longer
    has (both only ever at the front: rows are in time order)."""
    n = len(rec)
    if not rec.explicit:
        first_kept = bisect_left(ticks.ms, oldest_ms) + ticks.first_seq
        cut = min(n, max(0, first_kept - rec.first_seq))
    else:
        stamps = rec.stamps(ticks)
        cut = 0
        while cut < n and ((t := stamps[cut]) is None or t < oldest_ms):
            cut += 1
    if cut == 0:
        return rec
    seqs = rec.seqs()
    gone = sum(1 for b in rec.disk[:cut] if b & EXPLICIT_BIT)
    disk = rec.disk[cut:]
    first = seqs[cut] if disk and not disk[0] & EXPLICIT_BIT else NONE
    return replace(rec, first_seq=first, cpu=rec.cpu[cut:], rx=rec.rx[cut:], tx=rec.tx[cut:],
                   disk=disk, explicit=rec.explicit[gone:])


def requantised(rec: Record, thresholds: Thresholds) -> Record:
    """``rec``'s rows re-coded for other thresholds, through their representative values
    (approximate: the raw rates are gone); the CPU column's explanations stay as they are."""
    old, new = rec.thresholds, thresholds

    def recode(col: bytes, grid: Grid, was: float, now: float, mask: int = 0xFF) -> bytes:
        reps = representatives(grid, was)
        return bytes(c if grid is CPU_GRID and c >= SPECIAL
                     else (c & ~mask & 0xFF) | grid.code(reps[c & mask], now) for c in col)

    return replace(
        rec, thresholds=thresholds,
        cpu=recode(rec.cpu, CPU_GRID, old.cpu_percent, new.cpu_percent),
        rx=recode(rec.rx, NET_GRID, old.rx_bps, new.rx_bps),
        tx=recode(rec.tx, NET_GRID, old.tx_bps, new.tx_bps),
        disk=recode(rec.disk, DISK_GRID, old.disk_bps, new.disk_bps, mask=0x7F))


def from_samples(host: str, samples: Sequence[Sample], thresholds: Thresholds, *,
                 first_seen: float | None = None) -> Record:
    """A record of ``samples`` (sorted by time) with explicit times, on no host's ticks:
    samples stored in the old form, or a window built in memory."""
    rec = new_record(host, samples[0].t if first_seen is None else first_seen, thresholds)
    return extend(rec, ((s._replace(t=millis(s.t) / 1000), NONE) for s in samples))
