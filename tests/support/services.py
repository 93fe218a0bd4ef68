"""Real services for the integration suite: a private redis-server and Celery worker processes.

Nothing here touches the developer's own Redis (a free loopback port, a temporary directory)
and every process started is stopped, its log kept for the failing test's report.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout:g}s")
        time.sleep(interval)


def answers_ping(app: Celery, nodename: str, timeout: float = 0.5) -> bool:
    """Whether a worker answers a broadcast ping; False (not yet) when the broker connection
    fails: a pooled connection to a broker that was restarted meanwhile fails once (kombu
    keeps one per URL for the whole process), the next call reconnects."""
    from kombu.exceptions import OperationalError

    try:
        return bool(app.control.ping(destination=[nodename], timeout=timeout))
    except (OSError, OperationalError, *app.connection_for_write().connection_errors):
        return False


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class RedisServer:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    password: str | None = None
    persist: bool = False  # append-only file, fsync always: the data survives a kill -9
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--replicaof", "127.0.0.1", "6379"]

    def url(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), decode_responses=True)

    def celery_client(self, main: str = "client", *, results: bool = True,
                      broker: str | None = None) -> Celery:
        """A Celery app as a caller outside dormant has it: broker, backend, JSON, task names.

        It imports nothing from dormant, so it proves the contract holds for any client.
        ``broker`` is another broker's URL (a private RabbitMQ: tests/support/rabbit.py);
        the results stay in this Redis.
        """
        app = Celery(main, broker=broker or self.url(0),
                     backend=self.url(1) if results else None)
        app.conf.update(task_serializer="json", result_serializer="json",
                        accept_content=["json"], result_accept_content=["json"],
                        broker_connection_retry_on_startup=True)
        return app

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (scripts/setup.sh installs it)")
        aof = ["yes", "--appendfsync", "always"] if self.persist else ["no"]
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", *aof, "--dir", str(self.workdir), "--databases", "16"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        args += self.extra_args
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, timeout=10, message=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL (kill -9): what a crash does; with ``persist`` nothing written is lost."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def flush(self) -> None:
        self.client().flushall()


@dataclass
class WorkerProcess:
    """``celery -A tasks worker`` in its own process group."""

    name: str
    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def nodename(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def start(self) -> None:
        command = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "info",
                   "-n", self.nodename, "--without-gossip", "--without-mingle", *self.args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        """Pids of the prefork pool's child processes (not the event pump, worker/drift/pump.py)."""
        if not self.process:
            return []
        try:
            out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True,
                                 text=True, check=False).stdout
        except FileNotFoundError:
            return []
        return [int(pid) for pid in out.split() if not _event_pump(int(pid))]

    def stop(self, timeout: float = 20) -> None:
        if not self.alive():
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool) at once."""
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _event_pump(pid: int) -> bool:
    try:
        return b"worker.drift.pump" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_env(redis_server: RedisServer, host: str,
             **overrides: str | None) -> dict[str, str]:
    """Environment for a dormant process talking to the private Redis and local libvirtd
    (an override of None leaves that variable unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DORMANT_")}
    env.update(
        DORMANT_BROKER_URL=redis_server.url(0),
        DORMANT_RESULT_BACKEND=redis_server.url(1),
        DORMANT_STATE_URL=redis_server.url(2),
        DORMANT_LIBVIRT_URI="qemu:///system",
        DORMANT_HOST=host,
        DORMANT_REGISTRY_INTERVAL="5",
        PYTHONUNBUFFERED="1",
    )
    merged: dict[str, str | None] = {**env, **overrides}
    return {k: v for k, v in merged.items() if v is not None}  # None: leave the variable unset


test_env.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


def new_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"
