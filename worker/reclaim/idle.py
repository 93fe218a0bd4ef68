"""The idle policy: a pure function from an instance's samples to a decision with its reasons.

Rates come from consecutive samples inside the look-back window (one *interval* each). An
interval is evidence only when the guest was running at both ends, its length is positive and
at most ``max_gap``, it has CPU counters, and no counter went backwards; everything else is
skipped and counted by cause. The instance is idle when, over the usable intervals, each metric
is *strictly* under its threshold in at least its quantile of them (GCP's rule: CPU < 3 % per
vCPU for 97 %, rx < 2,000 B/s and tx < 1,000 B/s for 95 %), and there is enough evidence:
at least ``min_samples`` intervals covering at least ``min_span_fraction`` of the window.
Doubt always means *not idle*: reclaiming a busy guest is worse than keeping an idle one.

It reads either raw samples or what is stored (:class:`~worker.reclaim.activity.Activity`:
per-interval rate codes whose bounds sit exactly on the thresholds): the verdict, the counts,
the span and every number the reasons print are the same for both; the values at the
quantiles become their bucket's middle (worker/reclaim/quantise.py).

What the window holds, interval by interval, is worked out in worker/reclaim/evidence.py
(fast: a fleet of 50,000 instances is decided in one pass); this module weighs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.reclaim.activity import Sample
from worker.reclaim.evidence import Evidence, gather
from worker.reclaim.window import Activity

if TYPE_CHECKING:
    from worker.core.settings import Settings


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


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def decide(instance: str, samples: Sequence[Sample] | Activity, policy: IdlePolicy, *,
           now: float) -> Decision:
    """Decide whether ``instance`` is idle from its samples (sorted by ``t``) up to ``now``,
    raw or as stored."""
    ev = gather(samples, start=now - policy.window, now=now, max_gap=policy.max_gap)
    n = ev.intervals
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


def _skipped(ev: Evidence) -> str:
    parts = [f"{count} {what}" for count, what in (
        (ev.not_running, "not running"), (ev.gap, "sampling gaps"),
        (ev.reset, "counter resets"), (ev.no_cpu, "without CPU time"),
        (ev.same_time, "at the same time"),
    ) if count]
    return f"{ev.samples} samples" + (", skipped " + ", ".join(parts) if parts else "")


_Check = tuple[bool, str, float, float, str, float]  # ok, metric, fraction, limit, unit, q


def _measure(ev: Evidence, policy: IdlePolicy, numbers: dict[str, float | int]
             ) -> list[_Check]:
    """Fill ``numbers`` with each metric's quantile and fraction under; say which pass."""
    cpu_q, cpu_f, cpu_ok = ev.metric("cpu", policy.cpu_percent, policy.cpu_quantile)
    rx_q, rx_f, rx_ok = ev.metric("rx", policy.net_rx_bps, policy.net_quantile)
    tx_q, tx_f, tx_ok = ev.metric("tx", policy.net_tx_bps, policy.net_quantile)
    dk_q, dk_f, dk_ok = ev.metric("disk", policy.disk_bps, policy.disk_quantile)
    numbers.update(
        cpu_percent_at_quantile=round(cpu_q, 4),
        cpu_percent_max=round(ev.highest("cpu"), 4),
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
