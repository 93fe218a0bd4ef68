"""Reclamation end to end: real KVM guests that spin or halt, a real worker, a real Redis.

Sampling is shortened by configuration (a sample every ~0.6 s, a 40 s window, 3 intervals
needed) and driven by the test through ``dormant.sample`` instead of beat. Reclamation is
scoped (``DORMANT_RECLAIM_SCOPE``) to this test's guests, so guests of concurrent sessions on
the same libvirtd are never touched. Every outcome is checked with libvirt directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from tests.support import services
from tests.support.guests import NAME_PREFIX, boot_sector
from tests.support.services import ROOT, wait_until
from tests.support.webhook import WebhookReceiver
from worker.reclaim import killswitch, run_store

pytestmark = pytest.mark.integration

SAMPLE_SPACING = 0.6  # seconds between the test's samples (max gap is 3 intervals of 1 s)


def reclaim_env(scope: str, **extra: str) -> dict[str, str]:
    return {
        "DORMANT_SAMPLE_INTERVAL": "1",
        "DORMANT_IDLE_WINDOW": "40",
        "DORMANT_IDLE_MIN_SAMPLES": "3",
        "DORMANT_IDLE_MIN_SPAN_FRACTION": "0.05",
        "DORMANT_RECLAIM_MIN_AGE": "0",
        "DORMANT_RECLAIM_RECHECK_SECONDS": "1",
        "DORMANT_RECLAIM_HOST_CAP": "4",
        "DORMANT_RECLAIM_SCOPE": scope,
        **extra,
    }


class Scene:
    """This test's guests, worker and helpers."""

    def __init__(self, guests, start_worker, client_app, redis_clean, host, **extra: str):
        self.token = uuid.uuid4().hex[:6]
        self.prefix = f"{NAME_PREFIX}{self.token}-"
        self.env = reclaim_env(self.prefix + "*", **extra)
        self.guests, self.app, self.redis, self.host = guests, client_app, redis_clean, host
        self.worker = start_worker(pool="threads", concurrency=8, env=self.env)
        self.state = redis_clean.client(2)

    def create(self, kind: str, role: str, *, metadata: str = "", **kw):
        name = f"{self.prefix}{role}-p{os.getpid()}"
        return self.guests.create(kind, name=name, metadata=metadata, **kw)

    def queue(self) -> str:
        return f"dormant.{self.host}"

    def send(self, task: str, **kwargs):
        return self.app.send_task(task, kwargs=kwargs, queue=self.queue()).get(timeout=60)

    def sample_for(self, count: int) -> None:
        """Take ``count`` samples spaced in time (rates need time to pass between them)."""
        for i in range(count):
            if i:
                time.sleep(SAMPLE_SPACING)  # spacing samples, not waiting for another process
            assert self.send("dormant.sample")["stored"] >= 1

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = services.test_env(self.redis, self.host, **self.env)
        command = [sys.executable, "-c",
                   "import sys; from worker.cli import main; sys.exit(main())"]
        return subprocess.run([*command, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180, check=False)

    def finished(self, rid: str) -> dict:
        def done():
            report = run_store.load(self.state, rid)
            return report if report and report["status"] in {"done", "disabled"} else None
        return wait_until(done, timeout=90, interval=0.1, message=f"run {rid} finished")


def _rate(domain, seconds: float = 0.5) -> float:
    start, t0 = domain.getCPUStats(True)[0]["cpu_time"], time.monotonic()
    time.sleep(seconds)  # measuring a rate over a fixed interval
    return (domain.getCPUStats(True)[0]["cpu_time"] - start) / 1e9 / (time.monotonic() - t0)


def settled(domain) -> bool:
    """The idle guest has left its BIOS (~3 s of full CPU) and halts: under 1 % of a CPU twice
    in a row, which a BIOS merely starved by a loaded host does not reach."""
    return _rate(domain) < 0.01 and _rate(domain) < 0.01


def spinning(domain) -> bool:
    return _rate(domain) > 0.5


def state_of(conn, guest) -> str:
    domain = conn.lookupByUUIDString(guest.uuid)
    state = domain.state()[0]
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return "running"
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return "suspended" if domain.hasManagedSaveImage() else "shutoff"
    return f"state-{state}"


def by_instance(report: dict) -> dict[str, dict]:
    return {e["instance"]: e for e in report["entries"]}


EXEMPT_XML = '<dormant:policy xmlns:dormant="https://dormant.dev/xmlns/1" exempt="true"/>'


@pytest.mark.slow
def test_dry_run_real_run_second_trigger_and_restore(guests, start_worker, client_app,
                                                     redis_clean, host_name, libvirt_conn):
    scene = Scene(guests, start_worker, client_app, redis_clean, host_name)
    busy = [scene.create("busy", f"busy{i}") for i in range(2)]
    idle = [scene.create("idle", f"idle{i}") for i in range(3)]
    exempt = scene.create("idle", "exempt", metadata=EXEMPT_XML)
    everyone = [*busy, *idle, exempt]
    for guest in [*idle, exempt]:
        wait_until(lambda g=guest: settled(g.domain), timeout=30, message=f"{guest.name} halts")
    scene.sample_for(6)

    # Dry run: exactly the three idle, non-exempt guests, with reasons; nothing changes.
    dry = scene.cli("reclaim", "--dry-run", "--host", host_name, "--json")
    assert dry.returncode == 0, dry.stderr
    [report] = json.loads(dry.stdout)["runs"]
    assert report["dry_run"] is True and report["status"] == "dry_run"
    entries = by_instance(report)
    assert {e["instance"] for e in report["entries"]} == {g.uuid for g in everyone}
    assert {u for u, e in entries.items() if e["verdict"] == "suspend"} == {g.uuid for g in idle}
    for g in idle:
        assert entries[g.uuid]["reason"].startswith("idle:")
        assert entries[g.uuid]["numbers"]["intervals"] >= 3
        assert entries[g.uuid]["numbers"]["cpu_percent_at_quantile"] < 3
    assert entries[exempt.uuid]["verdict"] == "exempt"
    assert "domain metadata" in entries[exempt.uuid]["reason"]
    for g in busy:
        assert entries[g.uuid]["verdict"] == "keep"
        assert "CPU" in entries[g.uuid]["reason"]
        assert entries[g.uuid]["numbers"]["cpu_percent_at_quantile"] > 50
    assert all(state_of(libvirt_conn, g) == "running" for g in everyone)
    assert run_store.manifest(scene.state, report["run_id"]) == set()

    # The real run suspends exactly those three.
    rid = f"{host_name}:2026-11-27"
    planned = scene.send("dormant.reclaim", run_id=rid)
    assert planned["status"] == "acting"
    report = scene.finished(rid)
    assert {g.uuid: state_of(libvirt_conn, g) for g in everyone} == {
        **{g.uuid: "suspended" for g in idle},
        **{g.uuid: "running" for g in [*busy, exempt]},
    }
    assert set(report["manifest"]) == {g.uuid for g in idle}
    assert {e["outcome"] for e in report["entries"] if e["verdict"] == "suspend"} == {"suspended"}

    # A second trigger of the same run does nothing more.
    again = scene.send("dormant.reclaim", run_id=rid)
    assert again["status"] == "duplicate"
    assert run_store.load(scene.state, rid)["manifest"] == report["manifest"]
    assert all(state_of(libvirt_conn, g) == "running" for g in [*busy, exempt])

    # Someone resumes one by hand; restore brings back the other two and skips that one.
    idle[0].domain.create()
    restored = scene.cli("restore", rid, "--json")
    assert restored.returncode == 0, restored.stderr
    [back] = json.loads(restored.stdout)["runs"]
    outcomes = {e["instance"]: e["outcome"] for e in back["entries"]}
    assert outcomes == {idle[0].uuid: "skipped", idle[1].uuid: "resumed",
                        idle[2].uuid: "resumed"}
    assert "already running" in by_instance(back)[idle[0].uuid]["reason"]
    assert all(state_of(libvirt_conn, g) == "running" for g in everyone)


def test_kill_switch_makes_a_run_suspend_nothing(guests, start_worker, client_app,
                                                 redis_clean, host_name, libvirt_conn):
    scene = Scene(guests, start_worker, client_app, redis_clean, host_name)
    guest = scene.create("idle", "idle0")
    wait_until(lambda: settled(guest.domain), timeout=30, message="idle guest halts")
    scene.sample_for(5)
    switched = scene.cli("kill-switch", "on", "--json")
    assert switched.returncode == 0, switched.stderr
    assert json.loads(switched.stdout)["reclamation"] == "disabled"

    ran = scene.cli("reclaim", "--host", host_name, "--json")  # a real run, started now
    assert ran.returncode == 0, ran.stderr
    [report] = json.loads(ran.stdout)["runs"]
    assert report["dry_run"] is False and report["status"] == "disabled"
    assert "kill switch on" in report["reason"]
    [entry] = report["entries"]
    assert entry["verdict"] == "disabled" and "kill switch on" in entry["reason"]
    assert report["manifest"] == []
    assert state_of(libvirt_conn, guest) == "running"

    assert scene.cli("kill-switch", "off").returncode == 0
    assert killswitch.disabled_reason(scene.state, enabled_setting=True) == ""


@pytest.mark.slow
def test_unsaveable_guest_fails_alone_and_a_guest_busy_at_the_recheck_is_kept(
        guests, start_worker, client_app, redis_clean, host_name, libvirt_conn):
    scene = Scene(guests, start_worker, client_app, redis_clean, host_name)
    ok = [scene.create("idle", f"idle{i}") for i in range(2)]
    broken = scene.create("idle", "broken")
    waking = scene.create("idle", "waking")
    for guest in [*ok, broken, waking]:
        wait_until(lambda g=guest: settled(g.domain), timeout=30, message=f"{guest.name} halts")
    scene.sample_for(6)

    # managedSave of `broken` fails: a directory sits where libvirt writes its image.
    blocker = Path(f"/var/lib/libvirt/qemu/save/{broken.name}.save")
    blocker.mkdir()
    try:
        # `waking` was idle in every stored sample; now it reboots into a spinning loop.
        Path(guests.workdir / f"{waking.name}.img").write_bytes(boot_sector("busy"))
        waking.domain.reset()
        wait_until(lambda: spinning(waking.domain), timeout=30, message="waking guest spins")

        rid = f"{host_name}:failures"
        planned = scene.send("dormant.reclaim", run_id=rid)
        assert {e["instance"] for e in planned["entries"] if e["verdict"] == "suspend"} == {
            g.uuid for g in [*ok, broken, waking]}  # all idle at decision time
        report = scene.finished(rid)
    finally:
        blocker.rmdir()
    entries = by_instance(report)
    assert entries[broken.uuid]["outcome"] == "failed"
    assert "Is a directory" in entries[broken.uuid]["error"]  # libvirt's own message
    assert entries[waking.uuid]["outcome"] == "skipped"
    assert "busy at the re-check" in entries[waking.uuid]["reason"]
    assert entries[waking.uuid]["recheck"]["recheck_cpu_percent"] > 50
    assert {g.uuid: state_of(libvirt_conn, g) for g in [*ok, broken, waking]} == {
        ok[0].uuid: "suspended", ok[1].uuid: "suspended",
        broken.uuid: "running", waking.uuid: "running"}
    assert set(report["manifest"]) == {g.uuid for g in ok}


def test_drain_suspends_every_running_guest_and_restore_brings_exactly_those_back(
        guests, start_worker, client_app, redis_clean, host_name, libvirt_conn):
    scene = Scene(guests, start_worker, client_app, redis_clean, host_name)
    running = [scene.create("idle", f"run{i}") for i in range(3)]
    paused = scene.create("idle", "paused")
    paused.domain.suspend()

    drained = scene.cli("drain", host_name, "--json")
    assert drained.returncode == 0, drained.stderr
    [report] = json.loads(drained.stdout)["runs"]
    assert report["kind"] == "drain" and report["status"] == "done"
    assert set(report["manifest"]) == {g.uuid for g in running}
    entries = by_instance(report)
    assert entries[paused.uuid]["verdict"] == "not_running"
    assert all(state_of(libvirt_conn, g) == "suspended" for g in running)
    assert paused.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    restored = scene.cli("restore", report["run_id"], "--json")
    assert restored.returncode == 0, restored.stderr
    [back] = json.loads(restored.stdout)["runs"]
    assert {e["instance"]: e["outcome"] for e in back["entries"]} == {
        g.uuid: "resumed" for g in running}
    assert all(state_of(libvirt_conn, g) == "running" for g in running)
    assert paused.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED  # not ours: left alone

    shown = scene.cli("reclaim", "report", report["run_id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["runs"][0]["manifest"] == report["manifest"]


def test_cli_exempt_idle_and_sample(guests, start_worker, client_app, redis_clean, host_name,
                                    libvirt_conn):
    scene = Scene(guests, start_worker, client_app, redis_clean, host_name)
    guest = scene.create("idle", "idle0")
    wait_until(lambda: settled(guest.domain), timeout=30, message="idle guest halts")
    for i in range(5):
        if i:
            time.sleep(SAMPLE_SPACING)  # spacing samples, not waiting for another process
        sampled = scene.cli("sample", "--host", host_name, "--json")
        assert sampled.returncode == 0, sampled.stderr
        assert json.loads(sampled.stdout)[0]["stored"] >= 1
    wait_until(lambda: scene.state.get(f"dormant:name:{guest.name}"), timeout=30,
               message="registry knows the guest")

    shown = scene.cli("idle", guest.name, "--json")
    assert shown.returncode == 0, shown.stderr
    [decision] = json.loads(shown.stdout)
    assert decision["idle"] is True and decision["numbers"]["intervals"] >= 3

    assert scene.cli("exempt", guest.name).returncode == 0
    dry = json.loads(scene.cli("reclaim", "--dry-run", "--host", host_name, "--json").stdout)
    [entry] = dry["runs"][0]["entries"]
    assert entry["verdict"] == "exempt" and "dormant exempt" in entry["reason"]
    assert scene.cli("unexempt", guest.name).returncode == 0
    dry = json.loads(scene.cli("reclaim", "--dry-run", "--host", host_name, "--json").stdout)
    assert dry["runs"][0]["entries"][0]["verdict"] == "suspend"
    assert state_of(libvirt_conn, guest) == "running"
    assert scene.cli("exempt", "no-such-guest").returncode == 2


@pytest.fixture
def webhook():
    receiver = WebhookReceiver("/idle")
    yield receiver.url, receiver.bodies
    receiver.stop()


@pytest.mark.slow
def test_grace_marks_and_notifies_once_then_a_later_run_suspends(
        guests, start_worker, client_app, redis_clean, host_name, libvirt_conn, webhook):
    url, received = webhook
    scene = Scene(guests, start_worker, client_app, redis_clean, host_name,
                  DORMANT_RECLAIM_GRACE="true", DORMANT_RECLAIM_GRACE_PERIOD="0",
                  DORMANT_NOTIFY_WEBHOOK=url)
    guest = scene.create("idle", "idle0")
    wait_until(lambda: settled(guest.domain), timeout=30, message="idle guest halts")
    scene.sample_for(5)

    first = scene.send("dormant.reclaim", run_id=f"{host_name}:night1")
    [entry] = first["entries"]
    assert entry["verdict"] == "mark" and entry["outcome"] == "marked"
    assert entry["notice"] == "sent (HTTP 204)"
    assert [n["instance"] for n in received] == [guest.uuid]
    assert received[0]["event"] == "dormant.idle_marked"
    assert state_of(libvirt_conn, guest) == "running"
    assert scene.send("dormant.reclaim", run_id=f"{host_name}:night1")["status"] == "duplicate"

    second = scene.cli("reclaim", "--host", host_name, "--json")  # waits until it is done
    assert second.returncode == 0, second.stderr
    [report] = json.loads(second.stdout)["runs"]
    assert report["status"] == "done" and report["entries"][0]["verdict"] == "suspend"
    assert report["entries"][0]["outcome"] == "suspended"
    assert report["manifest"] == [guest.uuid]
    assert state_of(libvirt_conn, guest) == "suspended"
    assert len(received) == 1  # one notice per mark, never twice


@pytest.mark.slow
def test_a_drain_whose_worker_is_killed_mid_save_is_finished_by_another_worker(
        guests, start_worker, client_app, redis_clean, host_name, libvirt_conn):
    from tests.support.journal import journal, saving

    kill_env = {"DORMANT_LOCK_TTL": "2", "DORMANT_VISIBILITY_TIMEOUT": "4",
                "DORMANT_RETRY_BACKOFF": "1", "DORMANT_RETRY_BACKOFF_MAX": "1",
                "DORMANT_MAX_RETRIES": "20", "DORMANT_RECLAIM_HOST_CAP": "1"}
    scene = Scene(guests, start_worker, client_app, redis_clean, host_name, **kill_env)
    trio = [scene.create("idle", f"run{i}") for i in range(3)]
    rid = f"drain:{host_name}:killed"
    client_app.send_task("dormant.drain", kwargs={"run_id": rid}, queue=scene.queue())
    wait_until(lambda: any(saving(g.domain) for g in trio), timeout=60, interval=0.01,
               message="the first managedSave in progress")
    scene.worker.kill()  # the whole worker, mid-save: nobody acks or sends the next action

    start_worker(pool="threads", concurrency=4, env=scene.env)
    report = scene.finished(rid)
    assert {e["outcome"] for e in report["entries"]} == {"suspended"}
    assert set(report["manifest"]) == {g.uuid for g in trio}
    assert all(state_of(libvirt_conn, g) == "suspended" for g in trio)
    for g in trio:  # each guest saved exactly once, whatever was redelivered
        changed = [e for e in journal(redis_clean, g.uuid) if e["outcome"] == "changed"]
        assert len(changed) == 1, journal(redis_clean, g.uuid)


@pytest.mark.slow
def test_a_guest_libvirt_cannot_save_is_remembered_and_not_tried_again_until_redefined(
        guests, start_worker, client_app, redis_clean, host_name, libvirt_conn):
    """A guest with an ivshmem device: libvirt refuses its save at once. The first night
    reports the failure with libvirt's reason; the next night gives it ``cannot_save`` with
    that reason and asks libvirt nothing; once the device is gone from its definition (and the
    guest restarted without it), it is judged and suspended like any other."""
    from tests.support.journal import journal

    scene = Scene(guests, start_worker, client_app, redis_clean, host_name)
    shm = f"dormant-test-{scene.token}"
    device = f"<shmem name='{shm}'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>"
    stuck = scene.create("idle", "ivshmem", devices=device)
    other = scene.create("idle", "plain")
    try:
        for guest in (stuck, other):
            wait_until(lambda g=guest: settled(g.domain), timeout=30,
                       message=f"{guest.name} halts")
        scene.sample_for(5)

        first = scene.finished(scene.send("dormant.reclaim", run_id=f"{host_name}:n1")["run_id"])
        entries = by_instance(first)
        assert entries[stuck.uuid]["verdict"] == "suspend"
        assert entries[stuck.uuid]["outcome"] == "failed"
        assert entries[stuck.uuid]["error_type"] == "Unsavable"
        assert "ivshmem" in entries[stuck.uuid]["error"]  # libvirt's reason, as it gave it
        assert entries[other.uuid]["outcome"] == "suspended"
        assert state_of(libvirt_conn, stuck) == "running"
        attempts = len(journal(redis_clean, stuck.uuid))

        second = scene.finished(scene.send("dormant.reclaim", run_id=f"{host_name}:n2")["run_id"])
        entry = by_instance(second)[stuck.uuid]
        assert entry["verdict"] == "cannot_save" and entry["outcome"] == "none"
        assert "ivshmem" in entry["reason"] and entry["reason"].startswith("idle:")
        assert len(journal(redis_clean, stuck.uuid)) == attempts  # libvirt was not asked

        # The device removed from its definition, and the guest restarted without it.
        xml = stuck.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        libvirt_conn.defineXML(xml[:xml.index("<shmem")] + xml[xml.index("</shmem>") + 8:])
        stuck.domain.destroy()
        stuck.domain.create()
        wait_until(lambda: settled(stuck.domain), timeout=90, message="restarted and halts")
        scene.sample_for(5)
        third = scene.finished(scene.send("dormant.reclaim", run_id=f"{host_name}:n3")["run_id"])
        assert by_instance(third)[stuck.uuid]["outcome"] == "suspended"
        assert state_of(libvirt_conn, stuck) == "suspended"
    finally:
        Path(f"/dev/shm/{shm}").unlink(missing_ok=True)
