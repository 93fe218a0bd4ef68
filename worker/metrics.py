"""Prometheus metrics: what an operator asks first, cheap enough for the hot path.

Each worker process keeps its own registry; ``serve`` exposes it over HTTP when
``DORMANT_METRICS_PORT`` is set (prefork children add their index to the port).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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


def transition_finished(action: str, outcome: str, seconds: float) -> None:
    TRANSITIONS.labels(action, outcome).inc()
    if outcome in ("changed", "already", "failed"):
        TRANSITION_SECONDS.labels(action).observe(seconds)


def transition_retried(action: str, error: str) -> None:
    RETRIES.labels(action, error).inc()


def lock_waited(seconds: float) -> None:
    LOCK_WAIT_SECONDS.observe(seconds)


def instances_observed(host: str, counts: dict[str, int]) -> None:
    for state, count in counts.items():
        INSTANCES.labels(host, state).set(count)


def serve(port: int) -> None:
    """Expose this process's metrics on ``port`` (all interfaces)."""
    start_http_server(port)
