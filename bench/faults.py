"""The fault suite: each scenario on real parts, one table of figures (bench/RESULTS.md, "Faults").

Real parts: a private redis-server (append-only file, so a kill -9 loses nothing written), a
private rabbitmq-server node (tests/support/rabbit.py), ``celery -A tasks worker`` processes
with default settings (only the URLs and the host name set), tiny KVM guests on the local
libvirtd (``qemu:///system``), which two scenarios kill or stop — those take
``/tmp/dormant-libvirtd.lock`` themselves (do not wrap this in ``flock``).

Scenarios about delivery (a killed worker, a killed broker, duplicates, malformed or pickled
messages) run once per broker: Redis, then RabbitMQ with quorum queues. The state store and
the result backend are the Redis in both. Scenarios about libvirt run once, on Redis.
The ``failover-*`` scenarios (bench/failover.py) bring their own replicated Redis: a master,
a replica and three ``redis-sentinel`` processes, whose master they SIGKILL.
"save directory fills mid-drain" also boots real Linux guests and loop-mounts a small ext4
that their save images are routed to (tests/support/save_dir.py; root, always unmounted) and
sets only the save directory, a 16 MiB reserve floor and the drain's scope besides.

Run: ``make faults`` (full) or ``make faults FAULTS_QUICK=1`` (the reduced CI version), or
``.venv/bin/python -m bench.faults [--quick] [--only NAME ...] [--brokers redis rabbitmq]``.
Exit 1 when a scenario's verdict is not ok.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from bench import failover
from tests.support.guests import GuestFactory, TestGuest, remove_leftovers
from tests.support.journal import (
    libvirtd_pid,
    real_state,
    revive,
    saving,
    start_libvirtd,
)
from tests.support.rabbit import RabbitServer
from tests.support.services import (
    ROOT,
    RedisServer,
    WorkerProcess,
    answers_ping,
    free_port,
    new_workdir,
    test_env,
    unique,
    wait_until,
)
from worker.store import keys

URI = "qemu:///system"
LIBVIRTD_LOCK = "/tmp/dormant-libvirtd.lock"
STATE_DB = 2
BROKERS = ("redis", "rabbitmq")
BROKER_NAMES = {"redis": "Redis", "rabbitmq": "RabbitMQ"}
# Connection errors a client may meet from before a broker restart (a pooled connection).
CONNECTION_LOST = (libvirt.libvirtError, redis.ConnectionError, OperationalError, OSError)


@dataclass
class Row:
    scenario: str
    runs: int
    ok: bool
    figures: str
    details: dict[str, Any] = field(default_factory=dict)
    broker: str = ""


@contextlib.contextmanager
def libvirtd_lock() -> Iterator[None]:
    """Only one process at a time restarts or stops the shared libvirtd."""
    with open(LIBVIRTD_LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Suite:
    """A private Redis, a private RabbitMQ node (when asked for), a guest factory and the
    worker processes of one scenario at a time; ``broker`` is the one scenarios use now."""

    def __init__(self, workdir: Path, brokers: tuple[str, ...] = ("redis",)) -> None:
        self.workdir = workdir
        self.broker = brokers[0]
        self.redis = RedisServer(port=free_port(), workdir=new_workdir("dormant-faults-"),
                                 persist=True)
        self.rabbit: RabbitServer | None = None
        self.workers: list[WorkerProcess] = []
        try:
            self.redis.start()
            if "rabbitmq" in brokers:
                self.rabbit = RabbitServer(port=free_port(),
                                           workdir=new_workdir("dormant-faults-rabbit-"))
                self.rabbit.start()
            libvirt.registerErrorHandler(lambda _c, _e: None, None)
            self.conn = libvirt.open(URI)
            remove_leftovers(self.conn)  # fails when someone restarts libvirtd just then
            self.guests = GuestFactory(self.conn)
        except BaseException:
            self._stop_servers()
            raise

    def broker_url(self) -> str:
        if self.broker == "rabbitmq":
            assert self.rabbit is not None
            return self.rabbit.url()
        return self.redis.url(0)

    def env(self, host: str, **overrides: str) -> dict[str, str]:
        """A dormant process's environment: this suite's broker, state store, results."""
        return test_env(self.redis, host, **{"DORMANT_BROKER_URL": self.broker_url(),
                                             **overrides})

    def client(self) -> Celery:
        """A plain Celery caller; on RabbitMQ with publisher confirms (docs/production.md):
        a send returns once the broker holds the message."""
        app = self.redis.celery_client("faults", broker=self.broker_url())
        if self.broker == "rabbitmq":
            app.conf.broker_transport_options = {"confirm_publish": True}
        return app

    def worker(self, host: str, *, pool: str = "threads", concurrency: int = 4,
               env: dict[str, str] | None = None, wait: bool = True) -> WorkerProcess:
        name = unique("f")
        worker = WorkerProcess(name=name, env=self.env(host, **(env or {})),
                               log_path=self.workdir / f"{name}.log",
                               args=["-P", pool, "-c", str(concurrency)])
        worker.start()
        self.workers.append(worker)
        if wait:
            self.wait_ping(worker)
        return worker

    def wait_ping(self, worker: WorkerProcess, timeout: float = 90) -> None:
        app = self.client()
        try:
            wait_until(lambda: worker.alive() and answers_ping(app, worker.nodename),
                       timeout=timeout, interval=0.2, message=f"{worker.nodename} answers ping")
        finally:
            app.close()

    def new_guest(self, kind: str = "idle") -> TestGuest:
        """A tiny guest; the connection is revived first (others restart libvirtd too)."""
        revive(self.conn)
        return self.guests.create(kind)

    def dom(self, guest: TestGuest) -> libvirt.virDomain:
        """A handle valid now (libvirtd may have been restarted by someone else)."""
        revive(self.conn)
        return self.conn.lookupByUUIDString(guest.uuid)

    def state_of(self, guest: TestGuest) -> str:
        """The guest's real state through a fresh handle."""
        return real_state(self.dom(guest))

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def state(self) -> Any:
        return self.redis.client(STATE_DB)

    def journal(self, instance: str) -> list[dict[str, Any]]:
        return [json.loads(f["entry"]) for _id, f in self.state().xrange(keys.journal(instance))]

    def results(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Finished results by task id, read from the result backend's keys directly."""
        client = self.redis.client(1)
        out = {}
        for task_id, raw in zip(ids, client.mget([f"celery-task-meta-{i}" for i in ids]),
                                strict=True):
            if raw:
                meta = json.loads(raw)
                if meta.get("status") in {"SUCCESS", "FAILURE"}:
                    out[task_id] = meta
        return out

    def wait_results(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.results(ids)
            if len(got) == len(ids) or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def close(self) -> None:
        self.stop_workers()
        revive(self.conn)
        self.guests.cleanup()
        self._stop_servers()

    def _stop_servers(self) -> None:
        self.redis.stop()
        if self.rabbit is not None:
            self.rabbit.stop()


def _suspended_once(suite: Suite, guest: TestGuest, rid: str) -> bool:
    changed = [e for e in suite.journal(guest.uuid)
               if e.get("request_id") == rid and e["outcome"] == "changed"]
    return suite.state_of(guest) == "suspended" and len(changed) == 1


# -- scenarios --------------------------------------------------------------------------------
def kill_threads_worker(suite: Suite, rounds: int) -> Row:
    """SIGKILL a whole threads worker mid-managedSave; a new worker for the host finishes it."""
    host = unique("faults-kt-")
    worker = suite.worker(host)
    app = suite.client()
    after_up, after_kill, good = [], [], 0
    current = {"worker": worker}  # the live worker of the host, also across a retried round
    for _ in range(rounds):
        up_s, kill_s, ok = _retried(lambda: _kill_threads_round(suite, app, host, current))
        after_up.append(up_s)
        after_kill.append(kill_s)
        good += ok
    app.close()
    suite.stop_workers()
    return Row("SIGKILL threads worker mid-managedSave (defaults)", rounds, good == rounds,
               f"{good}/{rounds} suspended once; done {statistics.median(after_up):.1f} s "
               f"(max {max(after_up):.1f}) after the new worker was up, "
               f"{statistics.median(after_kill):.1f} s after the kill")


def _retried(fn: Callable[[], Any], attempts: int = 3) -> Any:
    """One round again when someone else restarted the shared libvirtd under it."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except libvirt.libvirtError as exc:
            if attempt == attempts:
                raise
            print(f"   round interrupted ({exc}); once more", file=sys.stderr)
    raise AssertionError("unreachable")


def _kill_threads_round(suite: Suite, app: Celery, host: str,
                        current: dict[str, WorkerProcess]) -> tuple[float, float, bool]:
    guest = suite.new_guest("idle")
    rid = unique("kill-")
    sent = app.send_task("dormant.suspend", args=[guest.uuid], kwargs={"request_id": rid},
                         queue=f"dormant.{host}")
    wait_until(lambda: saving(suite.dom(guest)), timeout=30, interval=0.01)
    killed = time.monotonic()
    current["worker"].kill()
    current["worker"] = suite.worker(host)
    up = time.monotonic()
    got = suite.wait_results([sent.id], timeout=180)
    done = time.monotonic()
    return done - up, done - killed, bool(got) and _suspended_once(suite, guest, rid)


def kill_prefork_child(suite: Suite, rounds: int) -> Row:
    """SIGKILL the prefork child running a managedSave; the same worker redoes it."""
    host = unique("faults-kp-")
    worker = suite.worker(host, pool="prefork", concurrency=1)
    app = suite.client()
    after_kill, good = [], 0
    def one_round() -> tuple[float, bool]:
        guest = suite.new_guest("idle")
        rid = unique("kill-")
        wait_until(lambda: len(worker.children()) == 1, timeout=30)
        [child] = worker.children()
        sent = app.send_task("dormant.suspend", args=[guest.uuid], kwargs={"request_id": rid},
                             queue=f"dormant.{host}")
        wait_until(lambda: saving(suite.dom(guest)), timeout=30, interval=0.01)
        killed = time.monotonic()
        os.kill(child, signal.SIGKILL)
        got = suite.wait_results([sent.id], timeout=180)
        return time.monotonic() - killed, bool(got) and _suspended_once(suite, guest, rid)

    for _ in range(rounds):
        took, ok = _retried(one_round)
        after_kill.append(took)
        good += ok
    app.close()
    suite.stop_workers()
    return Row("SIGKILL prefork child mid-managedSave (defaults)", rounds, good == rounds,
               f"{good}/{rounds} suspended once; done {statistics.median(after_kill):.1f} s "
               f"(max {max(after_kill):.1f}) after the kill")


def broker_kill(suite: Suite, count: int) -> Row:
    """kill -9 of the broker half-way through a run of transitions; started again 2 s later.

    Redis (AOF, fsync always) is also the state store and result backend: the whole of Redis
    goes. RabbitMQ: the node (its quorum queues) goes; the state Redis stays. Nothing is
    resent on RabbitMQ; on Redis what is unanswered 2 minutes after the outage is resent with
    the same request id, as docs/operations.md tells callers to (kombu's BRPOP window).
    """
    host = unique("faults-bk-")
    suite.worker(host, concurrency=8)
    fleet = [suite.new_guest("idle") for _ in range(10)]
    app = suite.client()
    queue = f"dormant.{host}"
    sent: dict[str, tuple[str, list[str]]] = {}  # task id -> request id, args
    started = time.monotonic()
    for i in range(count):
        guest = fleet[i % len(fleet)]
        target = ("paused", "running")[(i // len(fleet)) % 2]
        rid = f"bk-{i}-{uuid.uuid4().hex[:6]}"
        args = [guest.uuid, target]
        sent[app.send_task("dormant.ensure", args=args, kwargs={"request_id": rid},
                           queue=queue).id] = (rid, args)
    ids = list(sent)
    wait_until(lambda: len(suite.results(ids)) >= count // 2, timeout=120, interval=0.05)
    done_at_kill = len(suite.results(ids))
    server: RedisServer | RabbitServer = suite.redis if suite.broker == "redis" else suite.rabbit  # type: ignore[assignment]
    server.kill()
    killed = time.monotonic()
    time.sleep(2)  # the outage
    server.start()
    back = time.monotonic()
    # Redis: orphans come back through the workers' sweep (at most ~90 s with its defaults).
    got = suite.wait_results(ids, timeout=120)
    recovered = time.monotonic() - back
    missing = [t for t in sent if t not in got]
    unanswered = len(missing)
    where: Counter[str] = Counter()
    resent: dict[str, str] = {}
    if suite.broker == "redis" and missing:
        # What is still unanswered was lost in kombu's BRPOP window (docs/operations.md): the
        # caller sends it again with the same request id, as the docs tell callers to.
        broker = suite.redis.client(0)
        queued = {json.loads(m)["headers"]["id"] for m in broker.lrange(queue, 0, -1)}
        unacked = {json.loads(m)[0]["headers"]["id"] for m in broker.hvals("unacked")}
        where = Counter("queued" if t in queued else "unacked" if t in unacked else "nowhere"
                        for t in missing)
        resent = {app.send_task("dormant.ensure", args=args, kwargs={"request_id": rid},
                                queue=queue).id: tid
                  for tid, (rid, args) in sent.items() if tid in missing}
    elif missing:
        assert suite.rabbit is not None
        where = Counter({"ready in the queue": suite.rabbit.depth(queue)[0]})
    app.close()
    if resent:
        got.update({resent[t]: m for t, m in suite.wait_results(list(resent), 120).items()})
    took = time.monotonic() - started
    lost = count - len(got)
    failed = sum(1 for m in got.values() if m["status"] != "SUCCESS")
    doubled = retried = 0
    by_rid: Counter[str] = Counter()
    for guest in fleet:
        for entry in suite.journal(guest.uuid):
            if entry["outcome"] in {"changed", "already"}:
                by_rid[entry["request_id"]] += 1
            retried += entry["outcome"] == "retrying"
    doubled = sum(1 for n in by_rid.values() if n > 1)
    # Deliveries answered from their request's record: redeliveries of transitions that had
    # run (Celery keeps the first SUCCESS in the backend, so only the worker's log shows them).
    duplicates = sum(w.log().count("'outcome': 'duplicate'") for w in suite.workers)
    suite.stop_workers()
    ok = lost == 0 and doubled == 0 and failed == 0
    if suite.broker == "rabbitmq":
        ok = ok and unanswered == 0  # the target: nothing lost without any resend
        resend = "no resend"
    else:
        resend = (f"{unanswered} unanswered 2 min after the outage {dict(where)}, answered "
                  "after a resend with the same request id" if unanswered
                  else "none unanswered, no resend needed")
    what = "Redis kill -9 mid-run" if suite.broker == "redis" else \
        "RabbitMQ node kill -9 mid-run"
    return Row(what, count, ok,
               f"{len(got)}/{count} results, {lost} lost, {doubled} executed twice, "
               f"{failed} failed; {done_at_kill} done at the kill; {resend}"
               f"{'' if not unanswered or suite.broker == 'redis' else f' {dict(where)}'}; "
               f"{retried} retried attempts, {duplicates} delivered again and answered from their "
               f"record (duplicate); broker down "
               f"{back - killed:.1f} s, all answered {recovered:.1f} s after it was back; "
               f"{took:.1f} s in all",
               details={"unanswered": unanswered, "recovered_s": recovered})


def libvirtd_kill_bulk(suite: Suite, guests: int) -> Row:
    """SIGKILL libvirtd 1 s into a bulk suspend of 6 guests; start it again 3 s later."""
    host = unique("faults-lk-")
    suite.worker(host, concurrency=8)
    fleet = [suite.new_guest("idle") for _ in range(guests)]
    app = suite.client()
    with libvirtd_lock():
        sent = time.monotonic()
        ids = [app.send_task("dormant.suspend", args=[g.uuid], queue=f"dormant.{host}").id
               for g in fleet]
        app.close()
        time.sleep(1)
        done_before = len(suite.results(ids))
        os.kill(libvirtd_pid(), signal.SIGKILL)
        time.sleep(3)
        start_libvirtd()
        back = time.monotonic()
    revive(suite.conn)
    got = suite.wait_results(ids, timeout=300)
    took = time.monotonic() - back
    total = time.monotonic() - sent
    states = Counter(suite.state_of(g) for g in fleet)
    outcomes = Counter(m["result"]["outcome"] if m["status"] == "SUCCESS" else m["status"]
                       for m in got.values())
    attempts = [m["result"]["attempts"] for m in got.values() if m["status"] == "SUCCESS"]
    suite.stop_workers()
    ok = states.get("suspended", 0) == guests and len(got) == guests
    return Row("libvirtd SIGKILL 1 s into a bulk suspend, back 3 s later", guests, ok,
               f"{done_before} finished before the kill; {states.get('suspended', 0)}/{guests} "
               f"suspended, outcomes {dict(outcomes)}, attempts {sorted(attempts)}; all done "
               f"{total:.1f} s after sending ({max(took, 0):.1f} s after libvirtd answered)")


def _pause_unpause_latency(app: Celery, a: TestGuest, b: TestGuest, queue: str) -> list[float]:
    times = []
    for _round in range(5):
        for task in ("dormant.pause", "dormant.unpause"):
            for guest in (a, b):
                started = time.monotonic()
                result = app.send_task(task, args=[guest.uuid], queue=queue).get(timeout=60)
                assert result["outcome"] == "changed", result
                times.append(time.monotonic() - started)
    return times


def stuck_domain(suite: Suite) -> Row:
    """One guest's QEMU SIGSTOPped while 20 pause/unpause run on two other guests."""
    host = unique("faults-sd-")
    queue = f"dormant.{host}"
    suite.worker(host, concurrency=4)
    stuck, a, b = (suite.new_guest("idle") for _ in range(3))
    app = suite.client()
    try:  # warm-up; a client pool may still hold a connection from before a Redis restart
        _pause_unpause_latency(app, a, b, queue)
    except CONNECTION_LOST:
        app.close()
        app = suite.client()
        _pause_unpause_latency(app, a, b, queue)
    alone = _pause_unpause_latency(app, a, b, queue)
    qemu = int(Path(f"/run/libvirt/qemu/{stuck.name}.pid").read_text())
    os.kill(qemu, signal.SIGSTOP)
    try:
        sent = time.monotonic()
        blocked = app.send_task("dormant.pause", args=[stuck.uuid], queue=queue)
        beside = _pause_unpause_latency(app, a, b, queue)

        def abandoned() -> dict[str, Any] | None:
            return next((e for e in suite.journal(stuck.uuid)
                         if e.get("error_type") == "HypervisorBusy"), None)

        entry = wait_until(abandoned, timeout=120, interval=0.2)
        busy_after = time.monotonic() - sent
    finally:
        os.kill(qemu, signal.SIGCONT)
    final = blocked.get(timeout=300)
    app.close()
    suite.stop_workers()
    ratio = statistics.median(beside) / statistics.median(alone)
    ok = ratio < 3 and max(beside) < 5 and final["outcome"] == "changed"
    return Row("one stuck domain (QEMU SIGSTOP) beside 20 transitions", 20, ok,
               f"median {statistics.median(alone) * 1000:.0f} ms alone vs "
               f"{statistics.median(beside) * 1000:.0f} ms beside it (x{ratio:.2f}, max "
               f"{max(beside) * 1000:.0f} ms); stuck pause: HypervisorBusy after "
               f"{busy_after:.1f} s ({entry.get('lock')}), then {final['outcome']} after SIGCONT")


def _scrape(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return None
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _health(suite: Suite, host: str) -> int:
    env = suite.env(host)
    done = subprocess.run([str(ROOT / ".venv/bin/dormant"), "health", "--timeout", "5"],
                          env=env, capture_output=True, check=False, timeout=60)
    return done.returncode


def libvirtd_sigstop(suite: Suite, seconds: float = 20) -> Row:
    """libvirtd SIGSTOPped for 20 s while transitions are sent: visible, then all finish."""
    host = unique("faults-ls-")
    port = free_port()
    suite.worker(host, concurrency=4, env={"DORMANT_METRICS_PORT": str(port)})
    fleet = [suite.new_guest("idle") for _ in range(4)]
    app = suite.client()
    healthy_before = _health(suite, host)
    with libvirtd_lock():
        pid = libvirtd_pid()
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            ids = [app.send_task("dormant.pause", args=[g.uuid], queue=f"dormant.{host}").id
                   for g in fleet]
            time.sleep(seconds / 2)
            health_during = _health(suite, host)
            in_flight = _scrape(port, "dormant_libvirt_calls_in_flight")
            oldest = _scrape(port, "dormant_libvirt_oldest_call_seconds")
            scraped_at = time.monotonic() - stopped
            time.sleep(max(0.0, seconds - (time.monotonic() - stopped)))
        finally:
            os.kill(pid, signal.SIGCONT)
        back = time.monotonic()
    suite.wait_results(ids, timeout=300)
    took = time.monotonic() - back
    paused = sum(suite.state_of(g) == "paused(user)" for g in fleet)
    app.close()
    suite.stop_workers()
    ok = healthy_before == 0 and health_during != 0 and paused == len(fleet)
    return Row(f"libvirtd SIGSTOPped {seconds:g} s", len(fleet), ok,
               f"health exit {healthy_before} before, {health_during} during; in flight "
               f"{in_flight:g}, oldest {oldest:.1f} s, {scraped_at:.0f} s into the stop; {paused}/"
               f"{len(fleet)} paused, all done {took:.1f} s after SIGCONT"
               if in_flight is not None and oldest is not None else "metrics unavailable")


def duplicate_sends(suite: Suite, count: int) -> Row:
    """The same request id sent many times: one save, one journal entry, the rest duplicates."""
    host = unique("faults-dup-")
    suite.worker(host, concurrency=8)
    guest = suite.new_guest("idle")
    app = suite.client()
    rid = unique("dup-")
    ids = [app.send_task("dormant.suspend", args=[guest.uuid], kwargs={"request_id": rid},
                         queue=f"dormant.{host}").id for _ in range(count)]
    app.close()
    got = suite.wait_results(ids, timeout=600)
    outcomes = Counter(m["result"]["outcome"] if m["status"] == "SUCCESS" else m["status"]
                       for m in got.values())
    entries = [e for e in suite.journal(guest.uuid) if e["outcome"] in {"changed", "already"}]
    suite.stop_workers()
    ok = outcomes.get("changed") == 1 and outcomes.get("duplicate") == count - 1 \
        and len(entries) == 1 and suite.state_of(guest) == "suspended"
    return Row("duplicate sends of one request id", count, ok,
               f"{dict(outcomes)}; {len(entries)} journal entry, 1 save")


def _fuzz_call(rng: random.Random, guest: TestGuest) -> tuple[str, list[Any], dict[str, Any]]:
    junk: list[Any] = [None, 0, -1, 1e308, True, [], {}, [guest.uuid], {"a": 1}, "",
                       " " * 3, "x" * 10_000, "../../etc/passwd", "名前", "\x00", "'; DROP",
                       str(uuid.uuid4()), guest.uuid.upper() + "0", guest.name + "\n",
                       "-1", "nan", "inf"]
    task = rng.choice(["dormant.pause", "dormant.unpause", "dormant.suspend",
                       "dormant.resume", "dormant.ensure", "dormant.status"])
    instance = rng.choice(junk)
    kwargs: dict[str, Any] = {}
    if rng.random() < 0.5:
        kwargs["request_id"] = rng.choice(junk)
    if rng.random() < 0.3:
        kwargs[rng.choice(["max_seconds", "target", "bogus", "instance"])] = rng.choice(junk)
    if rng.random() < 0.2:  # a real guest with a bad argument: must change nothing either
        instance = guest.uuid
        kwargs["max_seconds" if task == "dormant.pause" else "surprise"] = rng.choice(
            ["-5", -5, "soon", [], 1e308, float("nan")])
    args: list[Any] = [instance] + ([rng.choice(junk)] if rng.random() < 0.3 else [])
    if task == "dormant.ensure" and rng.random() < 0.5:
        args = [instance, rng.choice([*junk, "running ", "PAUSED"])]
    return task, args, kwargs


def fuzzed_calls(suite: Suite, count: int) -> Row:
    """Malformed calls by name: every one refused with a typed error, nothing changes."""
    host = unique("faults-fz-")
    suite.worker(host, concurrency=8)
    guest = suite.new_guest("idle")
    before = suite.state_of(guest)
    app = suite.client()
    rng = random.Random(9)
    ids = []
    for _ in range(count):
        task, args, kwargs = _fuzz_call(rng, guest)
        with contextlib.suppress(ValueError, TypeError):  # not even JSON (nan): never sent
            ids.append(app.send_task(task, args=args, kwargs=kwargs,
                                     queue=f"dormant.{host}").id)
    app.close()
    got = suite.wait_results(ids, timeout=300)
    errors = Counter(m["result"]["exc_type"] if m["status"] == "FAILURE" else "ok"
                     for m in got.values())
    retried = sum(e["outcome"] == "retrying" for e in suite.journal(guest.uuid))
    after = suite.state_of(guest)
    changed = sum(e["outcome"] == "changed" for e in suite.journal(guest.uuid))
    suite.stop_workers()
    ok = before == after and changed == 0 and retried == 0 and len(got) == len(ids)
    return Row("fuzzed calls", len(ids), ok,
               f"{len(got)}/{len(ids)} answered; {changed} state changes, {retried} retries; "
               + ", ".join(f"{k} {v}" for k, v in errors.most_common()))


def pickled_message(suite: Suite) -> Row:
    """A pickle-serialised message is refused before any code runs."""
    host = unique("faults-pk-")
    worker = suite.worker(host, concurrency=2)
    guest = suite.new_guest("idle")
    evil = Celery("evil", broker=suite.broker_url(), backend=suite.redis.url(1))
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"],
                     broker_connection_retry_on_startup=True)
    sent = evil.send_task("dormant.pause", args=[guest.uuid], queue=f"dormant.{host}",
                          serializer="pickle")
    evil.close()
    refused = bool(wait_until(lambda: "Refusing to deserialize untrusted content of type "
                              "pickle" in worker.log(), timeout=30))
    ran = f"dormant.pause[{sent.id}] received" in worker.log()
    state = suite.state_of(guest)
    suite.stop_workers()
    ok = refused and not ran and state == "running"
    return Row("a pickled message", 1, ok,
               f"refused: {refused}; ran: {ran}; guest {state}; journal "
               f"{len(suite.journal(guest.uuid))} entries")


def call_overhead(suite: Suite, calls: int) -> Row:
    """What the deadline costs per libvirt call: direct ``state()`` vs through its thread."""
    from worker.hypervisor import Hypervisor

    guest = suite.new_guest("idle")
    hv = Hypervisor(URI)
    handle = hv.guest(guest.uuid)
    direct_dom = suite.conn.lookupByUUIDString(guest.uuid)
    runs: dict[str, list[float]] = {"direct": [], "deadline": []}
    for _block in range(4):
        for name, fn in (("direct", direct_dom.state), ("deadline", handle.observe)):
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            runs[name].append((time.perf_counter() - started) / calls * 1e6)
    hv.close()
    direct, through = statistics.median(runs["direct"]), statistics.median(runs["deadline"])
    return Row("deadline overhead per libvirt call", calls * 4, True,
               f"virDomainGetState {direct:.0f} µs direct, {through:.0f} µs through the "
               f"connection's thread (+{through - direct:.0f} µs per call)")


# -- a host that fills up (issue 19) ----------------------------------------------------------
MiB = 2**20
IMAGE_DONE, IMAGE_PARTIAL = b"LibvirtQemudSave", b"LibvirtQemudPart"  # libvirt's image magic


def _image(path: Path) -> str:
    """What a save image on disk is: complete, partial (libvirt's magic says so) or absent."""
    try:
        magic = path.read_bytes()[:16] if path.stat().st_size else b""
    except OSError:
        return "absent"
    return {IMAGE_DONE: "complete", IMAGE_PARTIAL: "partial"}.get(magic, "unknown")


def save_dir_fills(suite: Suite, count: int) -> Row:
    """A drain of real Linux guests (48 MiB of incompressible memory each) into a save
    directory with room for about half of them, a guest writing its disk on that same
    filesystem all along: dormant saves what fits with the reserve kept free, stops, and
    reports it; nobody is paused, nothing half-written."""
    from tests.support.linux_guest import LinuxGuestFactory
    from tests.support.save_dir import SaveDirectory, remove_leftovers
    from worker.reclaim import run_store

    remove_leftovers()
    host = unique("faults-sd-")
    token = uuid.uuid4().hex[:6]
    prefix = f"dormant-test-{token}-"
    directory = SaveDirectory(count * 100).open()
    factory = LinuxGuestFactory(suite.conn)
    lowest = [directory.free()]
    watching = threading.Event()

    def watch_free() -> None:
        while not watching.wait(0.05):
            lowest[0] = min(lowest[0], directory.free())

    try:
        fleet = [factory.create(fill_mib=48, name=f"{prefix}g{i}-p{os.getpid()}")
                 for i in range(count)]
        for guest in fleet:
            directory.route(guest.name)
        # A bystander outside the drain's scope whose disk lies on the same filesystem.
        bystander = suite.guests.create("writer", disk_dir=directory.path, disk_mib=16)
        for guest in fleet:
            guest.wait_filled(timeout=600)
        suite.worker(host, concurrency=8, env={
            "DORMANT_SAVE_DIR": str(directory.path), "DORMANT_SAVE_RESERVE_MIB": "16",
            "DORMANT_RECLAIM_SCOPE": prefix + "*"})
        fs = os.statvfs(directory.path)  # dormant's reserve: 10 % of the filesystem, >= 16 MiB
        reserve = max(int(fs.f_blocks * fs.f_frsize * 0.10), 16 * MiB)
        watcher = threading.Thread(target=watch_free, daemon=True)
        watcher.start()
        app = suite.client()
        started = time.monotonic()
        rid = app.send_task("dormant.drain", queue=f"dormant.{host}").get(timeout=120)["run_id"]
        state = suite.state()

        def finished() -> dict[str, Any] | None:
            report = run_store.load(state, rid)
            return report if report and report["status"] == "done" else None

        report = wait_until(finished, timeout=900, interval=0.2, message="the drain finished")
        took = time.monotonic() - started
        watching.set()
        outcomes = Counter(e["outcome"] for e in report["entries"])
        states = {g.name: suite.state_of(g) for g in fleet}  # type: ignore[arg-type]
        images = {g.name: _image(directory.image_of(g.name)) for g in fleet}
        half_done = sum(1 for g in fleet if (states[g.name], images[g.name]) not in
                        {("suspended", "complete"), ("running", "absent")})
        left_paused = sum(st.startswith("paused") for st in states.values())
        bystander_state = suite.state_of(bystander)
        promised = state.hlen(keys.reserved(host, "disk"))
        stopped = report.get("stopped") or {}
        restored = app.send_task("dormant.restore", args=[rid],
                                 queue=f"dormant.{host}").get(timeout=120)["run_id"]
        back = wait_until(lambda: (r := run_store.load(state, restored)) and
                          r["status"] == "done" and r, timeout=600, interval=0.2,
                          message="the restore finished")
        resumed = Counter(e["outcome"] for e in back["entries"])
        running = sum(suite.state_of(g) == "running" for g in fleet)  # type: ignore[arg-type]
        app.close()
    finally:
        watching.set()
        suite.stop_workers()
        factory.cleanup()
        directory.close(suite.conn)
    ok = (bool(stopped) and outcomes.get("suspended", 0) > 0 and left_paused == 0
          and half_done == 0 and promised == 0 and bystander_state == "running"
          and lowest[0] >= reserve - 4 * MiB and running == count)
    return Row("save directory fills mid-drain", count, ok,
               f"{count} guests (208 MiB each, 48 MiB filled) into {directory.size_mib} MiB: "
               f"{dict(outcomes)} in {took:.0f} s, stopped: "
               f"{stopped.get('reason', 'no')} ({stopped.get('free_bytes', 0) // MiB} MiB free, "
               f"{stopped.get('needed_bytes', 0) // MiB} MiB needed + "
               f"{stopped.get('reserve_bytes', 0) // MiB} MiB reserve); lowest free "
               f"{lowest[0] // MiB} MiB (reserve {reserve // MiB}); guests left paused "
               f"{left_paused}, bystander on the same filesystem {bystander_state}, other "
               f"guests paused by I/O errors {int(bystander_state == 'paused(5)')}; half-done "
               f"{half_done} (every guest suspended with a complete image or running with "
               f"none), promises left {promised}; restored {dict(resumed)}")


def redis_full(suite: Suite, count: int, hold: float = 5.0) -> Row:
    """The one Redis of a deployment (broker, results, state) at maxmemory (noeviction) for
    ``hold`` seconds in the middle of a wave of transitions, twice: ``count`` pauses, then
    ``count`` unpauses. Every request is answered once Redis accepts writes again, none twice,
    the worker lives through it, and every guest ends running."""
    host = unique("faults-rf-")
    worker = suite.worker(host, concurrency=8)
    fleet = [suite.new_guest("idle") for _ in range(6)]
    app = suite.client()
    redis_ = suite.redis.client(0)
    redis_.config_set("maxmemory-policy", "noeviction")
    sent: dict[str, str] = {}  # task id -> request id
    full_for = []

    def wave(target: str) -> None:
        ids = []
        for i in range(count):
            guest = fleet[i % len(fleet)]
            rid = f"rf-{target}-{i}-{uuid.uuid4().hex[:6]}"
            task = app.send_task("dormant.ensure", args=[guest.uuid, target],
                                 kwargs={"request_id": rid}, queue=f"dormant.{host}")
            sent[task.id] = rid
            ids.append(task.id)
        wait_until(lambda: len(suite.results(ids)) >= count // 4, timeout=120, interval=0.02,
                   message="a quarter answered")
        redis_.config_set("maxmemory", 1)
        began = time.monotonic()
        time.sleep(hold)  # the outage
        redis_.config_set("maxmemory", 0)
        full_for.append(time.monotonic() - began)

    started = time.monotonic()
    wave("paused")
    got = suite.wait_results(list(sent), timeout=300)
    wave("running")
    got = suite.wait_results(list(sent), timeout=300)
    took = time.monotonic() - started
    app.close()
    lost = len(sent) - len(got)
    failed = sum(1 for m in got.values() if m["status"] != "SUCCESS")
    by_rid: Counter[str] = Counter()
    for guest in fleet:
        for entry in suite.journal(guest.uuid):
            if entry["outcome"] in {"changed", "already"}:
                by_rid[entry["request_id"]] += 1
    doubled = sum(1 for n in by_rid.values() if n > 1)
    states = Counter(suite.state_of(g) for g in fleet)
    state = suite.state()
    pending = sum(1 for rid in sent.values()
                  if json.loads(state.get(keys.request(rid)) or "{}").get("status") == "pending")
    locks = sum(1 for g in fleet if state.exists(keys.lock(g.uuid)))
    broker = suite.redis.client(0)
    unacked, queued = broker.hlen("unacked"), broker.llen(f"dormant.{host}")
    log = worker.log()
    crashed = "Unrecoverable error" in log
    refusals = log.count("state store full: Redis refuses") + log.count("broker full: Redis")
    suite.stop_workers()
    ok = (lost == 0 and failed == 0 and doubled == 0 and not crashed and pending == 0
          and locks == 0 and unacked == 0 and queued == 0 and states == {"running": len(fleet)})
    return Row("Redis at maxmemory", len(sent), ok,
               f"the one Redis full for {' and '.join(f'{t:.0f} s' for t in full_for)} during "
               f"{count} pauses then {count} unpauses of {len(fleet)} guests: {len(got)}/"
               f"{len(sent)} answered, {lost} lost, {doubled} executed twice, {failed} failed; "
               f"worker {'stopped' if crashed else 'alive'} ({refusals} refusals logged); "
               f"guests left paused {len(fleet) - states.get('running', 0)}; half-done: "
               f"{pending} pending records, {locks} locks, {unacked} unacked, {queued} queued; "
               f"{took:.1f} s in all")


# name -> (run it, once per broker?)
SCENARIOS: dict[str, tuple[Callable[[Suite, bool], Row], bool]] = {
    "overhead": (lambda s, q: call_overhead(s, 200 if q else 2000), False),
    "kill-threads": (lambda s, q: kill_threads_worker(s, 1 if q else 10), True),
    "kill-prefork": (lambda s, q: kill_prefork_child(s, 1 if q else 10), True),
    "broker-kill": (lambda s, q: broker_kill(s, 40 if q else 200), True),
    "libvirtd-kill": (lambda s, q: libvirtd_kill_bulk(s, 6), False),
    "stuck-domain": (lambda s, q: stuck_domain(s), False),
    "libvirtd-stop": (lambda s, q: libvirtd_sigstop(s, 20), False),
    "duplicates": (lambda s, q: duplicate_sends(s, 100 if q else 1000), True),
    "fuzz": (lambda s, q: fuzzed_calls(s, 60 if q else 600), True),
    "pickle": (lambda s, q: pickled_message(s), True),
    "save-dir-full": (lambda s, q: save_dir_fills(s, 3 if q else 6), False),
    "redis-full": (lambda s, q: redis_full(s, 40 if q else 200), False),
    # Redis behind Sentinel, its master killed (bench/failover.py, issue 18).
    "failover-mid-run": (lambda s, q: Row(*failover.mid_run(s, 40 if q else 200)), False),
    "failover-fenced": (lambda s, q: Row(*failover.fenced(s)), False),
    "failover-unreplicated": (lambda s, q: Row(*failover.fenced_unreplicated(s)), False),
    "failover-return": (lambda s, q: Row(*failover.old_master_returns(s, 2 if q else 6)), False),
}


def _run(suite: Suite, name: str, quick: bool) -> Row:
    """One scenario on the suite's broker; once more if a shared part broke under it."""
    row = None
    for attempt in (1, 2):  # libvirtd is shared: someone may restart it meanwhile
        try:
            revive(suite.conn)
            row = SCENARIOS[name][0](suite, quick)
            break
        except Exception as exc:  # one broken scenario still reports the others
            suite.stop_workers()
            row = Row(name, 0, False, f"error: {type(exc).__name__}: {exc}")
            if attempt == 2 or not isinstance(exc, CONNECTION_LOST):
                break  # (a client may hold a connection from before a broker restart)
            print(f"   connection lost ({exc}); once more", file=sys.stderr)
    assert row is not None
    row.broker = BROKER_NAMES[suite.broker]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("FAULTS_QUICK", "") not in {"", "0"},
                        help="fewer repetitions (the CI version)")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--brokers", nargs="+", choices=BROKERS, default=list(BROKERS),
                        help="run the delivery scenarios on these brokers [both]")
    opts = parser.parse_args(argv)
    # SIGTERM (make interrupted, a CI timeout): still stop the workers and remove the guests.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    workdir = new_workdir("dormant-faults-logs-")
    brokers = tuple(opts.brokers)
    suite = Suite(workdir, brokers)
    rows: list[Row] = []
    spent: dict[str, float] = {}  # seconds of scenarios per broker
    started = time.time()
    try:
        for name in opts.only or list(SCENARIOS):
            for broker in brokers if SCENARIOS[name][1] else brokers[:1]:
                suite.broker = broker
                print(f"-- {name} ({BROKER_NAMES[broker]}) ...", file=sys.stderr, flush=True)
                began = time.monotonic()
                row = _run(suite, name, opts.quick)
                spent[broker] = spent.get(broker, 0.0) + time.monotonic() - began
                print(f"   {'ok' if row.ok else 'FAILED'} ({time.monotonic() - began:.0f} s): "
                      f"{row.figures}", file=sys.stderr, flush=True)
                rows.append(row)
    finally:
        suite.close()
    load = os.getloadavg()
    print(f"\nFaults ({'quick' if opts.quick else 'full'}), "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, "
          f"{(time.time() - started) / 60:.1f} min ("
          + ", ".join(f"{BROKER_NAMES[b]} scenarios {s / 60:.1f}" for b, s in spent.items())
          + f"), load {load[0]:.1f}; worker logs in {workdir}")
    print("\n| scenario | broker | runs | verdict | figures |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.scenario} | {row.broker} | {row.runs} | "
              f"{'ok' if row.ok else '**FAILED**'} | {row.figures} |")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
