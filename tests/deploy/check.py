"""The checks of ``make deploy-test``: the compose stack for real, driven from outside it.

scripts/deploy-test.sh installs and starts Docker, builds the images and sets the environment
(REDIS_PASSWORD, FLOWER_BASIC_AUTH, LIBVIRT_SOCKET, LIBVIRT_GID, COMPOSE); this brings the
stack up under its own project name with a worker for this host and checks, each step failing
when its property is broken: every health check turns healthy; the worker runs non-root;
exactly one beat; Flower answers 401 without credentials and 200 with them; Redis refuses a
caller without the password; a caller in a process of its own with only Celery and the
password (tests/deploy/client.py; it fails if dormant was imported) pauses, unpauses,
suspends and resumes a real KVM guest of this host; transitions queued before Redis is
SIGKILLed complete afterwards (append-only file); ``docker stop`` of the worker during a
managed save lets the save finish and the guest is saved exactly once; no container log holds
a secret; ``down -v`` leaves no container, network or volume.

    python -m tests.deploy.check
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt

from tests.deploy import client
from tests.support.guests import GuestFactory, TestGuest, remove_leftovers
from tests.support.services import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("DEPLOY_PROJECT", "dormant-deploy-test")
COMPOSE = os.environ.get("COMPOSE", "docker-compose").split()
HOST = "kvm1"  # this machine plays hypervisor host kvm1 of the compose file
WORKER = f"worker-{HOST}"
QUEUE = f"dormant.{HOST}"
NODE = f"dormant@{HOST}"
SERVICES = ["redis", WORKER, "beat", "flower"]
REDIS_PASSWORD = os.environ["REDIS_PASSWORD"]
FLOWER_AUTH = os.environ["FLOWER_BASIC_AUTH"]
TIMINGS: dict[str, float] = {}
RUN_OUTPUTS: list[str] = []  # what `compose run` printed: checked for secrets too


class CheckFailed(AssertionError):
    """A deployment property does not hold."""


def expect(condition: Any, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def run(argv: list[str], *, timeout: float = 300, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise CheckFailed(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout + done.stderr if not check else done.stdout


COMPOSE_FILES = ["docker-compose.yml"]  # check_rabbitmq.py adds docker-compose.rabbitmq.yml


def compose(*args: str, timeout: float = 300) -> str:
    files = [arg for name in COMPOSE_FILES for arg in ("-f", str(ROOT / name))]
    return run([*COMPOSE, "-p", PROJECT, *files, *args], timeout=timeout)


def docker(*args: str, timeout: float = 300) -> str:
    return run(["docker", *args], timeout=timeout)


def container(service: str) -> str:
    cid = compose("ps", "-q", service).strip()
    expect(cid, f"no container for service {service}")
    return cid


def exec_in(cid: str, argv: list[str]) -> tuple[int, str]:
    done = subprocess.run(["docker", "exec", cid, *argv], capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout + done.stderr


def inspect(cid: str, template: str) -> str:
    return docker("inspect", "-f", template, cid).strip()


def logs(cid: str) -> str:
    """A container's whole log, stdout and stderr (Celery logs to stderr)."""
    return run(["docker", "logs", cid], check=False)


def health(cid: str) -> str:
    return inspect(cid, "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}")


def project_objects() -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        "containers": docker("ps", "-aq", "--no-trunc", "--filter", label).split(),
        "networks": docker("network", "ls", "-q", "--filter", label).split(),
        "volumes": docker("volume", "ls", "-q", "--filter", label).split(),
    }


@contextmanager
def step(name: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"--- {name}", flush=True)
    yield
    TIMINGS[name] = time.monotonic() - start
    print(f"ok  {name} ({TIMINGS[name]:.1f}s)", flush=True)


def wait_healthy(services: list[str], timeout: float) -> None:
    def all_healthy() -> bool:
        states = {s: health(container(s)) for s in services}
        unhealthy = [s for s, h in states.items() if h == "unhealthy"]
        expect(not unhealthy, f"unhealthy: {unhealthy}")
        return all(h == "healthy" for h in states.values())
    wait_until(all_healthy, timeout=timeout, interval=1, message=f"{services} healthy")


def redis_cli(*args: str) -> str:
    """redis-cli inside the redis container; the password stays in the container's env."""
    quoted = " ".join(f"'{a}'" for a in args)
    return docker("exec", container("redis"), "sh", "-c",
                  f'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli {quoted}').strip()


def flower(path: str, auth: str | None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{os.environ['FLOWER_PORT']}{path}")
    if auth is not None:
        request.add_header("Authorization",
                           "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def domain_state(guest: TestGuest) -> tuple[int, int, bool]:
    state, reason = guest.domain.state()
    return state, reason, bool(guest.domain.hasManagedSaveImage(0))


RUNNING = (libvirt.VIR_DOMAIN_RUNNING,)
PAUSED = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, False)
SAVED = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED, True)


def saving_or_saved(guest: TestGuest) -> str:
    """'saving' while its managed save runs, 'saved' once done, '' before it starts."""
    try:
        if guest.domain.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
            return "saving"
    except libvirt.libvirtError:  # not running any more
        pass
    return "saved" if domain_state(guest) == SAVED else ""


def expect_state(guest: TestGuest, wanted: tuple[Any, ...], what: str) -> None:
    actual = domain_state(guest)
    expect(actual[:len(wanted)] == wanted, f"{guest.name} after {what}: libvirt says {actual}")


Caller = Callable[..., tuple[int, Any, str]]


def run_client(args: tuple[str, ...], *, secret: str, password: str | None,
               ports: list[str]) -> tuple[int, Any, str]:
    """tests/deploy/client.py in a process of its own: Celery and the broker's password (in
    the environment variable ``secret``; none when ``password`` is None), no dormant."""
    env = {k: v for k, v in os.environ.items() if k != secret}
    if password is not None:
        env[secret] = password
    done = subprocess.run([sys.executable, "-I", client.__file__, *ports, *args],
                          env=env, capture_output=True, text=True, timeout=300)
    out = json.loads(done.stdout) if done.returncode == 0 else None
    return done.returncode, out, done.stderr.strip()


def caller(*args: str, password: str | None = REDIS_PASSWORD) -> tuple[int, Any, str]:
    return run_client(args, secret="REDIS_PASSWORD", password=password,
                      ports=["--port", os.environ["REDIS_PORT"]])


def call(*args: str, via: Caller = caller) -> dict[str, Any]:
    code, out, err = via(*args)
    expect(code == 0, f"client {' '.join(args)}: exit {code}: {err}")
    return out


def transition(task: str, guest: TestGuest, wanted: tuple[Any, ...], *,
               via: Caller = caller) -> None:
    result = call("send", task, guest.uuid, "--queue", QUEUE, "--wait", "120",
                  via=via)["result"]
    expect(result["outcome"] == "changed" and result["instance"] == guest.uuid,
           f"{task} {guest.name}: {result}")
    expect_state(guest, wanted, task)


def journal(guest: TestGuest) -> list[dict[str, Any]]:
    """The instance's journal through the deployment's own `dormant` tool (profile tools)."""
    out = compose("run", "--rm", "-T", "dormant", "history", guest.uuid, "--json",
                  "--limit", "1000")
    RUN_OUTPUTS.append(out)
    return json.loads(out)


def main() -> int:
    os.environ["REDIS_PORT"] = str(free_port())
    os.environ["FLOWER_PORT"] = str(free_port())
    os.environ.setdefault("REDIS_BIND", "127.0.0.1")
    os.environ.setdefault("FLOWER_BIND", "127.0.0.1")
    port = int(os.environ["REDIS_PORT"])  # the stack's Redis, published on loopback
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors raise; no stderr
    conn = libvirt.open("qemu:///system")
    remove_leftovers(conn)
    guests = GuestFactory(conn)
    try:
        with step("compose up: every health check turns healthy"):
            start = time.monotonic()
            compose("up", "-d", "--no-build", *SERVICES)
            wait_healthy(["redis", WORKER, "flower"], timeout=240)
            TIMINGS["time to a healthy stack"] = time.monotonic() - start
            for service, inner in (("redis", 6379), ("flower", 5555)):
                published = docker("port", container(service)).strip()
                expect(published.startswith(f"{inner}/tcp -> 127.0.0.1:")
                       and len(published.splitlines()) == 1,
                       f"{service} published beyond loopback: {published}")

        with step("worker non-root in the socket's group; exactly one beat"):
            worker = container(WORKER)
            ids = docker("exec", worker, "id").strip()
            expect(ids.startswith("uid=10001(dormant)"), f"worker runs as {ids}")
            expect(f"{os.environ['LIBVIRT_GID']}" in docker("exec", worker, "id", "-G").split(),
                   f"worker not in the socket's group: {ids}")
            # The group is what lets it in: the same image without it is refused.
            refused = subprocess.run(
                ["docker", "run", "--rm", "-v",
                 f"{os.environ['LIBVIRT_SOCKET']}:/var/run/libvirt/libvirt-sock",
                 inspect(worker, "{{.Config.Image}}"), "python", "-c",
                 "import libvirt; libvirt.open('qemu:///system')"],
                capture_output=True, text=True, timeout=120)
            expect(refused.returncode != 0 and "Permission denied" in refused.stderr,
                   f"libvirt socket open to a worker without its group: {refused.stderr}")
            beats = 0
            for cid in project_objects()["containers"]:
                for line in docker("top", cid, "-eo", "pid,args").splitlines()[1:]:
                    beats += "celery" in line and " beat" in line
            expect(beats == 1, f"{beats} beat processes in the stack")
            wait_until(lambda: "beat: Starting" in logs(container("beat")),
                       timeout=60, interval=1, message="beat started")

        hang = int(os.environ.get("DEPLOY_HANG_PID") or 0)  # libvirtd, or the proxy before it
        with step("the worker's health check fails while libvirtd hangs, passes when it answers"):
            test = json.loads(inspect(worker, "{{json .Config.Healthcheck.Test}}"))
            expect(test[0] == "CMD", f"health check {test}")
            code, out = exec_in(worker, test[1:])
            expect(code == 0, f"health check failed on a healthy stack: {out}")
            if hang:  # stopped, it accepts connections and never answers: a hung libvirtd
                os.kill(hang, signal.SIGSTOP)
                try:
                    code, out = exec_in(worker, test[1:])
                finally:
                    os.kill(hang, signal.SIGCONT)
                expect(code != 0 and "libvirtd" in out, f"healthy while libvirtd hangs: {out}")
                print(f"    while libvirtd hangs: exit {code}, {out.strip().splitlines()[-1]}")
            else:
                print("    (not hanging a libvirtd that this test did not start)")

        with step("Flower: 401 without credentials, 200 with them"):
            user = FLOWER_AUTH.split(":", 1)[0]
            expect(flower("/api/workers", None) == 401, "Flower API answered without auth")
            expect(flower("/api/workers", f"{user}:wrong") == 401, "Flower took a wrong password")
            expect(flower("/", None) == 401, "Flower UI answered without auth")
            expect(flower("/api/workers", FLOWER_AUTH) == 200, "Flower refused its credentials")

        factory_start = time.monotonic()
        a, b, c = (guests.create("idle") for _ in range(3))
        TIMINGS["three KVM guests defined and started"] = time.monotonic() - factory_start

        with step("Redis refuses a caller without the password or with a wrong one"):
            for password in (None, "wrong-" + uuid.uuid4().hex):
                # No result backend (no --wait): the broker itself must refuse the message.
                code, _, err = caller("send", "pause", a.uuid, "--queue", QUEUE,
                                      password=password)
                expect(code == 1, f"Redis accepted a caller with password {password!r}")
                expect(any(w in err.lower() for w in ("auth", "wrongpass", "password")),
                       f"refused, but not for authentication: {err}")
                print(f"    refused: {err}")
            expect_state(a, RUNNING, "refused pause")

        with step("a caller with only Celery: pause, unpause, suspend, resume a KVM guest"):
            transition("pause", a, PAUSED)
            transition("unpause", a, RUNNING)
            transition("suspend", a, SAVED)
            transition("resume", a, RUNNING)

        with step("transitions queued before Redis is SIGKILLed complete (append-only file)"):
            compose("stop", WORKER)
            queued = [call("send", "pause", a.uuid, "--queue", QUEUE)["task_id"],
                      call("send", "suspend", b.uuid, "--queue", QUEUE)["task_id"]]
            expect(int(redis_cli("-n", "0", "llen", QUEUE)) >= 2, "transitions not queued")
            # appendfsync everysec: a write is on disk within a second; a crash loses at most
            # that second, so the crash comes after it.
            time.sleep(2)
            docker("kill", "-s", "KILL", container("redis"))
            docker("start", container("redis"))
            wait_healthy(["redis"], timeout=90)
            expect(int(redis_cli("-n", "0", "llen", QUEUE)) >= 2,
                   "the queued transitions did not survive the crash")
            compose("start", WORKER)
            results = [call("result", task_id, "--wait", "180")["result"] for task_id in queued]
            expect(all(r["outcome"] == "changed" for r in results), f"results: {results}")
            expect_state(a, PAUSED, "queued pause")
            expect_state(b, SAVED, "queued suspend")
            operator = client.app(port, REDIS_PASSWORD)  # the checker's own: pings only

        with step("docker stop during a managed save: the save finishes, exactly once"):
            wait_until(lambda: operator.control.ping(destination=[NODE], timeout=2),
                       timeout=120, interval=1, message="the worker answering pings")
            worker = container(WORKER)
            grace = int(inspect(worker, "{{.Config.StopTimeout}}") or 10)
            expect(grace >= 60, f"stop grace period {grace}s would cut a save short")
            # The client's own start-up (a fresh interpreter importing Celery) can outlast a
            # tiny guest's save: watch for the save from here while the client sends.
            with ThreadPoolExecutor(1) as pool:
                sending = pool.submit(call, "send", "suspend", c.uuid, "--queue", QUEUE)
                wait_until(lambda: saving_or_saved(c), timeout=60, interval=0.005,
                           message="the managed save running")
                expect(saving_or_saved(c) == "saving",
                       "the save finished before docker stop could interrupt it")
                pending = sending.result()["task_id"]
            stopped_at = time.monotonic()
            docker("stop", worker, timeout=grace + 30)  # no -t: the container's grace period
            took = time.monotonic() - stopped_at
            exit_code = inspect(worker, "{{.State.ExitCode}}")
            expect(exit_code == "0",
                   f"worker exited {exit_code} (137 = killed at the grace period)")
            expect(took < grace, f"docker stop took {took:.1f}s of {grace}s")
            expect_state(c, SAVED, "suspend interrupted by docker stop")
            result = call("result", pending, "--wait", "10")["result"]
            expect(result["outcome"] == "changed", f"suspend result: {result}")
            TIMINGS["docker stop with a save running"] = took
            docker("start", worker)
            wait_until(lambda: operator.control.ping(destination=[NODE], timeout=2),
                       timeout=120, interval=1, message="the worker answering pings")
            wait_until(lambda: redis_cli("-n", "0", "llen", QUEUE) == "0"
                       and redis_cli("-n", "0", "hlen", "unacked") == "0",
                       timeout=60, interval=1, message="nothing queued or unacknowledged")
            saves = [e for e in journal(c) if e.get("action") == "suspend"]
            expect(len(saves) == 1 and saves[0].get("outcome") == "changed",
                   f"journal of {c.name}: {saves}")
            expect_state(c, SAVED, "worker restart")

        with step("every health check healthy again; no secret in any container log"):
            wait_healthy(["redis", WORKER, "flower"], timeout=120)
            secrets = {"REDIS_PASSWORD": REDIS_PASSWORD,
                       "Flower password": FLOWER_AUTH.split(":", 1)[1]}
            texts = {cid: logs(cid) for cid in project_objects()["containers"]}
            texts["compose run dormant"] = "\n".join(RUN_OUTPUTS)
            for where, text in texts.items():
                for name, secret in secrets.items():
                    expect(secret not in text, f"{name} in the log of {where}")
            json_lines = [line for line in texts[container(WORKER)].splitlines()
                          if line.startswith("{")]
            records = [json.loads(line) for line in json_lines]
            expect(any(r.get("logger") == "dormant.transition" for r in records),
                   "no JSON transition record in the worker's log")
    finally:
        tear_down(guests, conn)
    return 0


def tear_down(guests: GuestFactory, conn: libvirt.virConnect) -> None:
    """The test guests, then the stack: ``down -v`` must leave nothing behind."""
    guests.cleanup()
    conn.close()
    with step("compose down -v leaves no container, network or volume"):
        compose("down", "-v", "--remove-orphans", "--timeout", "120")
        left = {k: v for k, v in project_objects().items() if v}
        expect(not left, f"left behind: {left}")
    print("timings:", ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


def entry(check_main: Callable[[], int]) -> None:
    """Run a check as a script: exit 1 with one line when a property is broken."""
    try:
        sys.exit(check_main())
    except (CheckFailed, TimeoutError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    entry(main)
