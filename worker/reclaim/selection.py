"""Reclamation selection and safety: plain functions over plain data.

``select`` turns idle decisions plus the safety facts (exemptions, age, kill switch, grace
marks) into a :class:`Plan` with one verdict and reason per instance; ``recheck`` decides, just
before a suspend, whether fresh activity or a changed state must stop it. Nothing here touches
Redis, libvirt or Celery, so every rule is tested with plain data (tests/unit/test_reclaim.py).

Doubt means *keep*: an instance is only suspended when it is running, idle over the window,
not exempt, old enough, not known to be unsavable, reclamation is enabled and (with grace) it
was marked on an earlier run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from worker.core.states import State
from worker.core.validation import MAX_REQUEST_ID
from worker.reclaim.activity import Sample
from worker.reclaim.idle import Decision, IdlePolicy, decide
from worker.reclaim.window import Activity

# dormant's element in a domain's <metadata>:
#   <dormant:policy xmlns:dormant="https://dormant.dev/xmlns/1" exempt="true"/>
NAMESPACE = "https://dormant.dev/xmlns/1"
_TRUE = {"1", "true", "yes", "on"}


class Verdict(StrEnum):
    """What a run does with one instance; readable in redis-cli and reports."""

    SUSPEND = "suspend"  # idle and every safety check passed
    MARK = "mark"  # grace: idle, marked now (or still within its grace period)
    KEEP = "keep"  # not idle
    EXEMPT = "exempt"  # opted out (domain metadata or `dormant exempt`)
    TOO_YOUNG = "too_young"  # observed for less than the minimum age
    NOT_RUNNING = "not_running"  # paused, suspended, shut off...: nothing to reclaim
    DISABLED = "disabled"  # idle, but the kill switch is on
    CANNOT_SAVE = "cannot_save"  # idle, but libvirt refused to save it (reclaim/unsavable.py)


@dataclass(frozen=True)
class Mark:
    """A grace mark: the run that set it and when."""

    run_id: str
    at: float


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One instance as a run sees it."""

    uuid: str
    name: str
    state: str  # a worker.core.states.State value, as samples carry it
    decision: Decision
    exempt_metadata: bool = False
    exempt_cli: bool = False
    first_seen: float | None = None
    mark: Mark | None = None
    unsavable: str = ""  # libvirt's reason when it refused to save this very definition


@dataclass(frozen=True, kw_only=True)
class Safety:
    """The run-wide safety settings."""

    min_age: float = 86400.0  # seconds an instance must have been observed
    disabled_reason: str = ""  # non-empty: the kill switch is on, and why
    grace: bool = False
    grace_period: float = 43200.0  # seconds from a mark to the earliest suspend


@dataclass(frozen=True)
class Entry:
    """The verdict on one instance, with the reason and the numbers behind it."""

    instance: str
    name: str
    verdict: Verdict
    reason: str
    idle: bool
    numbers: dict[str, Any] = field(default_factory=dict)
    unmark: bool = False  # a grace mark to remove (the instance is no longer idle)

    def as_dict(self) -> dict[str, Any]:
        return {"instance": self.instance, "name": self.name, "verdict": str(self.verdict),
                "reason": self.reason, "idle": self.idle, "numbers": dict(self.numbers),
                "unmark": self.unmark}


@dataclass(frozen=True)
class Plan:
    """Every entry of a run, in the order the candidates came."""

    entries: tuple[Entry, ...]

    def with_verdict(self, verdict: Verdict) -> list[Entry]:
        return [e for e in self.entries if e.verdict is verdict]

    @property
    def to_suspend(self) -> list[Entry]:
        return self.with_verdict(Verdict.SUSPEND)

    @property
    def to_unmark(self) -> list[Entry]:
        return [e for e in self.entries if e.unmark]

    def counts(self) -> dict[str, int]:
        return dict(Counter(str(e.verdict) for e in self.entries))


def _age(first_seen: float | None, now: float) -> float | None:
    return None if first_seen is None else now - first_seen


def _judge(c: Candidate, safety: Safety, *, now: float, run_id: str) -> Entry:
    d = c.decision
    numbers = dict(d.numbers)
    age = _age(c.first_seen, now)
    if age is not None:
        numbers["age_s"] = round(age, 3)

    def entry(verdict: Verdict, reason: str, *, unmark: bool = False) -> Entry:
        return Entry(c.uuid, c.name, verdict, reason, d.idle, numbers, unmark)

    if c.state != State.RUNNING:
        return entry(Verdict.NOT_RUNNING, f"not running ({c.state}): nothing to reclaim")
    if c.exempt_metadata or c.exempt_cli:
        where = " and ".join(w for w, on in (("domain metadata", c.exempt_metadata),
                                             ("dormant exempt", c.exempt_cli)) if on)
        return entry(Verdict.EXEMPT, f"exempt by {where}", unmark=c.mark is not None)
    if not d.idle:
        suffix = "; grace mark removed" if c.mark is not None else ""
        return entry(Verdict.KEEP, d.reason + suffix, unmark=c.mark is not None)
    if age is None or age < safety.min_age:
        seen = "never observed" if age is None else f"observed for {age:.0f} s"
        return entry(Verdict.TOO_YOUNG, f"{d.reason}; but {seen}, minimum age is "
                     f"{safety.min_age:g} s")
    if c.unsavable:
        return entry(Verdict.CANNOT_SAVE, f"{d.reason}; but libvirt cannot save it: "
                     f"{c.unsavable} (not tried again until its definition changes)")
    if safety.disabled_reason:
        return entry(Verdict.DISABLED, f"{d.reason}; not suspended: {safety.disabled_reason}")
    if safety.grace:
        if c.mark is None:
            return entry(Verdict.MARK, f"{d.reason}; marked, suspended on a later run "
                         f"after {safety.grace_period:g} s if still idle")
        waited = now - c.mark.at
        if c.mark.run_id == run_id or waited < safety.grace_period:
            return entry(Verdict.MARK, f"{d.reason}; marked {waited:.0f} s ago by "
                         f"{c.mark.run_id}, grace period is {safety.grace_period:g} s")
        return entry(Verdict.SUSPEND, f"{d.reason}; marked {waited:.0f} s ago and still idle")
    return entry(Verdict.SUSPEND, d.reason)


def select(candidates: Iterable[Candidate], safety: Safety, *, now: float,
           run_id: str) -> Plan:
    """The verdict on every candidate (pure: the caller acts on the plan)."""
    return Plan(tuple(_judge(c, safety, now=now, run_id=run_id) for c in candidates))


def metadata_exempt(xml: str | None) -> bool:
    """Whether dormant's metadata element says ``exempt="true"``; malformed XML is not exempt
    silently: it raises ValueError so the caller can keep the instance and say why."""
    if not xml:
        return False
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"unreadable dormant metadata: {exc}") from None
    return str(root.get("exempt", "")).strip().lower() in _TRUE


def metadata_element(*, exempt: bool) -> str:
    """The element to put in a domain's ``<metadata>`` (what ``virsh metadata`` sets)."""
    return (f'<dormant:policy xmlns:dormant="{NAMESPACE}" '
            f'exempt="{"true" if exempt else "false"}"/>')


def in_scope(name: str, scope: str) -> bool:
    """Whether reclaim/drain may touch a domain name (``scope`` is a glob; empty = all)."""
    return not scope or fnmatch.fnmatchcase(name, scope)


@dataclass(frozen=True)
class Recheck:
    """The last check before a suspend: go ahead or not, why, and the fresh numbers."""

    ok: bool
    reason: str
    numbers: dict[str, Any]


def activity(before: Sample, after: Sample) -> dict[str, float] | None:
    """Rates between two samples; None when they cannot be compared (not both running,
    no CPU counters, no time passed, or a counter went backwards: a restart)."""
    dt = after.t - before.t
    if (dt <= 0 or before.state != State.RUNNING or after.state != State.RUNNING
            or before.cpu_ns is None or after.cpu_ns is None):
        return None
    deltas = (after.cpu_ns - before.cpu_ns, after.rx - before.rx, after.tx - before.tx,
              (after.rd - before.rd) + (after.wr - before.wr))
    if min(deltas) < 0:
        return None
    vcpus = max(min(before.vcpus, after.vcpus), 1)
    return {"seconds": round(dt, 3),
            "cpu_percent": deltas[0] / dt / 1e7 / vcpus,
            "rx_bps": deltas[1] / dt, "tx_bps": deltas[2] / dt, "disk_bps": deltas[3] / dt}


def recheck(instance: str, *, state: str, exempt: str, disabled_reason: str,
            stored: Sequence[Sample] | Activity, before: Sample | None, after: Sample | None,
            policy: IdlePolicy) -> Recheck:
    """Still running, still not exempt, reclamation still on, still idle over the window
    including the fresh sample, and no activity at or above a threshold right now."""
    if disabled_reason:
        return Recheck(False, f"not suspended: {disabled_reason}", {})
    if state != State.RUNNING:
        return Recheck(False, f"not suspended: no longer running ({state})", {})
    if exempt:
        return Recheck(False, f"not suspended: exempt by {exempt}", {})
    if before is None or after is None:
        return Recheck(False, "not suspended: no fresh sample", {})
    rates = activity(before, after)
    if rates is None:
        return Recheck(False, "not suspended: fresh activity could not be measured "
                       "(restarted or not running during the re-check)", {})
    numbers = {f"recheck_{k}": round(v, 4) for k, v in rates.items()}
    busy = [f"{label} {rates[key]:.4g}{unit} >= {limit:g}{unit}"
            for key, label, unit, limit in (
                ("cpu_percent", "CPU", "% per vCPU", policy.cpu_percent),
                ("rx_bps", "rx", " B/s", policy.net_rx_bps),
                ("tx_bps", "tx", " B/s", policy.net_tx_bps),
                ("disk_bps", "disk", " B/s", policy.disk_bps))
            if rates[key] >= limit]
    if busy:
        return Recheck(False, "not suspended: busy at the re-check (" + "; ".join(busy)
                       + f" over {rates['seconds']:g} s)", numbers)
    window = (stored.extended(after) if isinstance(stored, Activity)
              else sorted([*stored, after], key=lambda s: s.t))
    d = decide(instance, window, policy, now=after.t)
    numbers.update(d.numbers)
    if not d.idle:
        return Recheck(False, f"not suspended: no longer idle ({d.reason})", numbers)
    return Recheck(True, "still idle at the re-check", numbers)


def request_id(run_id: str, action: str, instance: str) -> str:
    """The request id of one action of one run: a second trigger of the run adds nothing.
    Too long for the transition contract's MAX_REQUEST_ID characters: the run id is hashed."""
    rid = f"{action}:{run_id}:{instance}"
    if len(rid) <= MAX_REQUEST_ID:
        return rid
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:24]
    return f"{action}:{digest}:{instance}"[:MAX_REQUEST_ID]
