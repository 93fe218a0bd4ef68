"""The real ``dormant`` command, run as a subprocess against a real worker and KVM guests.

State changes are checked with libvirt from the test, never through dormant.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from tests.support import services
from tests.support.services import ROOT, free_port, wait_until

pytestmark = pytest.mark.integration

_SCRIPT = Path(sys.executable).parent / "dormant"
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "import sys; from worker.cli import main; sys.exit(main())"]


def dormant(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_pause_unpause_status_history_through_the_cli(start_worker, guests, dormant_env,
                                                      host_name):
    guest = guests.create("idle")  # created before the worker, so its registry has it
    start_worker(pool="threads", concurrency=2)

    paused = json.loads(_ok(dormant(dormant_env, "pause", guest.name, "--wait", "--json",
                                    "--request-id", "cli-pause-1")).stdout)
    assert paused["outcome"] == "changed"
    assert paused["instance"] == guest.uuid and paused["host"] == host_name
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    again = json.loads(_ok(dormant(dormant_env, "pause", guest.name, "--wait", "--json")).stdout)
    assert again["outcome"] == "already"

    table = _ok(dormant(dormant_env, "unpause", guest.uuid, "--wait")).stdout
    assert "changed" in table and guest.name in table
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    one = json.loads(_ok(dormant(dormant_env, "status", guest.name, "--json")).stdout)
    assert [(r["instance"], r["state"]) for r in one] == [(guest.uuid, "running")]
    fleet = json.loads(_ok(dormant(dormant_env, "status", "--json")).stdout)
    assert {"instance": guest.uuid, "state": "running", "host": host_name}.items() <= {
        r["instance"]: r for r in fleet}[guest.uuid].items()

    entries = json.loads(_ok(dormant(dormant_env, "history", guest.name, "--json")).stdout)
    assert [(e["action"], e["outcome"]) for e in entries] == [
        ("pause", "changed"), ("pause", "already"), ("unpause", "changed")]
    assert entries[0]["request_id"] == "cli-pause-1"
    table = _ok(dormant(dormant_env, "history", guest.name, "--limit", "1")).stdout
    assert "unpause" in table and "cli-pause-1" not in table


@pytest.mark.slow
def test_suspend_resume_and_ensure_through_the_cli(start_worker, guests, dormant_env):
    guest = guests.create("idle")
    start_worker(pool="threads", concurrency=2)

    _ok(dormant(dormant_env, "suspend", guest.name, "--wait"))
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert guest.domain.hasManagedSaveImage()

    result = json.loads(_ok(dormant(dormant_env, "ensure", guest.name, "paused", "--wait",
                                    "--json")).stdout)
    assert result["outcome"] == "changed" and result["state_after"].startswith("paused")
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    refused = dormant(dormant_env, "resume", guest.name, "--wait")  # paused is not suspended
    assert refused.returncode == 1 and "InvalidTransition" in refused.stderr, refused.stderr
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    _ok(dormant(dormant_env, "suspend", guest.name, "--wait"))
    _ok(dormant(dormant_env, "resume", guest.name, "--wait"))
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_unknown_instance_and_no_wait(start_worker, dormant_env, redis_clean):
    start_worker(pool="threads", concurrency=1)

    proc = dormant(dormant_env, "pause", "dormant-test-no-such-guest", "--wait")
    assert proc.returncode == 1, proc.stderr
    assert "UnknownInstance" in proc.stderr and "dormant-test-no-such-guest" in proc.stderr
    assert proc.stdout == ""

    sent = _ok(dormant(dormant_env, "suspend", "dormant-test-no-such-guest"))
    task_id = sent.stdout.strip()
    assert len(task_id) == 36  # a task id, nothing else on stdout
    backend = redis_clean.client(1)
    record = json.loads(wait_for_result(backend, task_id))
    assert record["status"] == "FAILURE"


def wait_for_result(backend, task_id: str, timeout: float = 30) -> str:
    return wait_until(lambda: backend.get(f"celery-task-meta-{task_id}"), timeout=timeout,
                      message=f"result of {task_id}")


def test_malformed_id_exits_2_without_touching_anything(redis_clean, host_name):
    # Every service points at a closed port: validation must come first.
    closed = f"redis://127.0.0.1:{free_port()}/0"
    env = services.test_env(redis_clean, host_name, DORMANT_BROKER_URL=closed,
                   DORMANT_RESULT_BACKEND=closed, DORMANT_STATE_URL=closed)
    for args in (["pause", "not a/valid name", "--wait"],
                 ["resume", "4dea22b3-1d52-d8f3-2516-782e98ab3fa"],
                 ["pause", "vm1", "--max-seconds", "0"],
                 ["suspend", "vm1", "--request-id", "has space"],
                 ["ensure", "vm1", "sideways"],
                 ["history", "../etc"]):
        proc = dormant(env, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "error:" in proc.stderr and proc.stdout == ""
    proc = dormant({**env, "DORMANT_NO_SUCH_SETTING": "1"}, "status")
    assert proc.returncode == 2 and "DORMANT_NO_SUCH_SETTING" in proc.stderr


def test_broker_down_exits_3_quickly(redis_clean, host_name):
    env = services.test_env(redis_clean, host_name,
                   DORMANT_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    proc = dormant(env, "pause", "vm1", "--wait")
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr
    assert "error:" in proc.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s to notice the broker is down"


def test_state_store_down_exits_3(redis_clean, host_name):
    env = services.test_env(redis_clean, host_name,
                   DORMANT_STATE_URL=f"redis://127.0.0.1:{free_port()}/2")
    proc = dormant(env, "history", "vm1")
    assert proc.returncode == 3, proc.stderr


def test_no_worker_answering_exits_3_after_the_timeout(dormant_env):
    started = time.monotonic()
    proc = dormant(dormant_env, "status", "vm1", "--timeout", "1")
    assert proc.returncode == 3, proc.stderr
    assert "no worker answered" in proc.stderr
    assert time.monotonic() - started < 10
    proc = dormant(dormant_env, "status")  # nothing published to the registry
    assert proc.returncode == 3 and "registry" in proc.stderr
