"""A stuck domain never wedges a worker (real libvirtd, QEMU guests and Celery workers).

* one guest's QEMU SIGSTOPped: its pause is abandoned at the deadline (HypervisorBusy, guest
  kept locked until the call returns), while pause/unpause of two other guests keep their
  normal latency;
* a domain whose lock libvirtd leaked (virDomainSaveParams without a file, libvirt 9.0): a
  worker started meanwhile answers pings and serves other guests. libvirtd is restarted
  afterwards to clear the leak — run this file under ``flock /tmp/dormant-libvirtd.lock``.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import wait_for_worker
from tests.support.journal import journal, libvirtd_pid, real_state, revive, start_libvirtd
from tests.support.services import wait_until
from worker.store import keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEADLINE = 3  # DORMANT_LIBVIRT_TIMEOUT for the stuck-QEMU test, seconds


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


@contextmanager
def qemu_stopped(name: str) -> Iterator[None]:
    """SIGSTOP the guest's QEMU (its monitor stops answering); always SIGCONT it."""
    pid = qemu_pid(name)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def restart_libvirtd(libvirt_conn) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM libvirtd, SIGKILL it if a leaked lock keeps it from exiting, start it again."""
    pid = libvirtd_pid()
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=3, interval=0.1)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10, interval=0.1,
                   message="libvirtd exits")
    start_libvirtd()
    revive(libvirt_conn)


def _timed(client_app, task: str, guest, queue: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = client_app.send_task(task, args=[guest.uuid], queue=queue).get(timeout=60)
    assert result["outcome"] == "changed", result
    return time.monotonic() - started


def _twenty(client_app, a, b, queue: str) -> list[float]:  # type: ignore[no-untyped-def]
    """5 rounds of pause a, pause b, unpause a, unpause b = 20 transitions, one at a time."""
    times = []
    for _round in range(5):
        for task in ("dormant.pause", "dormant.unpause"):
            for guest in (a, b):
                times.append(_timed(client_app, task, guest, queue))
    return times


def test_one_stuck_qemu_does_not_slow_other_guests_and_fails_busy_at_its_deadline(
        start_worker, client_app, host_name, guests, redis_clean):
    worker = start_worker(pool="threads", concurrency=4,
                          env={"DORMANT_LIBVIRT_TIMEOUT": str(DEADLINE),
                               "DORMANT_MAX_RETRIES": "0"})
    queue = f"dormant.{host_name}"
    stuck, a, b = guests.create("idle"), guests.create("idle"), guests.create("idle")
    _twenty(client_app, a, b, queue)  # warm-up: connections, domain handles
    baseline = _twenty(client_app, a, b, queue)

    with qemu_stopped(stuck.name):
        sent = time.monotonic()
        blocked = client_app.send_task("dormant.pause", args=[stuck.uuid], queue=queue)
        wait_until(lambda: f"dormant.pause[{blocked.id}] received" in worker.log(), timeout=10)
        during = _twenty(client_app, a, b, queue)
        with pytest.raises(Exception) as caught:
            blocked.get(timeout=30)
        failed_after = time.monotonic() - sent
        assert type(caught.value).__name__ == "HypervisorBusy"
        assert f"pause {stuck.name}: no answer from libvirt after {DEADLINE}s" in str(
            caught.value)
        assert failed_after < DEADLINE + 5, failed_after
        # The call may still complete: the guest stays locked until it returns.
        assert redis_clean.client(2).get(keys.lock(stuck.uuid))
        [failed] = journal(redis_clean, stuck.uuid)
        assert failed["outcome"] == "failed" and failed["error_type"] == "HypervisorBusy"
        assert failed["lock"] == "kept until the abandoned call returns"

    # SIGCONT: the abandoned pause completes; the lock is released and that is journaled.
    wait_until(lambda: redis_clean.client(2).get(keys.lock(stuck.uuid)) is None, timeout=30,
               message="lock released once the abandoned call returned")
    released = journal(redis_clean, stuck.uuid)[-1]
    assert released["outcome"] == "released" and released["call_returned"] == "returned"
    assert real_state(stuck.domain) == "paused(user)"

    base, slow = statistics.median(baseline), statistics.median(during)
    print(f"median latency: {base * 1000:.0f} ms alone, {slow * 1000:.0f} ms beside a stuck "
          f"domain; max {max(during) * 1000:.0f} ms")
    assert slow <= 4 * base + 0.1, (baseline, during)
    assert max(during) < DEADLINE, during  # none of them waited for the stuck call


def test_a_worker_starts_and_serves_other_guests_while_a_domain_lock_is_leaked(
        start_worker, client_app, host_name, guests, redis_clean, libvirt_conn):
    other, leaked = guests.create("idle"), guests.create("idle")
    try:
        leaked.domain.saveParams({}, 0)  # libvirt 9.0: leaks the domain's lock
        started = time.monotonic()
        worker = start_worker(pool="threads", concurrency=4, wait=False)
        wait_for_worker(worker, redis_clean, timeout=30)
        ready = time.monotonic() - started
        result = client_app.send_task("dormant.pause", args=[other.uuid],
                                      queue=f"dormant.{host_name}").get(timeout=30)
        assert result["outcome"] == "changed", result
        assert real_state(other.domain) == "paused(user)"
        assert ready < 30, ready
        print(f"worker answered ping {ready:.1f}s after start with a leaked domain lock")
    finally:
        restart_libvirtd(libvirt_conn)
