"""The view of one instance's stored samples that the idle rule reads.

:func:`view` turns a stored :class:`~worker.reclaim.activity.Record` and its host's sample
times into an :class:`Activity`: the samples' times (seconds, as the raw samples had them) and
one code per sample per metric. When a guest's rows are consecutive samples of its host, the
view keeps a reference to the host's times, so the lengths of the intervals and what the idle
rule asks of them (:class:`Intervals`) are worked out once per host, not once per guest.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from operator import sub

from worker.reclaim.activity import DISK_ONLY, Record, Sample, Times, row_codes
from worker.reclaim.quantise import NO_CPU, NOT_RUNNING, Thresholds, coder


@dataclass(frozen=True)
class Intervals:
    """The lengths of the intervals between consecutive times, and what the idle rule asks of
    them (one byte per interval, 0 or 1, as a little-endian integer: C-speed bit sets)."""

    dts: list[float]
    shortest: float
    longest: float
    total: float  # summed in order, as the raw-sample path does
    same_time: int  # dt <= 0
    gap: int  # dt > max_gap

    @classmethod
    def of(cls, times: Sequence[float], max_gap: float) -> Intervals:
        dts = list(map(sub, times[1:], times))
        return cls(dts, min(dts), max(dts), float(sum(dts)),
                   int.from_bytes(bytes(dt <= 0 for dt in dts), "little"),
                   int.from_bytes(bytes(dt > max_gap for dt in dts), "little"))




def intervals(times: Times, a: int, b: int, max_gap: float) -> Intervals:
    """The intervals between a host's times ``a`` .. ``b - 1``, worked out once per host for
    all its guests, which share their sample times."""
    key = ("intervals", a, b, max_gap)
    found = times.cache.get(key)
    if not isinstance(found, Intervals):
        found = times.cache[key] = Intervals.of(times.seconds[a:b], max_gap)
    return found


@dataclass(frozen=True)
class Activity:
    """One instance's stored samples with their times: what :func:`worker.reclaim.idle.decide`
    reads. ``times`` (seconds) is non-decreasing; the columns hold one code per sample, the
    one for the interval ending there (the first sample's interval is never used)."""

    times: Sequence[float]
    cpu: bytes
    rx: bytes
    tx: bytes
    disk: bytes  # without the explicit-time bit
    thresholds: Thresholds
    first_seen: float | None = None
    last: Sample | None = None  # the newest sample's counters: where the next interval starts
    # When the rows are consecutive ticks of one host: those ticks and the first row's index
    # (interval lengths are then worked out once per host, not once per guest).
    ticks: Times | None = field(default=None, compare=False, repr=False)
    offset: int = 0

    def __len__(self) -> int:
        return len(self.times)

    def running(self) -> Iterator[bool]:
        """Whether the guest ran at each sample."""
        return (c != NOT_RUNNING for c in self.cpu)

    def has_cpu_time(self) -> bool:
        """Whether no interval lacked CPU time (libvirt's test driver has none)."""
        return NO_CPU not in self.cpu

    def since(self, t: float) -> Activity:
        cut = bisect_left(self.times, t)
        if cut == 0:
            return self
        return replace(self, times=self.times[cut:], cpu=self.cpu[cut:], rx=self.rx[cut:],
                       tx=self.tx[cut:], disk=self.disk[cut:], offset=self.offset + cut)

    def extended(self, sample: Sample) -> Activity:
        """With one more sample (a fresh reading, not stored) at its exact time."""
        cpu, rx, tx, disk = row_codes(self.last, sample, coder(self.thresholds))
        return replace(self, times=[*self.times, sample.t], cpu=self.cpu + bytes((cpu,)),
                       rx=self.rx + bytes((rx,)), tx=self.tx + bytes((tx,)),
                       disk=self.disk + bytes((disk,)), last=sample, ticks=None)


EMPTY = Activity((), b"", b"", b"", b"", Thresholds())


def view(rec: Record, ticks: Times) -> Activity:
    """The rows of ``rec`` whose time ``ticks`` (or the record itself) still knows."""
    n = len(rec)
    shared: Times | None = None
    if not rec.explicit:
        i0 = rec.first_seq - ticks.first_seq
        lo, hi = max(0, -i0), min(n, len(ticks.ms) - i0)
        times: Sequence[float] = ticks.seconds[i0 + lo:i0 + hi] if hi > lo else []
        shared = ticks
    else:
        stamps = rec.stamps(ticks)
        lo = 0
        while lo < n and stamps[lo] is None:
            lo += 1
        hi = lo
        while hi < n and stamps[hi] is not None:
            hi += 1
        times = [t / 1000 for t in stamps[lo:hi]]  # type: ignore[operator]
    if hi <= lo:
        return replace(EMPTY, thresholds=rec.thresholds, first_seen=rec.first_seen)
    return Activity(times, rec.cpu[lo:hi], rec.rx[lo:hi], rec.tx[lo:hi],
                    rec.disk[lo:hi].translate(DISK_ONLY), rec.thresholds, rec.first_seen,
                    rec.last if hi == n else None, shared,
                    rec.first_seq - ticks.first_seq + lo if shared else 0)
