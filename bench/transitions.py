"""Transition throughput against a no-op Celery task, through one real worker, in one run.

Why this shape: the target (issue 3) is that dormant's own work per transition — idempotency
check, lock, intent, journal, record, two state reads — costs little next to what Celery
already spends on any task with a result. So both workloads go through the *same* worker
process (same broker, result backend, pool and concurrency), sent the same way (batches of
``--guests`` tasks, each batch awaited before the next), alternating A-B-B-A so drift on this
shared machine hits both sides alike.

* transitions: ``--guests`` test-driver guests on libvirtd's ``test+unix:///default`` (one fake
  hypervisor shared by every process, kept alive by this script's open connection), each one
  paused then unpaused per cycle; every result must say ``outcome == "changed"``.
* baseline: ``dormant.ping`` — a real dormant task returning a small dict (it reads the cached
  per-process context), i.e. Celery's own per-task cost with a result.

Run: ``.venv/bin/python -m bench.transitions --pool prefork -c 2`` (see bench/README.md).
``bench/brokers.py`` runs the same measurement on a private RabbitMQ node as the broker too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import redis
from celery import Celery

from tests.support.services import (
    RedisServer,
    WorkerProcess,
    free_port,
    new_workdir,
    test_env,
    unique,
    wait_until,
)

URI = "test+unix:///default"
NAME_PREFIX = "dormant-bench-"
RESULT_TIMEOUT = 120.0  # seconds for one batch; far above what a batch takes
RESULT_KEY_PREFIX = "celery-task-meta-"  # Celery's key-value result backend key


# -- the shared fake hypervisor ------------------------------------------------------------------
class Fleet:
    """Test-driver guests on libvirtd's shared ``test+unix:///default``.

    libvirtd resets that fake hypervisor when its last client disconnects, so this connection
    stays open for the whole run; the guests are destroyed and undefined at the end.
    """

    def __init__(self, count: int) -> None:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.conn = libvirt.open(URI)
        tag = uuid.uuid4().hex[:6]
        self.domains: list[libvirt.virDomain] = []
        for i in range(count):
            xml = (
                f"<domain type='test'><name>{NAME_PREFIX}{tag}-{i:03d}</name>"
                f"<uuid>{uuid.uuid4()}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                "<os><type>hvm</type></os></domain>"
            )
            domain = self.conn.defineXML(xml)
            domain.create()
            self.domains.append(domain)

    @property
    def uuids(self) -> list[str]:
        return [d.UUIDString() for d in self.domains]

    def states(self) -> set[int]:
        return {d.state()[0] for d in self.domains}

    def close(self) -> None:
        for domain in self.domains:
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                domain.undefine()
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()


# -- services -------------------------------------------------------------------------------------
@dataclass
class Client:
    """A plain Celery client (no result backend) plus the result database, for one queue."""

    app: Celery
    results: redis.Redis
    queue: str
    worker: WorkerProcess
    redis_pid: int
    broker_pid: int | None = None  # the RabbitMQ node, when it is the broker
    _pubsub: Any = None

    def listen(self) -> None:
        """Subscribe once to every result the backend publishes (before anything is sent)."""
        self._pubsub = self.results.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(RESULT_KEY_PREFIX + "*")

    def batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Send every call, then wait for all results (a failed task raises here).

        Celery's redis result backend publishes every state it stores on a channel named
        after the result key; one pattern subscription receives them all. Celery's own result
        client instead subscribes per task, which costs this same-machine client more than
        the worker spends on a no-op task, and polling costs more the longer a batch takes;
        both would distort the comparison. A silent second falls back to reading the keys.
        """
        with self.app.producer_or_acquire() as producer:
            ids = [self.app.send_task(name, args=args, queue=self.queue, producer=producer).id
                   for name, args in calls]
        pending = {RESULT_KEY_PREFIX + task_id: n for n, task_id in enumerate(ids)}
        values: list[Any] = [None] * len(ids)
        deadline = time.monotonic() + RESULT_TIMEOUT
        while pending:
            message = self._pubsub.get_message(timeout=1.0)
            if message is not None:
                self._take(pending, values, message["channel"], message["data"])
                continue
            keys = list(pending)
            for key, raw in zip(keys, self.results.mget(keys), strict=True):
                self._take(pending, values, key, raw)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} results missing after {RESULT_TIMEOUT}s")
        return values

    @staticmethod
    def _take(pending: dict[str, int], values: list[Any], key: str, raw: Any) -> None:
        if key not in pending or not raw:
            return
        meta = json.loads(raw)
        if meta.get("status") == "SUCCESS":
            values[pending.pop(key)] = meta["result"]
        elif meta.get("status") in ("FAILURE", "REVOKED"):
            raise RuntimeError(f"task failed: {meta.get('result')}")


@contextlib.contextmanager
def services(pool: str, concurrency: int, broker: Any = None) -> Iterator[Client]:
    """A private redis-server and one ``celery -A tasks worker`` on the shared fake hypervisor;
    ``broker`` is a running tests.support.rabbit.RabbitServer to use as the broker (the
    results and the state stay in the Redis), sent to with publisher confirms as
    docs/production.md tells callers."""
    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-bench-redis-"))
    server.start()
    host = unique("bench-host-")
    broker_url = broker.url() if broker is not None else server.url(0)
    worker = WorkerProcess(
        name=unique("bench"),
        env=test_env(server, host, DORMANT_LIBVIRT_URI=URI, DORMANT_BROKER_URL=broker_url,
                     **_passthrough("DORMANT_LOG_LEVEL", "DORMANT_LOG_JSON", "DORMANT_EVENTS")),
        log_path=server.workdir / "worker.log",
        args=["-P", pool, "-c", str(concurrency)],
    )
    app = server.celery_client("bench-client", results=False, broker=broker_url)
    if broker is not None:
        app.conf.broker_transport_options = {"confirm_publish": True}
    try:
        worker.start()

        def answered() -> bool:
            if not worker.alive():
                raise RuntimeError(f"worker exited:\n{worker.log()[-3000:]}")
            return bool(app.control.ping(destination=[worker.nodename], timeout=0.5))

        wait_until(answered, timeout=60, interval=0.2, message="worker ping")
        print(f"worker log: {worker.log_path}", file=sys.stderr)
        assert server.process is not None
        client = Client(app=app, results=server.client(1), queue=f"dormant.{host}",
                        worker=worker, redis_pid=server.process.pid,
                        broker_pid=broker.beam_pid() if broker is not None else None)
        client.listen()
        yield client
    finally:
        worker.stop()
        app.close()
        server.stop()


def _passthrough(*names: str) -> dict[str, str]:
    return {n: os.environ[n] for n in names if n in os.environ}


# -- workloads ------------------------------------------------------------------------------------
def noop_block(client: Client, *, batches: int, size: int) -> int:
    for _ in range(batches):
        for answer in client.batch([("dormant.ping", [])] * size):
            assert isinstance(answer, dict) and "pid" in answer, answer
    return batches * size


def transition_block(client: Client, fleet: Fleet, *, cycles: int) -> int:
    """``cycles`` x (pause every guest, then unpause every guest); all must change state."""
    done = 0
    for _ in range(cycles):
        for task, expected in (("dormant.pause", "paused"), ("dormant.unpause", "running")):
            for result in client.batch([(task, [u]) for u in fleet.uuids]):
                if result["outcome"] != "changed" or not result["state_after"].startswith(expected):
                    raise AssertionError(f"{task} did not change state: {result}")
                done += 1
    if fleet.states() != {libvirt.VIR_DOMAIN_RUNNING}:
        raise AssertionError(f"guests not all running after the cycles: {fleet.states()}")
    return done


# -- where the CPU goes ---------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _libvirtd_pids() -> list[int]:
    """This machine's libvirtd (its pid file; pgrep would also count one in a container)."""
    from tests.support.journal import libvirtd_pid
    try:
        return [libvirtd_pid()]
    except (OSError, ValueError, RuntimeError):
        return []


def cpu_snapshot(client: Client) -> dict[str, float]:
    """CPU seconds so far of every process on a task's path, by role."""
    assert client.worker.process is not None
    roles = {
        "client": [os.getpid()],
        "redis": [client.redis_pid],
        "worker main": [client.worker.process.pid],
        "pool children": client.worker.children(),
        "libvirtd": _libvirtd_pids(),
    }
    if client.broker_pid is not None:
        roles["rabbitmq"] = [client.broker_pid]
    return {role: sum(_cpu_seconds(p) for p in pids) for role, pids in roles.items()}


@dataclass
class Totals:
    tasks: int = 0
    seconds: float = 0.0
    blocks: list[float] = field(default_factory=list)  # tasks/s of each block
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds

    def add(self, tasks: int, seconds: float, cpu_before: dict[str, float],
            cpu_after: dict[str, float]) -> None:
        self.tasks += tasks
        self.seconds += seconds
        self.blocks.append(tasks / seconds)
        for role, used in cpu_after.items():
            self.cpu[role] = self.cpu.get(role, 0.0) + used - cpu_before.get(role, 0.0)

    def cpu_ms_per_task(self) -> dict[str, float]:
        per = {role: round(used * 1000 / self.tasks, 3) for role, used in self.cpu.items()}
        per["total"] = round(sum(self.cpu.values()) * 1000 / self.tasks, 3)
        return per

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


@contextlib.contextmanager
def profiled(client: Client, out: Path | None, label: str) -> Iterator[None]:
    """With ``out``, sample the worker (and its pool processes) with py-spy during the block.

    Only samples holding the GIL are kept (``--gil``): what the worker spends CPU on.
    """
    if out is None:
        yield
        return
    assert client.worker.process is not None
    spy = shutil.which("py-spy") or "py-spy"
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(client.worker.process.pid), "--subprocesses", "--gil",
         "--nonblocking", "--rate", "250", "--format", "raw", "-o", str(out / f"{label}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let py-spy attach before the block starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def latencies(client: Client, fleet: Fleet, count: int) -> dict[str, dict[str, float]]:
    """Send to result, one task at a time (nothing else queued): ``count`` no-op tasks and
    ``count`` pause/unpause of one guest, alternating; milliseconds, median and 95th
    percentile."""
    times: dict[str, list[float]] = {"noop": [], "transition": []}
    guest = fleet.uuids[0]
    for i in range(count):
        for kind, call in (("noop", ("dormant.ping", [])),
                           ("transition", ("dormant.pause" if i % 2 == 0 else "dormant.unpause",
                                           [guest]))):
            started = time.perf_counter()
            [answer] = client.batch([call])
            times[kind].append((time.perf_counter() - started) * 1000)
            if kind == "transition":
                assert answer["outcome"] == "changed", answer
    return {kind: {"p50": round(statistics.median(ms), 2),
                   "p95": round(statistics.quantiles(ms, n=20)[-1], 2)}
            for kind, ms in times.items()}


def measure(pool: str, concurrency: int, guests: int, cycles: int, rounds: int,
            profile: Path | None = None, *, broker: Any = None,
            latency: int = 0) -> dict[str, Any]:
    fleet = Fleet(guests)
    lat: dict[str, dict[str, float]] = {}
    try:
        with services(pool, concurrency, broker) as client:
            # Warm-up: every pool process/thread opens its Redis and libvirt connections.
            noop_block(client, batches=2, size=guests)
            transition_block(client, fleet, cycles=1)
            noop, trans = Totals(), Totals()
            for r in range(rounds):
                order = ("noop", "trans") if r % 2 == 0 else ("trans", "noop")
                for kind in order:
                    with profiled(client, profile, f"{kind}-{r}"):
                        cpu_before = cpu_snapshot(client)
                        started = time.perf_counter()
                        if kind == "noop":
                            n = noop_block(client, batches=2 * cycles, size=guests)
                        else:
                            n = transition_block(client, fleet, cycles=cycles)
                        elapsed = time.perf_counter() - started
                        (noop if kind == "noop" else trans).add(n, elapsed, cpu_before,
                                                                cpu_snapshot(client))
            if latency:
                lat = latencies(client, fleet, latency)
    finally:
        fleet.close()
    return {
        "broker": "redis" if broker is None else "rabbitmq",
        "latency_ms": lat,
        "pool": pool,
        "concurrency": concurrency,
        "guests": guests,
        "tasks_per_kind": noop.tasks,
        "noop_per_s": round(noop.rate, 1),
        "transition_per_s": round(trans.rate, 1),
        "ratio": round(trans.rate / noop.rate, 3),
        # Each round's two adjacent blocks make a pair; the median pair resists load bursts.
        "ratio_median_of_rounds": round(statistics.median(
            t / n for n, t in zip(noop.blocks, trans.blocks, strict=True)), 3),
        "noop_blocks": [round(b) for b in noop.blocks],
        "transition_blocks": [round(b) for b in trans.blocks],
        "noop_cpu_ms_per_task": noop.cpu_ms_per_task(),
        "transition_cpu_ms_per_task": trans.cpu_ms_per_task(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", "-P", default="prefork", choices=["prefork", "threads", "solo"])
    parser.add_argument("--concurrency", "-c", type=int, default=2)
    parser.add_argument("--guests", type=int, default=100,
                        help="guests, and tasks per awaited batch [100]")
    parser.add_argument("--cycles", type=int, default=5,
                        help="pause+unpause cycles per transition block [5]")
    parser.add_argument("--rounds", type=int, default=4,
                        help="blocks of each kind, alternating A-B-B-A [4]")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record each block with py-spy (raw stacks) into DIR")
    parser.add_argument("--target", type=float, default=0.85,
                        help="exit 1 when the ratio is below this [0.85]")
    opts = parser.parse_args(argv)
    if opts.profile:
        opts.profile.mkdir(parents=True, exist_ok=True)
    res = measure(opts.pool, opts.concurrency, opts.guests, opts.cycles, opts.rounds,
                  opts.profile)
    if opts.json:
        print(json.dumps(res))
    else:
        print(f"pool={res['pool']} -c {res['concurrency']}, {res['guests']} guests, "
              f"{res['tasks_per_kind']} tasks of each kind")
        print(f"  no-op (dormant.ping): {res['noop_per_s']:8.1f} tasks/s  "
              f"blocks {res['noop_blocks']}")
        print(f"  pause/unpause:        {res['transition_per_s']:8.1f} tasks/s  "
              f"blocks {res['transition_blocks']}")
        print(f"  ratio: {res['ratio']:.3f}, median of rounds {res['ratio_median_of_rounds']:.3f}"
              f" (target >= {opts.target})")
        print("  CPU ms per task by process (no-op -> transition):")
        for role, ms in res["noop_cpu_ms_per_task"].items():
            print(f"    {role:14s} {ms:7.3f} -> {res['transition_cpu_ms_per_task'][role]:7.3f}")
    return 0 if res["ratio"] >= opts.target else 1


if __name__ == "__main__":
    sys.exit(main())
