"""The worker's /metrics endpoint moves when real transitions run through a real worker.

The worker runs ``--pool threads`` on libvirt's in-process test driver (``test:///default``
with dormant's demo fleet), the deployment's way to run with metrics: tasks and the HTTP
endpoint share one process and one registry.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_histograms_move_after_transitions(start_worker, client_app, host_name):
    port = free_port()
    start_worker(pool="threads", concurrency=4,
                 env={"DORMANT_LIBVIRT_URI": "test:///default",
                      "DORMANT_METRICS_PORT": str(port)})
    first = wait_until(lambda: _try_scrape(port), timeout=30, message="metrics endpoint")
    # The registry refresh at start-up already published the demo fleet per state.
    assert sample(first, "dormant_instances", host=host_name, state="running") >= 1

    queue = f"dormant.{host_name}"
    paused = client_app.send_task("dormant.pause", args=["dormant-demo-web"], queue=queue)
    assert paused.get(timeout=30)["outcome"] == "changed"
    again = client_app.send_task("dormant.pause", args=["dormant-demo-web"], queue=queue)
    assert again.get(timeout=30)["outcome"] == "already"
    unpaused = client_app.send_task("dormant.unpause", args=["dormant-demo-web"], queue=queue)
    assert unpaused.get(timeout=30)["outcome"] == "changed"
    refused = client_app.send_task("dormant.pause", args=["not a valid name!"], queue=queue)
    with pytest.raises(Exception, match="malformed instance"):
        refused.get(timeout=30)

    after = scrape(port)
    assert sample(after, "dormant_transitions_total", action="pause", outcome="changed") == 1
    assert sample(after, "dormant_transitions_total", action="pause", outcome="already") == 1
    assert sample(after, "dormant_transitions_total", action="unpause", outcome="changed") == 1
    assert sample(after, "dormant_transitions_total", action="pause", outcome="rejected") == 1
    # Histogram: two timed pauses, both within the +Inf bucket and a sum that grew.
    assert sample(after, "dormant_transition_seconds_count", action="pause") == 2
    assert sample(after, "dormant_transition_seconds_bucket", action="pause", le="+Inf") == 2
    assert sample(after, "dormant_transition_seconds_bucket", action="pause", le="60.0") == 2
    assert sample(after, "dormant_transition_seconds_sum", action="pause") > 0
    # Every transition that reached the lock recorded its wait.
    assert sample(after, "dormant_lock_wait_seconds_count") - \
        sample(first, "dormant_lock_wait_seconds_count") == 3


def _try_scrape(port: int):
    try:
        return scrape(port)
    except OSError:
        return None


def test_retries_are_counted_by_error_class(start_worker, client_app, host_name):
    """libvirtd unreachable: the transition is retried, then fails; both show in /metrics."""
    port = free_port()
    start_worker(pool="threads", concurrency=2,
                 env={"DORMANT_LIBVIRT_URI": "qemu+unix:///system?socket=/nonexistent/sock",
                      "DORMANT_METRICS_PORT": str(port), "DORMANT_MAX_RETRIES": "1",
                      "DORMANT_RETRY_BACKOFF": "1"})
    wait_until(lambda: _try_scrape(port), timeout=30, message="metrics endpoint")
    result = client_app.send_task("dormant.suspend", args=["dormant-demo-web"],
                                  queue=f"dormant.{host_name}")
    with pytest.raises(Exception) as failure:
        result.get(timeout=60)
    assert type(failure.value).__name__ == "HypervisorUnavailable"

    after = scrape(port)
    assert sample(after, "dormant_transition_retries_total", action="suspend",
                  error="HypervisorUnavailable") == 1
    assert sample(after, "dormant_transitions_total", action="suspend", outcome="failed") == 1
    assert sample(after, "dormant_transition_seconds_count", action="suspend") == 1


def test_prefork_worker_warns_that_metrics_need_threads(start_worker):
    port = free_port()
    worker = start_worker(pool="prefork", concurrency=1,
                          env={"DORMANT_LIBVIRT_URI": "test:///default",
                               "DORMANT_METRICS_PORT": str(port)})
    wait_until(lambda: "run the worker with --pool threads" in worker.log(), timeout=20,
               message="prefork warning in the worker log")
    assert _try_scrape(port) is not None  # still served: the instance gauge works there
