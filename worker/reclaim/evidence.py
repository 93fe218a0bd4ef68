"""What a window of samples says, interval by interval: the evidence the idle rule weighs.

An *interval* between two consecutive samples in ``[start, now]`` is evidence only when the
guest was running at both ends, its length is positive and at most ``max_gap``, it has CPU
counters and no counter went backwards; everything else is skipped and counted by cause, in
that order of precedence. What remains are per-interval rates, and all the rule asks of them
is a metric's share of intervals under a limit and its value at a quantile.

Two sources give the same answers. :func:`from_samples` works on raw cumulative counters
(sorted float rates). :func:`from_activity` works on what is stored
(:mod:`worker.reclaim.activity`): one code per interval whose bucket bounds sit on the
thresholds, so counting codes under the threshold's code is the exact count of rates under it
-- done with ``bytes.translate`` in C, without building or sorting any list; the value at the
quantile is the bucket's representative. Both keep their C fast path for windows with nothing
to skip; the per-interval Python loop only runs for windows that have pauses, gaps or resets.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from itertools import compress
from operator import add, itemgetter, sub, truediv

from worker.reclaim.activity import Sample
from worker.reclaim.quantise import (
    GRIDS,
    NO_CPU,
    NOT_RUNNING,
    RESET,
    SPECIAL,
    Thresholds,
    representatives,
    same_limit,
)
from worker.reclaim.window import Activity, Intervals, intervals

RUNNING = "running"
EPS = 1e-9  # tolerance when comparing a count with quantile * count (0.55 * 100 != 55.0)
_FIRST = itemgetter(0)
METRICS = ("cpu", "rx", "tx", "disk")
_BELOW = [bytes(range(k)) for k in range(257)]  # translate(None, _BELOW[k]) drops codes < k


def rank(n: int, quantile: float) -> int:
    """1-based nearest rank of ``quantile`` among ``n`` sorted values."""
    return min(n, max(1, math.ceil(quantile * n - EPS)))


def _sorted_metric(values: list[float], limit: float, quantile: float, scale: float = 1.0
                   ) -> tuple[float, float, bool]:
    n = len(values)
    under = bisect_left(values, limit)  # how many are < limit: at the limit is not under
    return values[rank(n, quantile) - 1] / scale, under / n, under >= quantile * n - EPS


@dataclass
class Evidence:
    """Counts of skipped intervals, the usable span, and the usable intervals' rates."""

    samples: int = 0
    span: float = 0.0
    not_running: int = 0
    gap: int = 0
    reset: int = 0
    no_cpu: int = 0
    same_time: int = 0

    @property
    def intervals(self) -> int:
        return 0

    def metric(self, name: str, limit: float, quantile: float) -> tuple[float, float, bool]:
        """(value at ``quantile``, fraction strictly under ``limit``, whether that fraction
        reaches ``quantile``) of metric ``name`` (cpu in % per vCPU, the others in B/s)."""
        raise NotImplementedError

    def highest(self, name: str) -> float:
        raise NotImplementedError


@dataclass
class RawEvidence(Evidence):
    """From raw samples: sorted rates of the usable intervals."""

    cpu: list[float] = field(default_factory=list)  # sorted, in units of ``cpu_scale``
    cpu_scale: float = 1.0  # cpu values / cpu_scale = % of allocated vCPUs
    rx: list[float] = field(default_factory=list)  # sorted bytes/s
    tx: list[float] = field(default_factory=list)
    disk: list[float] = field(default_factory=list)  # sorted (read + written) bytes/s

    @property
    def intervals(self) -> int:
        return len(self.cpu)

    def metric(self, name: str, limit: float, quantile: float) -> tuple[float, float, bool]:
        if name == "cpu":
            return _sorted_metric(self.cpu, limit * self.cpu_scale, quantile, self.cpu_scale)
        return _sorted_metric(getattr(self, name), limit, quantile)

    def highest(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return values[-1] / (self.cpu_scale if name == "cpu" else 1.0)


@dataclass
class StoredEvidence(Evidence):
    """From stored rows: the codes of the usable intervals, one bytes column per metric."""

    codes: dict[str, bytes] = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)

    @property
    def intervals(self) -> int:
        return len(self.codes.get("cpu", b""))

    def _limit(self, name: str) -> float:
        th = self.thresholds
        return {"cpu": th.cpu_percent, "rx": th.rx_bps, "tx": th.tx_bps,
                "disk": th.disk_bps}[name]

    def metric(self, name: str, limit: float, quantile: float) -> tuple[float, float, bool]:
        codes, grid, stored = self.codes[name], GRIDS[name], self._limit(name)
        reps = representatives(grid, stored)
        if not same_limit(limit, stored):
            # Codes made for another threshold: compare their values (approximate).
            return _sorted_metric(sorted(map(reps.__getitem__, codes)), limit, quantile)
        n = len(codes)
        under = n - len(codes.translate(None, _BELOW[grid.limit_code]))
        at = reps[_kth_largest(codes, n - rank(n, quantile) + 1)]
        return at, under / n, under >= quantile * n - EPS

    def highest(self, name: str) -> float:
        return representatives(GRIDS[name], self._limit(name))[max(self.codes[name])]


def _kth_largest(codes: bytes, k: int) -> int:
    """The ``k``-th largest code (1 = the largest): the highest code with at least ``k``
    codes at or above it, found by bisecting the 256 possible codes; each count is one
    ``translate`` in C (it drops the codes below), so no list is built or sorted."""
    lo, hi = 0, 255  # count(>= lo) >= k always holds; find the highest such lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(codes.translate(None, _BELOW[mid])) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- from raw samples ---------------------------------------------------------------------------
def _window(samples: Sequence[Sample], start: float, now: float) -> tuple[list[float], tuple]:
    """Interval lengths and the columns (t, state, cpu, vcpus, rx, tx, rd, wr) of the samples
    with ``start <= t <= now``, sorted by t."""
    cols = tuple(zip(*samples, strict=False))
    ts = cols[0]
    dts = list(map(sub, ts[1:], ts))
    if min(dts) < 0:  # not sorted by time: sort once
        cols = tuple(zip(*sorted(samples, key=_FIRST), strict=False))
        ts = cols[0]
        dts = list(map(sub, ts[1:], ts))
    if ts[0] < start or ts[-1] > now:
        lo, hi = bisect_left(ts, start), bisect_right(ts, now)
        cols = tuple(c[lo:hi] for c in cols)
        dts = dts[lo:max(lo, hi - 1)]
    return dts, cols


def _rates(counter: Sequence[int], dts: Sequence[float]) -> list[float]:
    """Sorted per-interval rates of a cumulative counter."""
    return sorted(map(truediv, map(sub, counter[1:], counter), dts))


def from_samples(samples: Sequence[Sample], *, start: float, now: float, max_gap: float
                 ) -> RawEvidence:
    """The evidence of raw samples (any order) in ``[start, now]``."""
    if len(samples) < 2:
        return RawEvidence(samples=sum(1 for s in samples if start <= s[0] <= now))
    dts, cols = _window(samples, start, now)
    _, states, cpu, vcpus, rx, tx, rd, wr = cols
    m = len(states)
    if m < 2:
        return RawEvidence(samples=m)
    if states.count(RUNNING) < 2:  # shut off or suspended all window: every interval skipped
        return RawEvidence(samples=m, not_running=m - 1)
    # Fast path: always running, one vCPU count, steady sampling, no resets, CPU counters.
    if (states.count(RUNNING) == m and vcpus.count(vcpus[0]) == m
            and min(dts) > 0 and max(dts) <= max_gap):
        try:
            cpu_r = _rates(cpu, dts)
        except TypeError:  # a cpu_ns is None
            cpu_r = [-1.0]
        if cpu_r[0] >= 0:
            # Reads and writes are one counter here: a restart resets both together.
            rx_r, tx_r = _rates(rx, dts), _rates(tx, dts)
            disk_r = _rates(list(map(add, rd, wr)), dts)
            if rx_r[0] >= 0 and tx_r[0] >= 0 and disk_r[0] >= 0:
                return RawEvidence(samples=m, span=float(sum(dts)), cpu=cpu_r,
                                   cpu_scale=max(vcpus[0], 1) * 1e7, rx=rx_r, tx=tx_r,
                                   disk=disk_r)
    return _interval_by_interval(cols, dts, max_gap)


def _interval_by_interval(cols: tuple, dts: list[float], max_gap: float) -> RawEvidence:
    """For windows with pauses, gaps, resets or missing counters."""
    ts, states, cpu, vcpus, rx, tx, rd, wr = cols
    ev = RawEvidence(samples=len(ts))
    span = 0.0
    for i, dt in enumerate(dts):
        j = i + 1
        if states[i] != RUNNING or states[j] != RUNNING:
            ev.not_running += 1
        elif dt <= 0:
            ev.same_time += 1
        elif dt > max_gap:
            ev.gap += 1
        elif cpu[i] is None or cpu[j] is None:
            ev.no_cpu += 1
        else:
            dc, dr, dx = cpu[j] - cpu[i], rx[j] - rx[i], tx[j] - tx[i]
            dd = rd[j] + wr[j] - rd[i] - wr[i]  # reads + writes, one counter as on the fast path
            if dc < 0 or dr < 0 or dx < 0 or dd < 0:
                ev.reset += 1
                continue
            span += dt
            # % of the vCPUs allocated at both ends (the fewer: never flatter a hot-plug)
            ev.cpu.append(dc / (dt * max(min(vcpus[i], vcpus[j]), 1) * 1e7))
            ev.rx.append(dr / dt)
            ev.tx.append(dx / dt)
            ev.disk.append(dd / dt)
    ev.span = span
    for values in (ev.cpu, ev.rx, ev.tx, ev.disk):
        values.sort()
    return ev


# -- from stored rows ---------------------------------------------------------------------------
def from_activity(act: Activity, *, start: float, now: float, max_gap: float) -> StoredEvidence:
    """The same evidence from stored rows: intervals classified from the times and the CPU
    column's explanations, rates as their codes."""
    ts = act.times
    lo, hi = bisect_left(ts, start), bisect_right(ts, now)
    m = hi - lo
    if m < 2:
        return StoredEvidence(samples=m, thresholds=act.thresholds)
    cols = [col[lo:hi] for col in (act.cpu, act.rx, act.tx, act.disk)]
    if act.ticks is not None:
        spans = intervals(act.ticks, act.offset + lo, act.offset + hi, max_gap)
    else:
        spans = Intervals.of(ts[lo:hi], max_gap)
    if not cols[0].translate(None, _BELOW[SPECIAL]) and not spans.same_time | spans.gap:
        return StoredEvidence(samples=m, span=spans.total, thresholds=act.thresholds,  # no skips
                              codes={n: c[1:] for n, c in zip(METRICS, cols, strict=True)})
    return _skipping(m, cols, spans, act.thresholds)


def _flags(codes: bytes, table: bytes) -> int:
    """A bit-set (one byte per position, 0 or 1) of the positions ``table`` maps to 1."""
    return int.from_bytes(codes.translate(table), "little")


def _table(*codes: int) -> bytes:
    return bytes(1 if c in codes else 0 for c in range(256))


_IS_NOT_RUNNING, _IS_NO_CPU, _IS_RESET = _table(NOT_RUNNING), _table(NO_CPU), _table(RESET)


def _skipping(m: int, cols: list[bytes], spans: Intervals, thresholds: Thresholds
              ) -> StoredEvidence:
    """Windows with something to skip, classified in C: each cause is a bit set with one
    byte per interval (0 or 1), combined with the precedence of :func:`from_samples`
    (not running, same time, gap, no CPU time, reset)."""
    cpu = cols[0]
    ends = _flags(cpu, _IS_NOT_RUNNING)
    not_running = (ends | (ends >> 8)) & ((1 << 8 * (m - 1)) - 1)  # either end of interval k
    same = spans.same_time & ~not_running
    gap = spans.gap & ~not_running & ~same
    seen = not_running | same | gap
    no_cpu = _flags(cpu[1:], _IS_NO_CPU) & ~seen
    reset = _flags(cpu[1:], _IS_RESET) & ~seen & ~no_cpu
    skipped = seen | no_cpu | reset
    usable = (~skipped & int.from_bytes(b"\x01" * (m - 1), "little")).to_bytes(m - 1, "little")
    return StoredEvidence(
        samples=m, span=reduce(add, compress(spans.dts, usable), 0.0), thresholds=thresholds,
        not_running=not_running.bit_count(), same_time=same.bit_count(),
        gap=gap.bit_count(), no_cpu=no_cpu.bit_count(), reset=reset.bit_count(),
        codes={n: bytes(compress(c[1:], usable)) for n, c in zip(METRICS, cols, strict=True)})


def gather(samples: Sequence[Sample] | Activity, *, start: float, now: float, max_gap: float
           ) -> Evidence:
    """The evidence of raw samples or of stored activity."""
    if isinstance(samples, Activity):
        return from_activity(samples, start=start, now=now, max_gap=max_gap)
    return from_samples(samples, start=start, now=now, max_gap=max_gap)
