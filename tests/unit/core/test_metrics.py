"""The metric functions the runner, housekeeping and reclamation call move the right series."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY

from tests.support.services import free_port
from worker.core import metrics


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_transition_finished_counts_and_times_real_work():
    before = value("dormant_transitions_total", action="pause", outcome="changed")
    slow_before = value("dormant_transition_seconds_bucket", action="pause", le="2.0")
    fast_before = value("dormant_transition_seconds_bucket", action="pause", le="1.0")

    metrics.transition_finished("pause", "changed", 1.5)

    assert value("dormant_transitions_total", action="pause", outcome="changed") == before + 1
    assert value("dormant_transition_seconds_bucket", action="pause", le="2.0") == slow_before + 1
    assert value("dormant_transition_seconds_bucket", action="pause", le="1.0") == fast_before


def test_duplicates_are_counted_but_not_timed():
    count = value("dormant_transition_seconds_count", action="resume")
    metrics.transition_finished("resume", "duplicate", 0.0)
    assert value("dormant_transitions_total", action="resume", outcome="duplicate") >= 1
    assert value("dormant_transition_seconds_count", action="resume") == count


def test_retries_by_error_class_and_lock_waits():
    before = value("dormant_transition_retries_total", action="suspend",
                   error="HypervisorBusy")
    waits = value("dormant_lock_wait_seconds_count")
    metrics.transition_retried("suspend", "HypervisorBusy")
    metrics.lock_waited(0.2)
    assert value("dormant_transition_retries_total", action="suspend",
                 error="HypervisorBusy") == before + 1
    assert value("dormant_lock_wait_seconds_count") == waits + 1


def test_instances_gauge_drops_states_that_emptied():
    metrics.instances_observed("unit-h1", {"running": 3, "paused": 1})
    assert value("dormant_instances", host="unit-h1", state="paused") == 1
    metrics.instances_observed("unit-h1", {"running": 4})
    assert value("dormant_instances", host="unit-h1", state="running") == 4
    assert REGISTRY.get_sample_value("dormant_instances",
                                     {"host": "unit-h1", "state": "paused"}) == 0


def test_reclamation_decisions_results_and_runs():
    runs = value("dormant_reclaim_runs_total")
    metrics.reclaim_decided("unit-h2", "idle")
    metrics.reclaim_decided("unit-h2", "idle")
    metrics.reclaim_result("unit-h2", "suspended")
    metrics.reclaim_run_finished(12.0, finished_at=1_700_000_000.0)
    assert value("dormant_reclaim_decisions_total", host="unit-h2", decision="idle") == 2
    assert value("dormant_reclaim_results_total", host="unit-h2", result="suspended") == 1
    assert value("dormant_reclaim_runs_total") == runs + 1
    assert value("dormant_reclaim_last_run_timestamp_seconds") == 1_700_000_000.0


def test_serve_exposes_the_registry_and_reports_a_taken_port():
    port = free_port()
    assert metrics.serve(port, addr="127.0.0.1")
    metrics.transition_finished("unpause", "already", 0.01)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert 'dormant_transitions_total{action="unpause",outcome="already"}' in body
    assert metrics.serve(port, addr="127.0.0.1") is False


@pytest.mark.parametrize("outcome", ["changed", "already", "failed"])
def test_timed_outcomes(outcome):
    count = value("dormant_transition_seconds_count", action="ensure")
    metrics.transition_finished("ensure", outcome, 0.3)
    assert value("dormant_transition_seconds_count", action="ensure") == count + 1


def test_libvirt_calls_in_flight_are_read_from_the_hypervisor_at_scrape_time() -> None:
    import worker.hypervisor.calls as hv

    assert REGISTRY.get_sample_value("dormant_libvirt_calls_in_flight") == hv.calls_in_flight()[0]
    hv._inflight[-1] = ("a test call", 0.0)  # started at the monotonic clock's origin
    try:
        assert REGISTRY.get_sample_value("dormant_libvirt_calls_in_flight") >= 1
        assert REGISTRY.get_sample_value("dormant_libvirt_oldest_call_seconds") > 0
    finally:
        del hv._inflight[-1]
