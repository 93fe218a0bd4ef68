"""The real ``dormant`` command, run as a subprocess against a real worker and KVM guests.

State changes are checked with libvirt from the test, never through dormant.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from tests.support import services
from tests.support.services import ROOT, free_port, wait_until
from worker.reclaim import run_store

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


def test_no_worker_at_all_exits_3_at_once(dormant_env):
    started = time.monotonic()
    proc = dormant(dormant_env, "status", "vm1")  # --timeout 15 by default: not waited
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("error: NoWorker: no live worker serves dormant.control")
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
        (2, ["health", "--timeout", "0"], "InvalidInput"),
        (2, ["health", "--timeout", "-1"], "InvalidInput"),
        (2, ["sample", "--nosuchflag"], "InvalidInput"),
        (2, ["cancel", "no:such:run"], "InvalidInput"),
        (2, ["cancel", "bad id!"], "InvalidInput"),
        (2, ["cancel"], "InvalidInput"),
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

    # Over: a drain that suspended nothing is done; cancelling it is refused (exit 1).
    over = json.loads(_ok(dormant(dormant_env, "drain", host_name, "--instance", saved.name,
                                  "--json")).stdout)["runs"][0]
    code, err = _code(dormant_env, "cancel", over["run_id"])
    assert code == 1 and f"error: InvalidTransition: run {over['run_id']} is over" in err

    # A host whose worker is gone: every command that needs a worker says so at once (exit
    # 3, NoWorker, naming the host) and queues nothing.
    worker.stop()
    before = broker.llen(f"dormant.{host_name}")
    for args in (["pause", guest.name, "--wait"],
                 ["status", guest.name],
                 ["status"],
                 ["sample"],
                 ["sample", "--host", host_name],
                 ["reclaim", "--dry-run", "--host", host_name],
                 ["reclaim"],
                 ["drain", host_name],
                 ["restore", over["run_id"]],
                 ["idle"],
                 ["idle", guest.name]):
        started = time.monotonic()
        code, err = _code(dormant_env, *args)
        assert code == 3 and "error: NoWorker: " in err and host_name in err, (args, err)
        assert time.monotonic() - started < 15, args
    assert broker.llen(f"dormant.{host_name}") == before  # nothing queued


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


def _guest_suspended(guest) -> bool:
    return guest.domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and \
        bool(guest.domain.hasManagedSaveImage())


def test_two_drains_in_the_same_second_are_two_runs(start_worker, guests, dormant_env,
                                                    host_name):
    """Issue 22: run ids stopped at the second, so the second drain was answered with the
    first one's report while its guest kept running."""
    a, b, c = guests.create("idle"), guests.create("idle"), guests.create("idle")
    start_worker(pool="threads", concurrency=4)

    # Both at once: the same second, almost always.
    procs = [subprocess.Popen([*COMMAND, "drain", host_name, "--instance", g.name, "--json"],
                              cwd=ROOT, env=dormant_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for g in (a, b)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err)
        [report] = json.loads(out)["runs"]
        reports.append(report)
    assert reports[0]["run_id"] != reports[1]["run_id"]
    for guest, report in zip((a, b), reports, strict=True):
        assert report["manifest"] == [guest.uuid], report
        assert [(e["instance"], e["outcome"]) for e in report["entries"]] == [
            (guest.uuid, "suspended")]
        assert _guest_suspended(guest)

    # One after the other, the first over in well under a second (its guest is suspended).
    first = json.loads(_ok(dormant(dormant_env, "drain", host_name, "--instance", a.name,
                                   "--json")).stdout)["runs"][0]
    second = json.loads(_ok(dormant(dormant_env, "drain", host_name, "--instance", c.name,
                                    "--json")).stdout)["runs"][0]
    assert first["manifest"] == [] and second["manifest"] == [c.uuid]
    assert second["run_id"] not in {first["run_id"], *(r["run_id"] for r in reports)}
    assert _guest_suspended(c)

    # Restoring a run twice: the second names the restore that did it.
    _ok(dormant(dormant_env, "restore", reports[0]["run_id"]))
    assert a.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    again = json.loads(_ok(dormant(dormant_env, "restore", reports[0]["run_id"],
                                   "--json")).stdout)["runs"][0]
    [entry] = again["entries"]
    assert entry["outcome"] == "skipped"
    assert entry["reason"].startswith("skipped: already running (restored by restore:")
    assert entry["reason"].endswith(f"an earlier restore of {reports[0]['run_id']})")


def test_sample_with_no_worker_exits_3_within_15_seconds(start_worker, dormant_env,
                                                         redis_clean, host_name):
    """Nothing serves the host any more: stopped (its presence removed) or killed (its
    presence lapses after DORMANT_HOST_CLAIM_TTL, here 3 s)."""
    state = redis_clean.client(2)
    worker = start_worker(pool="threads", concurrency=1,
                          env={"DORMANT_HOST_CLAIM_TTL": "3"})
    wait_until(lambda: host_name in state.zrange("dormant:hosts", 0, -1), timeout=30,
               message="the host in the registry")
    worker.kill()
    for args in (["sample"], ["sample"], ["idle"], ["drain", host_name]):
        started = time.monotonic()
        proc = dormant(dormant_env, *args)
        elapsed = time.monotonic() - started
        assert proc.returncode == 3, (args, proc.stderr)
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: NoWorker: no live worker serves"), line
        assert host_name in line
        assert elapsed < 15, (args, elapsed)
    with_none = services.test_env(redis_clean, host_name)
    redis_clean.flush()  # no worker ever: an empty registry
    proc = dormant(with_none, "sample")
    assert proc.returncode == 3 and "error: NoWorker: " in proc.stderr


def test_a_run_queued_for_a_worker_that_does_not_answer_can_be_cancelled(
        start_worker, guests, dormant_env, redis_clean, host_name):
    """The worker is alive but stopped (SIGSTOP): the drain times out (exit 3) naming its
    run id; `dormant cancel` stops it before it starts; when the worker goes on, the run
    suspends nothing."""
    guest = guests.create("idle")
    worker = start_worker(pool="threads", concurrency=2,
                          env={"DORMANT_HOST_CLAIM_TTL": "120"})  # looks alive while stopped
    state = redis_clean.client(2)
    wait_until(lambda: state.get(f"dormant:name:{guest.name}"), timeout=30,
               message="registry knows the guest")
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        code, err = _code(dormant_env, "status", guest.name, "--timeout", "1")
        assert code == 3 and "error: WorkerTimeout: " in err, err
        proc = dormant(dormant_env, "drain", host_name, "--instance", guest.name,
                       "--timeout", "6")
        assert proc.returncode == 3, proc.stderr
        assert "note: waiting for draining" in proc.stderr  # a long wait says what it waits for
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: WorkerTimeout: no worker answered"), line
        rid = re.search(r"`dormant cancel (\S+)` stops it", line).group(1)
        queued = json.loads(_ok(dormant(dormant_env, "reclaim", "report", rid,
                                        "--json")).stdout)["runs"][0]
        assert queued["status"] == "queued"
        cancelled = json.loads(_ok(dormant(dormant_env, "cancel", rid, "--json")).stdout)
        assert cancelled["status"] == "cancelled"
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)
    report = wait_until(lambda: (r := run_store.load(state, rid)) and r["status"] == "cancelled"
                        and r, timeout=60, message="the worker to take the cancelled drain")
    assert report["todo"] == 0 and report["manifest"] == []
    assert [e["outcome"] for e in report["entries"]] == ["cancelled"]
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_health_and_kill_switch_in_the_grammar(redis_clean, host_name):
    env = services.test_env(redis_clean, host_name)
    proc = dormant({**env, "DORMANT_IDLE_CPU_QUANTILE": "2"}, "health")
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ConfigurationError: DORMANT_IDLE_CPU_QUANTILE=2"), line
    for value in ("0", "-1"):
        proc = dormant(env, "health", "--timeout", value)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [
            f"error: InvalidInput: Invalid value for '--timeout': must be more than 0 "
            f"seconds, got {value}"]
    # The fleet's switch in Redis, not this command's own DORMANT_RECLAIM_ENABLED.
    shown = json.loads(_ok(dormant({**env, "DORMANT_RECLAIM_ENABLED": "false"},
                                   "kill-switch", "--json")).stdout)
    assert shown["reclamation"] == "enabled"
    _ok(dormant(env, "kill-switch", "on"))
    assert json.loads(_ok(dormant(env, "kill-switch", "status", "--json")).stdout)[
        "reclamation"] == "disabled"
    proc = dormant(env, "pause", "vm1", "--max-seconds", "0")
    assert proc.stderr.strip().endswith("(7 days), got 0"), proc.stderr
