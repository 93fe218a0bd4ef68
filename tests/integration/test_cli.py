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
    assert proc.returncode == 2, proc.stderr  # an unknown instance is bad input
    assert proc.stderr.startswith("error: UnknownInstance: ")
    assert "dormant-test-no-such-guest" in proc.stderr
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


def _code(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = dormant(env, *args, timeout=60)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode:
        assert lines and lines[-1].startswith("error: "), (args, proc.stderr)
        assert len(lines[-1].split(": ", 2)) == 3, lines[-1]  # error: <ErrorType>: <message>
    return proc.returncode, proc.stderr


@pytest.mark.slow
def test_every_command_has_the_same_exit_codes(start_worker, guests, dormant_env, redis_clean,
                                               host_name):
    """Unknown instance, host or run id and malformed input exit 2 before anything is queued;
    a refusal exits 1; a worker that does not answer exits 3."""
    guest, saved = guests.create("idle"), guests.create("idle")
    saved.domain.managedSave(0)
    # A registry that outlives the test: a stopped worker's host stays "live" for it, so the
    # last part sees work queued for a host whose worker does not answer.
    slow_registry = {"DORMANT_REGISTRY_INTERVAL": "300"}
    dormant_env = {**dormant_env, **slow_registry}
    worker = start_worker(pool="threads", concurrency=2, env=slow_registry)
    ghost = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
    broker, state = redis_clean.client(0), redis_clean.client(2)
    wait_until(lambda: state.get(f"dormant:name:{guest.name}"), timeout=30,
               message="registry knows the guest")

    table = [
        # unknown instance
        (2, ["pause", "nosuch-guest", "--wait"], "UnknownInstance"),
        (2, ["unpause", ghost, "--wait"], "UnknownInstance"),
        (2, ["suspend", "nosuch-guest", "--wait"], "UnknownInstance"),
        (2, ["resume", ghost, "--wait"], "UnknownInstance"),
        (2, ["ensure", "nosuch-guest", "running", "--wait"], "UnknownInstance"),
        (2, ["status", "nosuch-guest"], "UnknownInstance"),
        (2, ["history", "nosuch-guest"], "UnknownInstance"),
        (2, ["history", ghost], "UnknownInstance"),
        (2, ["idle", "nosuch-guest"], "UnknownInstance"),
        (2, ["exempt", ghost], "UnknownInstance"),
        (2, ["unexempt", "nosuch-guest"], "UnknownInstance"),
        (2, ["drain", host_name, "--instance", "nosuch-guest"], "UnknownInstance"),
        # unknown host
        (2, ["drain", "nosuchhost"], "InvalidInput"),
        (2, ["sample", "--host", "nosuchhost"], "InvalidInput"),
        (2, ["reclaim", "--dry-run", "--host", "nosuchhost"], "InvalidInput"),
        # unknown run id
        (2, ["restore", "no:such:run"], "InvalidInput"),
        (2, ["reclaim", "report", "no:such:run"], "InvalidInput"),
        # malformed input
        (2, ["pause", guest.name, "--max-seconds", "-1"], "InvalidInput"),
        (2, ["unpause", guest.name, "--request-id", "x" * 200], "InvalidInput"),
        (2, ["ensure", guest.name, "asleep"], "InvalidInput"),
        (2, ["status", "../etc"], "InvalidInput"),
        (2, ["history", guest.name, "--limit", "0"], "InvalidInput"),
        (2, ["idle", "a/b"], "InvalidInput"),
        (2, ["exempt", "a/b"], "InvalidInput"),
        (2, ["drain", host_name, "--instance", "a/b"], "InvalidInput"),
        (2, ["restore", "bad id!"], "InvalidInput"),
        (2, ["kill-switch", "maybe"], "InvalidInput"),
        (2, ["reclaim", "--timeout", "0"], "InvalidInput"),
        (2, ["sample", "--nosuchflag"], "InvalidInput"),
        # refused: tried and failed
        (1, ["unpause", saved.name, "--wait"], "InvalidTransition"),
    ]
    for expected, args, error_type in table:
        code, err = _code(dormant_env, *args)
        assert code == expected, (args, err)
        assert f"error: {error_type}: " in err, (args, err)
    assert "live hosts: " + host_name in _code(dormant_env, "drain", "nosuchhost")[1]

    # Nothing was queued for a host no worker serves, and unknown instances got no journal.
    assert not broker.exists("dormant.nosuchhost")
    # (Real guests may have journals: their refusals, libvirt's lifecycle events.)
    assert not state.exists(f"dormant:journal:{ghost}", "dormant:journal:nosuch-guest")
    assert not state.exists("dormant:reclaim:exempt")
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    # A host whose worker stopped answering: the work is queued and the CLI exits 3.
    worker.stop()
    for args in (["pause", guest.name, "--wait", "--timeout", "1"],
                 ["status", guest.name, "--timeout", "1"],
                 ["sample", "--host", host_name, "--timeout", "1"],
                 ["reclaim", "--dry-run", "--host", host_name, "--timeout", "1"],
                 ["drain", host_name, "--timeout", "1"]):
        code, err = _code(dormant_env, *args)
        assert code == 3 and "error: WorkerTimeout: " in err, (args, err)


def test_drain_of_an_unknown_host_fails_fast_and_queues_nothing(start_worker, dormant_env,
                                                                redis_clean, host_name):
    start_worker(pool="threads", concurrency=1)
    started = time.monotonic()
    proc = dormant(dormant_env, "drain", "nosuchhost")
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: InvalidInput: unknown host 'nosuchhost'")
    assert host_name in proc.stderr  # names the live hosts
    assert elapsed < 10, elapsed
    assert not redis_clean.client(0).exists("dormant.nosuchhost")
    assert not redis_clean.client(2).keys("dormant:run:drain:nosuchhost*")
