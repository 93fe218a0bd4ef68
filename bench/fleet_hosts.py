"""The simulated fleet of ``make fleet`` (bench/fleet.py): its guests, their day of samples,
and its processes -- one real ``celery -A tasks worker`` per host and one Flower.

Each worker drives libvirt's in-process test driver (``test:///default``), seeded with its
host's guests by bench/fleet_site/sitecustomize.py, which is on the workers' PYTHONPATH only;
that shim also gives the test driver's guests the CPU, network and disk counters it lacks
(bench/fleet_site/fleet_activity.py). Everything else in the workers is dormant's own code.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.fleet_site.fleet_activity import KINDS, counters
from tests.support.services import (
    ROOT,
    RedisServer,
    WorkerProcess,
    free_port,
    stop_process,
    test_env,
    wait_until,
)
from worker.reclaim import sampling
from worker.reclaim.activity import Sample
from worker.store import keys

SITE = Path(__file__).parent / "fleet_site"
STEP = 300.0  # seconds between samples: DORMANT_SAMPLE_INTERVAL's default
DAY = 288  # samples a day
MIX = {"idle": 50, "busy": 29, "reset": 10, "gap": 10, "late": 1}  # per 100 guests
ADHOC_PER_HOST = 2  # guests outside reclamation's scope, for ad-hoc transitions
SCOPE = "h*-g*"  # DORMANT_RECLAIM_SCOPE: the generated guests, not the ad-hoc ones
NAMESPACE = uuid.UUID("6f1d6c55-8a63-4d5e-9d60-3b0c1e2f7a10")
DEMO_GUESTS = 4  # the demo fleet dormant itself seeds into test:///default (worker/demo)


@dataclass(frozen=True)
class Guest:
    host: str
    name: str
    uuid: str
    kind: str


@dataclass
class Fleet:
    hosts: list[str]
    guests: list[Guest]

    def of(self, host: str) -> list[Guest]:
        return [g for g in self.guests if g.host == host]

    @property
    def reclaimable(self) -> list[Guest]:
        return [g for g in self.guests if g.kind in KINDS]


def generate(hosts: int, per_host: int) -> Fleet:
    """``per_host`` guests of the mix on each host, plus the ad-hoc guests."""
    kinds = [k for k, n in MIX.items() for _ in range(n)]
    names = [f"h{h:03d}" for h in range(hosts)]
    guests = []
    for host in names:
        for k in range(per_host):
            name = f"{host}-g{k:04d}-{kinds[k % len(kinds)]}"
            guests.append(Guest(host, name, str(uuid.uuid5(NAMESPACE, name)), name.rsplit("-")[-1]))
        for k in range(ADHOC_PER_HOST):
            name = f"{host}-adhoc-{k}"
            guests.append(Guest(host, name, str(uuid.uuid5(NAMESPACE, name)), "adhoc"))
    return Fleet(names, guests)


# -- a day of samples, through dormant's storage path -------------------------------------------
def _day(guest: Guest, times: list[float]) -> Iterable[tuple[str, str, Sample]]:
    reset_at = times[len(times) // 2]
    for k, t in enumerate(times):
        if guest.kind == "gap" and 60 <= k < 96:
            continue  # three hours without a sample
        state = "paused" if guest.kind == "gap" and 180 <= k < 192 else "running"
        since = reset_at if guest.kind == "reset" and t >= reset_at else 0.0
        cpu, rx, tx, disk = counters(guest.kind, t, live=False, since=since)
        yield guest.uuid, guest.name, Sample(t, state, cpu, 1, rx, tx, disk, 0)


def _store_host(args: tuple[str, str, list[Guest], float]) -> int:
    url, host, guests, now = args
    client = redis.Redis.from_url(url, decode_responses=True)
    offset = int(host[1:]) * 37 % 240 + 0.125  # each host its own ticks
    start = round(now - (DAY - 1) * STEP - offset, 3)
    times = [round(start + k * STEP, 3) for k in range(DAY)]
    items = [item for g in guests for item in _day(g, times)]
    stored = sampling.store(client, host, items, window=86400, now=now)
    client.close()
    return stored


def store_day(redis_url: str, fleet: Fleet, now: float, *, processes: int = 2) -> int:
    """A day of 5-minute samples for every guest, one ``sampling.store`` per host, in
    ``processes`` processes (what 288 beat ticks would have stored)."""
    jobs = [(redis_url, h, fleet.of(h), now) for h in fleet.hosts]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.map(_store_host, jobs, chunksize=1))


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Processes:
    """The workers (one per host) and Flower of one simulation, and how to stop them."""

    redis: RedisServer
    workdir: Path
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    flower: subprocess.Popen[bytes] | None = None
    flower_port: int = 0

    def env(self, host: str, **extra: str) -> dict[str, str]:
        return test_env(self.redis, host, DORMANT_LIBVIRT_URI="test:///default",
                        DORMANT_REGISTRY_INTERVAL="60",  # the default (the tests use 5)
                        DORMANT_RECLAIM_SCOPE=SCOPE,
                        DORMANT_RECLAIM_MIN_AGE="3600",  # the stored day starts < 1 day ago
                        DORMANT_RECLAIM_RECHECK_SECONDS="0.1",
                        PYTHONPATH=f"{SITE}{os.pathsep}{ROOT}", **extra)

    def start_workers(self, fleet: Fleet, *, concurrency: int, batch: int = 10,
                      timeout: float = 600) -> None:
        """Start the hosts' workers a batch at a time; each is ready once it has published
        its guests in the registry."""
        state = self.redis.client(2)
        for i in range(0, len(fleet.hosts), batch):
            started = fleet.hosts[i:i + batch]
            for host in started:
                spec = self.workdir / f"{host}.json"
                spec.write_text(json.dumps([[g.name, g.uuid] for g in fleet.of(host)]))
                worker = WorkerProcess(
                    name=host, env=self.env(host, FLEET_SIM_GUESTS=str(spec)),
                    log_path=self.workdir / f"{host}.log",
                    args=["-P", "threads", "-c", str(concurrency)])
                worker.start()
                self.workers[host] = worker

            def published(hosts: list[str] = started) -> bool:
                for host in hosts:
                    if not self.workers[host].alive():
                        raise RuntimeError(f"worker of {host} exited:\n"
                                           f"{self.workers[host].log()[-3000:]}")
                want = len(fleet.of(hosts[0])) + DEMO_GUESTS
                return all(state.hlen(keys.host_instances(h)) >= want for h in hosts)

            wait_until(published, timeout=timeout, interval=0.5,
                       message=f"workers of {started[0]}..{started[-1]} published")

    def start_flower(self) -> None:
        self.flower_port = free_port()
        env = self.env("flower", FLOWER_BASIC_AUTH="ops:fleet-sim")
        env.pop("FLEET_SIM_GUESTS", None)
        log = open(self.workdir / "flower.log", "ab")  # noqa: SIM115 - lives with the process
        self.flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "flower",
             f"--port={self.flower_port}", "--address=127.0.0.1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._flower_answers, timeout=120, interval=0.5, message="Flower answers")

    def _flower_answers(self) -> bool:
        assert self.flower is not None
        if self.flower.poll() is not None:
            raise RuntimeError("Flower exited: see flower.log in " + str(self.workdir))
        try:
            url = f"http://127.0.0.1:{self.flower_port}/healthcheck"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def pids(self) -> dict[str, int]:
        found = {f"worker:{h}": w.process.pid for h, w in self.workers.items() if w.process}
        if self.flower is not None:
            found["flower"] = self.flower.pid
        return found

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM every worker at once (a warm shutdown each), then wait; SIGKILL what is
        left after ``timeout``."""
        running = [w for w in self.workers.values() if w.alive() and w.process]
        for worker in running:
            with suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        for worker in running:
            assert worker.process is not None
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
        if self.flower is not None:
            stop_process(self.flower)
