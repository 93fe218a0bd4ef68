"""A replicated Redis on this machine: a master, a replica and three ``redis-sentinel`` processes.

What operators run instead of one Redis (docs/production.md, docker-compose.sentinel.yml),
started on free loopback ports in temporary directories, so a test or the fault suite can
SIGKILL the master, watch Sentinel promote the replica, and bring the old master back (it
returns as a replica of the new one: Sentinel reconfigures it). Every process started here
is stopped by :meth:`SentinelGroup.stop`; nothing else is touched.

Timings are Sentinel's, set in each sentinel's configuration (``down_after_ms``): Sentinel
itself defaults to 30 s before it even suspects a master; docs/operations.md recommends 5 s,
which is what the harness uses unless told otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.services import (
    RedisServer,
    free_port,
    new_workdir,
    stop_process,
    test_env,
    wait_until,
)

MASTER_NAME = "dormant"


def pid_of(server: RedisServer) -> int:
    """The server's pid as the server reports it (``INFO server``), never from ``pgrep``."""
    return int(server.client().info("server")["process_id"])


@dataclass
class SentinelProcess:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_timeout=2, socket_connect_timeout=2)

    def start(self, master_port: int, *, down_after_ms: int, failover_timeout_ms: int,
              password: str | None) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise FileNotFoundError("redis-sentinel is not installed (scripts/setup.sh "
                                    "installs Debian's redis-sentinel)")
        config = self.workdir / "sentinel.conf"  # Sentinel rewrites it: its own copy
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.workdir}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if password:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {password}")
        config.write_text("\n".join(lines) + "\n")
        log = open(self.workdir / "sentinel.log", "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen([binary, str(config)], stdout=log,
                                        stderr=subprocess.STDOUT)

    def master(self) -> tuple[str, int] | None:
        """The master this sentinel names now, or None (unreachable, or no answer yet)."""
        try:
            found = self.client().sentinel_get_master_addr_by_name(MASTER_NAME)
        except redis.RedisError:
            return None
        return (str(found[0]), int(found[1])) if found else None

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)


@dataclass
class SentinelGroup:
    """Master, replica and three sentinels; :attr:`servers` by port, whatever their role now."""

    down_after_ms: int = 5000
    failover_timeout_ms: int = 30000
    password: str | None = None
    persist: bool = True  # append-only files: a killed server comes back with its data
    servers: dict[int, RedisServer] = field(default_factory=dict)
    sentinels: list[SentinelProcess] = field(default_factory=list)

    def start(self) -> SentinelGroup:
        # A full resynchronisation starts at once rather than after Redis's 5 s of waiting for
        # more replicas (at start, and when a returning master becomes a replica).
        quick_sync = ["--repl-diskless-sync-delay", "0"]
        master = RedisServer(port=free_port(), workdir=new_workdir("dormant-sentinel-m-"),
                             persist=self.persist, password=self.password, extra_args=quick_sync)
        master.start()
        replica = RedisServer(port=free_port(), workdir=new_workdir("dormant-sentinel-r-"),
                              persist=self.persist, password=self.password,
                              extra_args=[*quick_sync, "--replicaof", "127.0.0.1",
                                          str(master.port)])
        replica.start()
        self.servers = {master.port: master, replica.port: replica}
        wait_until(lambda: self._replica_in_sync(replica), timeout=30,
                   message="the replica has synchronised")
        for _ in range(3):
            sentinel = SentinelProcess(port=free_port(), workdir=new_workdir("dormant-sentinel-s-"))
            sentinel.start(master.port, down_after_ms=self.down_after_ms,
                           failover_timeout_ms=self.failover_timeout_ms, password=self.password)
            self.sentinels.append(sentinel)
        wait_until(self._settled, timeout=30, interval=0.2,
                   message="three sentinels agree on the master and see its replica")
        return self

    def _settled(self) -> bool:
        for sentinel in self.sentinels:
            try:
                state = sentinel.client().sentinel_master(MASTER_NAME)
            except redis.RedisError:
                return False
            if state.get("num-other-sentinels", 0) < 2 or state.get("num-slaves", 0) < 1:
                return False
        return True

    # -- addresses --------------------------------------------------------------------------
    def url(self, db: int) -> str:
        """The Celery/kombu spelling: ``sentinel://[:password@]host:port/db`` per sentinel,
        joined by ``;`` (the password is the master's; DORMANT_SENTINEL_PASSWORD is the
        sentinels' own, unset here)."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}/{db}" for s in self.sentinels)

    def master_port(self) -> int | None:
        """The master port a majority of reachable sentinels name (None while they differ)."""
        named = [m for s in self.sentinels if (m := s.master()) is not None]
        for candidate in set(named):
            if named.count(candidate) >= 2:
                return candidate[1]
        return None

    def master(self) -> RedisServer:
        port = wait_until(self.master_port, timeout=30, interval=0.1,
                          message="the sentinels name a master")
        return self.servers[port]

    def replication(self, server: RedisServer) -> tuple[str, int]:
        """(role, connected replicas) of one server; ("down", 0) when it does not answer."""
        try:
            info = server.client().info("replication")
        except redis.RedisError:
            return "down", 0
        return str(info["role"]), int(info.get("connected_slaves", 0))

    def client(self, db: int = 0) -> redis.Redis:
        """A plain client of the master now (for the harness's own reads)."""
        return self.master().client(db)

    # -- faults -----------------------------------------------------------------------------
    def kill_master(self) -> tuple[RedisServer, float]:
        """SIGKILL the master; returns it and the monotonic time of the kill."""
        master = self.master()
        master.kill()
        return master, time.monotonic()

    def wait_failover(self, old: RedisServer, timeout: float = 60) -> RedisServer:
        """The promoted server, once the sentinels name it and it answers as a master."""
        def promoted() -> RedisServer | None:
            port = self.master_port()
            if port is None or port == old.port:
                return None
            server = self.servers[port]
            return server if self.replication(server)[0] == "master" else None

        return wait_until(promoted, timeout=timeout, interval=0.1,
                          message=f"a replica promoted in place of port {old.port}")

    def bring_back(self, server: RedisServer, timeout: float = 60) -> None:
        """Start a killed server again and wait until Sentinel has made it a synchronised
        replica of the current master (it starts as a master with its old data)."""
        server.start()
        wait_until(lambda: self._replica_in_sync(server), timeout=timeout, interval=0.2,
                   message=f"port {server.port} back as a replica")

    def _replica_in_sync(self, server: RedisServer) -> bool:
        try:
            info = server.client().info("replication")
        except redis.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers.values():
            server.stop()


def sentinel_env(group: SentinelGroup, host: str, **overrides: str | None) -> dict[str, str]:
    """A dormant process's environment with broker, results and state behind the sentinels."""
    return test_env(group.master(), host, **{
        "DORMANT_BROKER_URL": group.url(0), "DORMANT_RESULT_BACKEND": group.url(1),
        "DORMANT_STATE_URL": group.url(2), "DORMANT_SENTINEL_MASTER": MASTER_NAME,
        **overrides})


sentinel_env.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test
