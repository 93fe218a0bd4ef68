"""First contact: the stack ``make run`` starts (scripts/run.sh itself), the README's first
snippet run against it, and its demo of reclamation with real guests.

run.sh runs as a newcomer would start it, with only these differences: every Redis URL points at
this session's private redis-server (never the shared one on 6379), its own ``DORMANT_HOST``,
Flower on a free port, and the demo timescale compressed further (a run every 45 s instead of
240 s). The demo guests are the real ``dormant-demo-*`` guests on the local libvirtd; run.sh's
machine-wide lock keeps a developer's own ``make run`` and this test apart.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import libvirt
import pytest

from tests.conftest import unavailable
from tests.support.services import ROOT, free_port, test_env, unique, wait_until
from worker.demo import bringup as demo
from worker.reclaim import run_store

pytestmark = pytest.mark.integration

EVERY = 45  # seconds between reclamation runs (make run: 240)
TIMESCALE = {
    "DORMANT_SAMPLE_INTERVAL": "3",
    "DORMANT_IDLE_WINDOW": "36",
    "DORMANT_IDLE_MIN_SAMPLES": "4",
    "DORMANT_RECLAIM_MIN_AGE": "10",
    "DORMANT_RECLAIM_EVERY": str(EVERY),
}
FLOWER_AUTH = "newcomer:first-contact"
LOCK = Path("/tmp/dormant-demo.lock")  # scripts/run.sh's lock around the demo fleet


def readme_first_python_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python snippet"
    return match.group(1)


def demo_lock_free() -> bool:
    with open(LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


class Stack:
    """scripts/run.sh in its own session, its output kept for the failing test's report."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(["bash", "scripts/run.sh"], cwd=ROOT, env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        """Signal run.sh alone (not its children): it must take care of them itself."""
        assert self.process is not None
        self.process.send_signal(signum)
        self.process.wait(90)

    def group_gone(self) -> bool:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def kill_all(self) -> None:
        if self.process is not None and not self.group_gone():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def demo_domains(conn: libvirt.virConnect) -> dict[str, libvirt.virDomain]:
    return {d.name(): d for d in conn.listAllDomains() if d.name().startswith(demo.PREFIX)}


def state_of(domain: libvirt.virDomain) -> str:
    state = domain.state()[0]
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return "running"
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return "suspended" if domain.hasManagedSaveImage() else "shutoff"
    return f"state-{state}"


def fleet_running(conn: libvirt.virConnect) -> dict[str, libvirt.virDomain] | None:
    """The whole fleet, running with its stable UUIDs; None while run.sh is still at it."""
    try:
        domains = demo_domains(conn)
        want = {g.name: g.uuid for g in demo.FLEET}
        if {n: d.UUIDString() for n, d in domains.items()} != want:
            return None
        return domains if all(state_of(d) == "running" for d in domains.values()) else None
    except libvirt.libvirtError:  # removed or redefined between the list and the look
        return None


def flower_tasks(port: int, name: str) -> dict[str, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/tasks?taskname={name}")
    token = base64.b64encode(FLOWER_AUTH.encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_make_run_stack_answers_the_readme_and_reclaims_idle_demo_guests(
        redis_clean, libvirt_conn, tmp_path):  # type: ignore[no-untyped-def]
    if not demo_lock_free():
        unavailable("another 'make run' holds the demo fleet on this libvirtd")
    conn = libvirt.open("qemu:///system")  # fresh: the session's may predate a libvirtd restart
    host = unique("first-contact-")
    env = {k: v for k, v in test_env(redis_clean, host, **TIMESCALE).items()
           if k != "DORMANT_LIBVIRT_URI"}  # run.sh chooses the demo hypervisor itself
    flower_port = free_port()
    env.update(FLOWER_PORT=str(flower_port), FLOWER_BASIC_AUTH=FLOWER_AUTH)
    snippet = readme_first_python_snippet()
    assert snippet.count("127.0.0.1:6379") == 2  # broker and backend: the only change made
    snippet = snippet.replace("127.0.0.1:6379", f"127.0.0.1:{redis_clean.port}")

    first = Stack(env, tmp_path / "run-1.log")
    stack = Stack(env, tmp_path / "run-2.log")
    try:
        # A make run killed with SIGKILL leaves its guests; the next one replaces them.
        first.start()
        killed = wait_until(lambda: fleet_running(conn), timeout=120,
                            message=f"demo fleet up\n{first.log()}")
        old_ids = {n: d.ID() for n, d in killed.items()}
        # Killed once it is up: a SIGKILL in the instant between run.sh starting a child and
        # setpriv arming that child's parent-death signal would orphan it (a race of
        # setpriv's, not the property tested here; it failed CI once).
        wait_until(lambda: "dormant is running on host" in first.log(), timeout=120,
                   message=f"make run's banner\n{first.log()}")
        first.signal(signal.SIGKILL)
        wait_until(first.group_gone, timeout=60, message="worker, beat and Flower follow run.sh")
        assert set(demo_domains(conn)) == set(old_ids)  # left behind

        stack.start()

        def replaced() -> dict[str, libvirt.virDomain] | None:
            up = fleet_running(conn)
            return up if up and all(d.ID() != old_ids[n] for n, d in up.items()) else None

        guests = wait_until(replaced, timeout=120, message=f"fleet replaced\n{stack.log()}")

        # The README's first snippet, as written (only the Redis port differs).
        ran = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, check=False)
        assert ran.returncode == 0, f"{ran.stderr}\n{stack.log()}"
        assert "'outcome': 'changed'" in ran.stdout and "dormant-demo-web" in ran.stdout
        assert state_of(guests["dormant-demo-web"]) == "suspended"

        # What the CLI sends, Flower sees from the moment it is queued.
        cli_status = subprocess.run([str(ROOT / ".venv/bin/dormant"), "status",
                                     "dormant-demo-batch", "--json"], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=60, check=False)
        assert cli_status.returncode == 0, cli_status.stderr
        assert "running" in cli_status.stdout
        queued = wait_until(lambda: [t for t in flower_tasks(flower_port, "dormant.status")
                                     .values() if t.get("sent") and t["state"] == "SUCCESS"],
                            timeout=30, message="the CLI's status task in Flower, with 'sent'")
        assert queued[0]["name"] == "dormant.status" and "dormant-demo-batch" in queued[0]["args"]

        # Reclamation on the compressed timescale suspends the idle guests, keeps the busy one.
        idle = [g.name for g in demo.FLEET if g.kind == "idle" and g.name != "dormant-demo-web"]
        wait_until(lambda: all(state_of(guests[n]) == "suspended" for n in idle),
                   timeout=3 * EVERY + 30, interval=1,
                   message=f"idle demo guests reclaimed\n{stack.log()}")
        assert state_of(guests["dormant-demo-batch"]) == "running"

        # `dormant reclaim report RUN_ID` of the run(s) that suspended them says why.
        state = redis_clean.client(2)

        def reports_of_suspends() -> dict[str, dict] | None:
            found = {}
            for rid in run_store.latest(state, count=10):
                report = run_store.load(state, rid) or {}
                for e in report.get("entries", []):
                    if e["name"] in idle and e.get("outcome") == "suspended":
                        found[e["name"]] = report
            done = all(r["status"] == "done" for r in found.values())
            return found if set(found) == set(idle) and done else None

        by_name = wait_until(reports_of_suspends, timeout=30, message="runs recorded")
        for rid in {r["run_id"] for r in by_name.values()}:
            cli = subprocess.run([str(ROOT / ".venv/bin/dormant"), "reclaim", "report", rid,
                                  "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=60, check=False)
            assert cli.returncode == 0, cli.stderr
            [run] = json.loads(cli.stdout)["runs"]
            assert run["host"] == host and run["status"] == "done"
            entries = {e["name"]: e for e in run["entries"]}
            assert entries["dormant-demo-batch"]["verdict"] == "keep"
            assert "CPU" in entries["dormant-demo-batch"]["reason"]
            assert entries["dormant-demo-web"]["verdict"] == "not_running"
            for name in idle:
                if by_name[name]["run_id"] == rid:
                    assert entries[name]["verdict"] == "suspend"
                    assert entries[name]["reason"].startswith("idle:")

        # ... and Flower shows the run and its suspends.
        assert any(t["state"] == "SUCCESS" for t in flower_tasks(
            flower_port, "dormant.reclaim").values())
        items = flower_tasks(flower_port, "dormant.run_item")
        assert sum(t["state"] == "SUCCESS" for t in items.values()) >= len(idle)

        # SIGTERM (as Ctrl-C would) stops everything and removes the demo guests and disks.
        stack.signal(signal.SIGTERM)
        assert stack.process is not None and stack.process.returncode != 0
        wait_until(stack.group_gone, timeout=30, message="worker, beat and Flower stopped")
        assert demo_domains(conn) == {}
        assert "demo fleet removed" in stack.log()
    finally:
        for s in (first, stack):
            s.kill_all()
        # Whatever happened, no demo guest outlives the test (a connection of its own).
        subprocess.run([sys.executable, "-m", "worker.demo.bringup", "down"], cwd=ROOT, check=False,
                       timeout=120, capture_output=True)
        conn.close()


@pytest.mark.slow
def test_make_run_falls_back_to_the_test_driver_where_the_snippet_still_works(
        redis_clean, tmp_path):  # type: ignore[no-untyped-def]
    """The fallback for machines where libvirtd cannot run: same names, banner says so."""
    env = test_env(redis_clean, unique("fallback-"), DORMANT_LIBVIRT_URI="test:///default",
                   FLOWER_PORT=str(free_port()), FLOWER_BASIC_AUTH=FLOWER_AUTH)
    snippet = readme_first_python_snippet().replace("127.0.0.1:6379",
                                                    f"127.0.0.1:{redis_clean.port}")
    stack = Stack(env, tmp_path / "run.log")
    try:
        stack.start()
        ran = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, check=False)
        assert ran.returncode == 0, f"{ran.stderr}\n{stack.log()}"
        assert "'outcome': 'changed'" in ran.stdout
        assert f"'instance': '{demo.demo_uuid('dormant-demo-web')}'" in ran.stdout
        banner = wait_until(lambda: "Ctrl-C stops" in stack.log() and stack.log(), timeout=90,
                            message="banner printed")
        assert "test driver (test:///default), the fallback where libvirtd" in banner
        assert "a reclamation run every 240 s" in banner
        stack.signal(signal.SIGTERM)
        wait_until(stack.group_gone, timeout=30, message="worker, beat and Flower stopped")
    finally:
        stack.kill_all()


@pytest.mark.slow
def test_make_run_falls_back_when_libvirtd_runs_but_cannot_start_the_demo_guests(
        redis_clean, libvirt_conn, tmp_path):  # type: ignore[no-untyped-def]
    """libvirtd answers but refuses the demo fleet (here: another guest already holds
    dormant-demo-web's UUID; in an unprivileged container it was xattrs and cgroups): make run
    says why, removes what it made and runs the demo on the test driver instead."""
    if not demo_lock_free():
        unavailable("another 'make run' holds the demo fleet on this libvirtd")
    from tests.support.guests import NAME_PREFIX
    from worker.demo import bootsector

    conn = libvirt.open("qemu:///system")
    web_uuid = demo.demo_uuid("dormant-demo-web")
    squatter = conn.defineXML(bootsector.domain_xml(
        f"{NAME_PREFIX}squatter-{unique('')}-p{os.getpid()}", tmp_path / "never-started.img",
        uuid=web_uuid, domain_type="qemu"))
    env = {k: v for k, v in test_env(redis_clean, unique("refused-"),
                                      FLOWER_PORT=str(free_port()),
                                      FLOWER_BASIC_AUTH=FLOWER_AUTH).items()
           if k != "DORMANT_LIBVIRT_URI"}  # run.sh chooses the demo hypervisor itself
    snippet = readme_first_python_snippet().replace("127.0.0.1:6379",
                                                    f"127.0.0.1:{redis_clean.port}")
    stack = Stack(env, tmp_path / "run.log")
    try:
        stack.start()

        def banner_printed() -> str | None:
            log = stack.log()
            assert stack.process is not None
            if stack.process.poll() is not None:  # ended instead of falling back
                raise AssertionError(f"make run exited ({stack.process.returncode}):\n{log}")
            return log if "Ctrl-C stops" in log else None

        banner = wait_until(banner_printed, timeout=180, message="banner printed")
        assert "libvirtd is up but could not start the demo guests: " in banner
        assert "test driver (test:///default), the fallback where libvirtd" in banner
        assert "could not start the demo guests here (" in banner and web_uuid in banner
        assert demo_domains(conn) == {}  # what the refused attempt made is gone
        ran = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, check=False)
        assert ran.returncode == 0, f"{ran.stderr}\n{stack.log()}"
        assert "'outcome': 'changed'" in ran.stdout
        assert f"'instance': '{web_uuid}'" in ran.stdout
        assert state_of(squatter) == "shutoff"  # the test driver's guest was suspended, not it
        assert not squatter.hasManagedSaveImage()
        stack.signal(signal.SIGTERM)
        wait_until(stack.group_gone, timeout=30, message="worker, beat and Flower stopped")
        assert squatter.UUIDString() == web_uuid  # someone else's guest: left alone
    finally:
        stack.kill_all()
        with contextlib.suppress(libvirt.libvirtError):
            squatter.undefine()
        conn.close()
