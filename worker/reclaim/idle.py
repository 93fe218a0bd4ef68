"""The idle policy: a pure function from an instance's samples to a decision with its reasons.

Rates come from consecutive samples inside the look-back window (one *interval* each). An
interval is evidence only when the guest was running at both ends, its length is positive and
at most ``max_gap``, it has CPU counters, and no counter went backwards; everything else is
skipped and counted by cause. The instance is idle when, over the usable intervals, each metric
is *strictly* under its threshold in at least its quantile of them (GCP's rule: CPU < 3 % per
vCPU for 97 %, rx < 2,000 B/s and tx < 1,000 B/s for 95 %), and there is enough evidence:
at least ``min_samples`` intervals covering at least ``min_span_fraction`` of the window.
Doubt always means *not idle*: reclaiming a busy guest is worse than keeping an idle one.

Speed matters (a fleet of 50,000 instances is decided in one pass), so the arithmetic runs in
C through ``map``/``sorted``/``bisect`` over columns; the per-interval Python loop only runs
for instances whose samples have something to skip.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import add, itemgetter, sub, truediv
from typing import TYPE_CHECKING

from worker.reclaim.sampling import Sample

if TYPE_CHECKING:
    from worker.core.settings import Settings

RUNNING = "running"
_EPS = 1e-9  # tolerance when comparing a count with quantile * count (0.55 * 100 != 55.0)
_FIRST = itemgetter(0)


@dataclass(frozen=True)
class IdlePolicy:
    """Thresholds (strict: a value exactly at its limit is *not* under it) and evidence rules."""

    cpu_percent: float = 3.0  # % of one allocated vCPU (4 vCPUs at 8 % of one CPU each = 8 %)
    cpu_quantile: float = 0.97  # fraction of intervals that must be under cpu_percent
    net_rx_bps: float = 2000.0  # bytes/s received, all interfaces
    net_tx_bps: float = 1000.0  # bytes/s sent
    net_quantile: float = 0.95
    disk_bps: float = 20000.0  # bytes/s read + written, all disks
    disk_quantile: float = 0.95
    min_samples: int = 12  # usable intervals needed before anything is called idle
    window: float = 86400.0  # look-back seconds
    min_span_fraction: float = 0.5  # usable intervals must cover this fraction of the window
    max_gap: float = 900.0  # seconds; a longer interval is a sampling gap, not evidence

    def __post_init__(self) -> None:
        for name in ("cpu_quantile", "net_quantile", "disk_quantile"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.min_span_fraction <= 1.0:
            raise ValueError(f"min_span_fraction must be in [0, 1], got {self.min_span_fraction!r}")
        for name in ("window", "max_gap"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("cpu_percent", "net_rx_bps", "net_tx_bps", "disk_bps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)!r}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples!r}")

    @classmethod
    def from_settings(cls, s: Settings) -> IdlePolicy:
        """The policy configured by ``DORMANT_IDLE_*``; max gap defaults to 3 sample intervals."""
        return cls(
            cpu_percent=float(s.idle_cpu_percent),
            cpu_quantile=float(s.idle_cpu_quantile),
            net_rx_bps=float(s.idle_net_rx_bps),
            net_tx_bps=float(s.idle_net_tx_bps),
            net_quantile=float(s.idle_net_quantile),
            disk_bps=float(s.idle_disk_bps),
            disk_quantile=float(s.idle_disk_quantile),
            min_samples=int(s.idle_min_samples),
            window=float(s.idle_window),
            min_span_fraction=float(s.idle_min_span_fraction),
            max_gap=float(s.idle_max_gap or 3 * s.sample_interval),
        )


@dataclass(frozen=True)
class Decision:
    """Whether an instance is idle, why, and the numbers behind it (JSON-able)."""

    instance: str
    idle: bool
    reason: str
    numbers: dict[str, float | int]

    def as_dict(self) -> dict[str, object]:
        return {"instance": self.instance, "idle": self.idle, "reason": self.reason,
                "numbers": dict(self.numbers)}


@dataclass
class _Evidence:
    """What the window holds: sorted per-interval rates of the usable intervals, and skips."""

    samples: int = 0
    span: float = 0.0
    cpu: list[float] = field(default_factory=list)  # sorted, in units of ``cpu_scale``
    cpu_scale: float = 1.0  # cpu values / cpu_scale = % of allocated vCPUs
    rx: list[float] = field(default_factory=list)  # sorted bytes/s
    tx: list[float] = field(default_factory=list)
    disk: list[float] = field(default_factory=list)  # sorted (read + written) bytes/s
    not_running: int = 0
    gap: int = 0
    reset: int = 0
    no_cpu: int = 0
    same_time: int = 0


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


def _sum(a: Sequence[int], b: Sequence[int]) -> list[int]:
    return list(map(add, a, b))


def _evidence(samples: Sequence[Sample], policy: IdlePolicy, now: float) -> _Evidence:
    start = now - policy.window
    if len(samples) < 2:
        return _Evidence(samples=sum(1 for s in samples if start <= s[0] <= now))
    dts, cols = _window(samples, start, now)
    _, states, cpu, vcpus, rx, tx, rd, wr = cols
    m = len(states)
    if m < 2:
        return _Evidence(samples=m)
    if states.count(RUNNING) < 2:  # shut off or suspended all window: every interval skipped
        return _Evidence(samples=m, not_running=m - 1)
    # Fast path: always running, one vCPU count, steady sampling, no resets, CPU counters.
    if (states.count(RUNNING) == m and vcpus.count(vcpus[0]) == m
            and min(dts) > 0 and max(dts) <= policy.max_gap):
        try:
            cpu_r = _rates(cpu, dts)
        except TypeError:  # a cpu_ns is None
            cpu_r = [-1.0]
        if cpu_r[0] >= 0:
            # Reads and writes are one counter here: a restart resets both together.
            rx_r, tx_r, disk_r = _rates(rx, dts), _rates(tx, dts), _rates(_sum(rd, wr), dts)
            if rx_r[0] >= 0 and tx_r[0] >= 0 and disk_r[0] >= 0:
                return _Evidence(samples=m, span=float(sum(dts)), cpu=cpu_r,
                                 cpu_scale=max(vcpus[0], 1) * 1e7, rx=rx_r, tx=tx_r,
                                 disk=disk_r)
    return _slow_evidence(cols, dts, policy)


def _slow_evidence(cols: tuple, dts: list[float], policy: IdlePolicy) -> _Evidence:
    """Interval by interval, for windows with pauses, gaps, resets or missing counters."""
    ts, states, cpu, vcpus, rx, tx, rd, wr = cols
    ev = _Evidence(samples=len(ts))
    max_gap = policy.max_gap
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


def _rank(n: int, quantile: float) -> int:
    """1-based nearest rank of ``quantile`` among ``n`` sorted values."""
    return min(n, max(1, math.ceil(quantile * n - _EPS)))


def _metric(values: list[float], limit: float, quantile: float, scale: float = 1.0
            ) -> tuple[float, float, bool]:
    """(value at quantile, fraction strictly under limit, passes) of sorted ``values``."""
    n = len(values)
    under = bisect_left(values, limit)  # how many are < limit: at the limit is not under
    at_quantile = values[_rank(n, quantile) - 1] / scale
    return at_quantile, under / n, under >= quantile * n - _EPS


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def decide(instance: str, samples: Sequence[Sample], policy: IdlePolicy, *, now: float
           ) -> Decision:
    """Decide whether ``instance`` is idle from its samples (sorted by ``t``) up to ``now``."""
    ev = _evidence(samples, policy, now)
    n = len(ev.cpu)
    span = ev.span
    needed_span = policy.min_span_fraction * policy.window
    numbers: dict[str, float | int] = {
        "samples": ev.samples,
        "intervals": n,
        "skipped_not_running": ev.not_running,
        "skipped_gap": ev.gap,
        "skipped_reset": ev.reset,
        "skipped_no_cpu": ev.no_cpu,
        "skipped_same_time": ev.same_time,
        "span_s": round(span, 3),
        "span_needed_s": round(needed_span, 3),
    }
    passes = _measure(ev, policy, numbers) if n else None

    if n == 0 and ev.no_cpu:
        return Decision(instance, False, "not idle: the hypervisor reports no CPU time "
                        f"(cpu.time) for this guest ({ev.no_cpu} intervals without it)", numbers)
    if n < policy.min_samples:
        return Decision(instance, False, f"not idle: too few usable intervals ({n} < "
                        f"{policy.min_samples} needed; {_skipped(ev)})", numbers)
    if span < needed_span:
        return Decision(instance, False, f"not idle: observed running span {span:.0f} s is "
                        f"shorter than {needed_span:.0f} s ({_pct(policy.min_span_fraction)} "
                        f"of the {policy.window:.0f} s window; {_skipped(ev)})", numbers)
    assert passes is not None
    failing = [_says(check) for check in passes if not check[0]]
    if failing:
        return Decision(instance, False, "not idle: " + "; ".join(failing), numbers)
    return Decision(instance, True, "idle: " + "; ".join(map(_says, passes))
                    + f" over {n} intervals ({span:.0f} s)", numbers)


def _skipped(ev: _Evidence) -> str:
    parts = [f"{count} {what}" for count, what in (
        (ev.not_running, "not running"), (ev.gap, "sampling gaps"),
        (ev.reset, "counter resets"), (ev.no_cpu, "without CPU time"),
        (ev.same_time, "at the same time"),
    ) if count]
    return f"{ev.samples} samples" + (", skipped " + ", ".join(parts) if parts else "")


_Check = tuple[bool, str, float, float, str, float]  # ok, metric, fraction, limit, unit, q


def _measure(ev: _Evidence, policy: IdlePolicy, numbers: dict[str, float | int]
             ) -> list[_Check]:
    """Fill ``numbers`` with each metric's quantile and fraction under; say which pass."""
    scale = ev.cpu_scale
    cpu = ev.cpu
    cpu_q, cpu_f, cpu_ok = _metric(cpu, policy.cpu_percent * scale, policy.cpu_quantile, scale)
    rx_q, rx_f, rx_ok = _metric(ev.rx, policy.net_rx_bps, policy.net_quantile)
    tx_q, tx_f, tx_ok = _metric(ev.tx, policy.net_tx_bps, policy.net_quantile)
    dk_q, dk_f, dk_ok = _metric(ev.disk, policy.disk_bps, policy.disk_quantile)
    numbers.update(
        cpu_percent_at_quantile=round(cpu_q, 4),
        cpu_percent_max=round(cpu[-1] / scale, 4),
        cpu_fraction_under=round(cpu_f, 4),
        rx_bps_at_quantile=round(rx_q, 3),
        rx_fraction_under=round(rx_f, 4),
        tx_bps_at_quantile=round(tx_q, 3),
        tx_fraction_under=round(tx_f, 4),
        disk_bps_at_quantile=round(dk_q, 3),
        disk_fraction_under=round(dk_f, 4),
    )

    return [
        (cpu_ok, "CPU", cpu_f, policy.cpu_percent, "% per vCPU", policy.cpu_quantile),
        (rx_ok, "rx", rx_f, policy.net_rx_bps, " B/s", policy.net_quantile),
        (tx_ok, "tx", tx_f, policy.net_tx_bps, " B/s", policy.net_quantile),
        (dk_ok, "disk", dk_f, policy.disk_bps, " B/s", policy.disk_quantile),
    ]


def _says(check: _Check) -> str:
    _, name, fraction, limit, unit, quantile = check
    return f"{name} < {limit:g}{unit} in {_pct(fraction)} of intervals (needs {_pct(quantile)})"
