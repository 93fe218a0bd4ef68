"""A private RabbitMQ node for the integration suite and the fault suite, beside the private
redis-server (tests/support/services.py).

Debian's ``rabbitmq-server``, started like redis-server: its own node name, AMQP port,
distribution port, epmd port, Erlang cookie and data directory under a temporary directory,
so it never meets the machine's own node (or another test run's). As root the node runs as
the ``rabbitmq`` user, as Debian's wrapper would (the server refuses directories it cannot
own). A definitions file makes the virtual host ``dormant`` with ``default_queue_type =
quorum`` and a user for it, as docs/production.md tells operators to: then a plain Celery
client's queue declaration matches dormant's quorum queues.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.services import free_port, stop_process, wait_until

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's, without the su wrapper
VHOST = "dormant"
USER = "dormant"
STARTUP_TIMEOUT = 90.0  # ~3 s on a quiet machine; much more while others' tests run


def definitions(*, vhost: str = VHOST, user: str = USER, password: str) -> dict[str, Any]:
    """The virtual host dormant needs (quorum by default) and one user with rights on it."""
    return {
        "vhosts": [{"name": vhost, "metadata": {"default_queue_type": "quorum"}}],
        "users": [{"name": user, "password": password, "tags": ""}],
        "permissions": [{"user": user, "vhost": vhost, "configure": ".*", "write": ".*",
                         "read": ".*"}],
    }


@dataclass
class RabbitServer:
    """One private node; :meth:`kill` is a SIGKILL of the node (beam), :meth:`start` again
    brings it back with its data (quorum queues keep what they confirmed)."""

    port: int
    workdir: Path
    password: str = "dormant-test"
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def nodename(self) -> str:
        return f"dormant{self.port}@localhost"

    def url(self) -> str:
        return f"amqp://{USER}:{self.password}@127.0.0.1:{self.port}/{VHOST}"

    def start(self) -> None:
        if not Path(SERVER).exists():
            raise FileNotFoundError("rabbitmq-server is not installed (scripts/setup.sh "
                                    "installs it)")
        if not self.env:
            self._prepare()
        log = open(self.workdir / "stdout.log", "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [SERVER], env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, **self._as_owner())
        wait_until(self._started, timeout=STARTUP_TIMEOUT, interval=0.2,
                   message=f"rabbitmq-server {self.nodename} on port {self.port} (log in "
                           f"{self.workdir / 'log'})")

    def _prepare(self) -> None:
        home = self.workdir / "home"
        for sub in ("home", "mnesia", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex())
        cookie.chmod(0o400)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "env.conf").write_text("")
        (self.workdir / "definitions.json").write_text(
            json.dumps(definitions(password=self.password)))
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"load_definitions = {self.workdir / 'definitions.json'}\n")
        owner = self._owner()
        if owner is not None:  # the node drops to `rabbitmq`: it must own its directories
            for path in [self.workdir, *self.workdir.rglob("*")]:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LANG": "C.UTF-8", "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()), "ERL_EPMD_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.workdir / "beam.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
        }

    @staticmethod
    def _owner() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("rabbitmq")
        except KeyError:
            return None

    def _as_owner(self) -> dict[str, Any]:
        owner = self._owner()
        if owner is None:
            return {}
        return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}

    def _started(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited ({self.process.returncode}): "
                               f"{self.log()[-3000:]}")
        return self.answers()

    def answers(self) -> bool:
        """The node accepts dormant's user on its virtual host."""
        if not self.alive():
            return False
        from kombu import Connection

        try:
            with Connection(self.url(), connect_timeout=1) as conn:
                conn.connect()
            return True
        except Exception:
            return False

    def log(self) -> str:
        parts = []
        for path in [self.workdir / "stdout.log", *sorted((self.workdir / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def beam_pid(self) -> int | None:
        """The node's own process (the Erlang VM), from its pid file."""
        try:
            return int((self.workdir / "beam.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the node (a clean stop), then its private epmd."""
        if self.process is not None:
            pid = self.beam_pid()
            if pid is not None and self.process.poll() is None:
                try:
                    os.kill(pid, signal.SIGTERM)
                    self.process.wait(30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            stop_process(self.process)
        self._stop_epmd()

    def kill(self) -> None:
        """SIGKILL of the node: what a crash (or the OOM killer) does."""
        pid = self.beam_pid()
        if pid is not None and self.alive():
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)

    def _stop_epmd(self) -> None:
        epmd = shutil.which("epmd")
        port = self.env.get("ERL_EPMD_PORT")
        if epmd and port:
            subprocess.run([epmd, "-port", port, "-kill"], capture_output=True, check=False,
                           timeout=10)

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl`` against this node (its cookie and epmd port), as the node's user;
        its output. ~1 s a call: it boots an Erlang VM of its own."""
        done = subprocess.run(
            [str(Path(SERVER).with_name("rabbitmqctl")), "-n", self.nodename, "-q", *args],
            env=self.env, cwd=self.workdir, capture_output=True, text=True, check=False,
            timeout=120, **self._as_owner())
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr[-2000:]}")
        return done.stdout

    def queues(self) -> dict[str, dict[str, str]]:
        """Every queue of dormant's virtual host: name -> type, ready, unacked."""
        out = self.ctl("list_queues", "-p", VHOST, "--no-table-headers", "name", "type",
                       "messages_ready", "messages_unacknowledged")
        rows = (line.split("\t") for line in out.splitlines() if line.strip())
        return {name: {"type": kind, "ready": ready, "unacked": unacked}
                for name, kind, ready, unacked in rows}

    def depth(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue, by a passive declare."""
        from kombu import Connection

        with Connection(self.url()) as conn:
            ok = conn.default_channel.queue_declare(queue, passive=True)  # type: ignore[attr-defined]
            return int(ok.message_count), int(ok.consumer_count)

    def delete_queue(self, queue: str) -> None:
        from kombu import Connection

        with Connection(self.url()) as conn:
            conn.default_channel.queue_delete(queue)  # type: ignore[attr-defined]
