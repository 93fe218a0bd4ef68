"""Prometheus metrics: what an operator asks first, cheap enough for the hot path.

One registry per process. ``serve`` exposes it over HTTP when ``DORMANT_METRICS_PORT`` is set;
the worker does that on start-up. Tasks must run in the process that serves the metrics, so a
worker with metrics runs ``--pool threads`` (or ``solo``): with ``prefork`` the transition
counters would stay in the pool's child processes (the worker logs a warning). Threads suit
dormant anyway: tasks wait on libvirtd, not on the CPU.

Per-run reclamation numbers are ``increase(...)`` over the run's window: the nightly run is
the only writer of the reclamation counters, and ``dormant_reclaim_last_run_timestamp_seconds``
says when it finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("dormant.metrics")

TRANSITIONS = Counter(
    "dormant_transitions_total", "Finished transitions by action and outcome",
    ["action", "outcome"],
)
TRANSITION_SECONDS = Histogram(
    "dormant_transition_seconds", "Time from receipt to recorded result, by action",
    ["action"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
RETRIES = Counter(
    "dormant_transition_retries_total", "Transition attempts retried, by error class",
    ["action", "error"],
)
LOCK_WAIT_SECONDS = Histogram(
    "dormant_lock_wait_seconds", "Time spent waiting for a per-instance lock",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60),
)
INSTANCES = Gauge(
    "dormant_instances", "Instances by observed state on this worker's host", ["host", "state"],
)
RECLAIM_DECISIONS = Counter(
    "dormant_reclaim_decisions_total", "Reclamation decisions by verdict", ["host", "decision"],
)
RECLAIM_RESULTS = Counter(
    "dormant_reclaim_results_total", "Reclamation actions by result", ["host", "result"],
)
RECLAIM_RUNS = Counter("dormant_reclaim_runs_total", "Reclamation runs finished")
RECLAIM_RUN_SECONDS = Histogram(
    "dormant_reclaim_run_seconds", "Duration of one reclamation run",
    buckets=(1, 5, 15, 60, 300, 900, 3600),
)
RECLAIM_LAST_RUN = Gauge(
    "dormant_reclaim_last_run_timestamp_seconds", "When the last reclamation run finished",
)
EXTERNAL_CHANGES = Counter(
    "dormant_external_changes_total",
    "State changes made outside dormant (journaled as external), by how they were noticed "
    "(event or reconciliation) and libvirt's event", ["host", "source", "event"],
)
EVENT_STREAM = Gauge(
    "dormant_event_stream_connected",
    "1 while this worker's libvirt lifecycle-event subscription is connected", ["host"],
)

STATE_STORE_FULL = Counter(
    "dormant_state_store_full_total",
    "Writes the state Redis refused at maxmemory (OOM, noeviction); retried, nothing half-done",
)
ROOM_REFUSED = Counter(
    "dormant_room_refused_total",
    "Saves or restores refused for want of room on the host (disk: the save directory's "
    "filesystem, memory: available host memory)", ["host", "resource"],
)

LIBVIRT_ABANDONED = Counter(
    "dormant_libvirt_calls_abandoned_total",
    "libvirt calls given up on past their deadline (their connection was retired)",
)


LIBVIRT_IN_FLIGHT = Gauge(
    "dormant_libvirt_calls_in_flight", "libvirt calls this process is waiting for now",
)
LIBVIRT_OLDEST_CALL = Gauge(
    "dormant_libvirt_oldest_call_seconds",
    "Age of the oldest libvirt call in flight (0 when none): a hung libvirtd makes it grow",
)


def watch_libvirt_calls(read: Callable[[], tuple[int, float]]) -> None:
    """Report ``read()`` -- (calls in flight, age of the oldest) -- at scrape time, never on
    the hot path. worker/hypervisor/host.py hands in its counter, so metrics need not import it."""
    LIBVIRT_IN_FLIGHT.set_function(lambda: read()[0])
    LIBVIRT_OLDEST_CALL.set_function(lambda: read()[1])

# Outcomes whose duration means something (a duplicate or a rejection did no work).
_TIMED_OUTCOMES = frozenset({"changed", "already", "failed"})
_seen_states: dict[str, set[str]] = {}
_seen_lock = threading.Lock()


def transition_finished(action: str, outcome: str, seconds: float) -> None:
    TRANSITIONS.labels(action, outcome).inc()
    if outcome in _TIMED_OUTCOMES:
        TRANSITION_SECONDS.labels(action).observe(seconds)


def transition_retried(action: str, error: str) -> None:
    """``error`` is dormant's error class name, e.g. ``HypervisorUnavailable``."""
    RETRIES.labels(action, error).inc()


def libvirt_call_abandoned() -> None:
    LIBVIRT_ABANDONED.inc()


def state_store_full() -> None:
    """One write the state Redis refused at maxmemory."""
    STATE_STORE_FULL.inc()


def room_refused(host: str, resource: str) -> None:
    """A save (``disk``) or restore (``memory``) refused: the host had no room for it."""
    ROOM_REFUSED.labels(host, resource).inc()


def lock_waited(seconds: float) -> None:
    LOCK_WAIT_SECONDS.observe(seconds)


def instances_observed(host: str, counts: Mapping[str, int]) -> None:
    """Set the per-state gauge; a state no instance is in any more drops to 0, not stale."""
    with _seen_lock:
        seen = _seen_states.setdefault(host, set())
        for state in seen - set(counts):
            INSTANCES.labels(host, state).set(0)
        seen.update(counts)
    for state, count in counts.items():
        INSTANCES.labels(host, state).set(count)


def external_change(host: str, source: str, event: str) -> None:
    """One external change journaled (``source``: ``event`` or ``reconciliation``)."""
    EXTERNAL_CHANGES.labels(host, source, event).inc()


def event_stream(host: str, connected: bool) -> None:
    EVENT_STREAM.labels(host).set(1 if connected else 0)


def reclaim_decided(host: str, decision: str) -> None:
    """One reclamation verdict for one instance (e.g. ``idle``, ``busy``, ``exempt``)."""
    RECLAIM_DECISIONS.labels(host, decision).inc()


def reclaim_result(host: str, result: str) -> None:
    """What acting on a decision did (e.g. ``suspended``, ``failed``, ``skipped``)."""
    RECLAIM_RESULTS.labels(host, result).inc()


def reclaim_run_finished(seconds: float, *, finished_at: float | None = None) -> None:
    RECLAIM_RUNS.inc()
    RECLAIM_RUN_SECONDS.observe(seconds)
    RECLAIM_LAST_RUN.set(time.time() if finished_at is None else finished_at)


def serve(port: int, addr: str = "0.0.0.0") -> bool:
    """Expose this process's metrics on ``addr:port``; False (logged) if the port is taken."""
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        log.error("metrics endpoint on port %d not started: %s", port, exc)
        return False
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return True
