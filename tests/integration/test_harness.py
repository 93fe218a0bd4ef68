"""The harness is real: tasks run in other processes, guests burn (or don't burn) real CPU,
and a pause made through libvirt shows in ``virsh domstate``."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support.services import wait_until

pytestmark = pytest.mark.integration


def test_task_runs_in_a_separate_worker_process(start_worker, client_app, host_name):
    worker = start_worker(pool="prefork", concurrency=2)
    answer = client_app.send_task("dormant.ping", queue=f"dormant.{host_name}").get(timeout=30)
    assert answer["host"] == host_name
    assert answer["pid"] != os.getpid()
    assert answer["pid"] in worker.children()  # a prefork child, not the test, ran it


def _cpu_seconds(domain) -> float:
    return domain.getCPUStats(True)[0]["cpu_time"] / 1e9


def _rate(domain, seconds: float = 1.0) -> float:
    start, t0 = _cpu_seconds(domain), time.monotonic()
    time.sleep(seconds)  # measuring a rate over a fixed interval, not synchronising
    return (_cpu_seconds(domain) - start) / (time.monotonic() - t0)


@pytest.mark.slow
def test_busy_guest_burns_a_cpu_and_idle_guest_does_not(guests):
    busy = guests.create("busy")
    idle = guests.create("idle")
    # The idle guest spends its first seconds in the BIOS; wait until it has reached hlt.
    wait_until(lambda: _rate(idle.domain, 0.5) < 0.05, timeout=30,
               message="idle guest settles into hlt")
    assert 0.7 < _rate(busy.domain) < 1.3
    assert _rate(idle.domain) < 0.05


def _domstate(name: str) -> str:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", name],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_pause_and_resume_change_virsh_domstate(guests):
    guest = guests.create("idle")
    assert _domstate(guest.name) == "running"
    guest.domain.suspend()
    assert _domstate(guest.name) == "paused"
    guest.domain.resume()
    assert _domstate(guest.name) == "running"
