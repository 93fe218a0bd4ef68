"""What ``make fleet`` measures and checks (bench/fleet.py): CPU and commands, ad-hoc
transitions from an outside client, one night on every host, and its outcome against libvirt
and the journals.

CPU is read from ``/proc/<pid>/stat`` (user + system) of redis-server, each worker and Flower;
commands from Redis's own ``total_commands_processed``. The ad-hoc client is a plain Celery
client (no dormant import), sending ``dormant.pause``/``dormant.unpause`` by name to
``dormant.control`` -- the README's contract -- and timing each to its result.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench.fleet_hosts import Fleet
from bench.fleet_site.fleet_activity import KINDS, SUSPENDED_KINDS
from worker.reclaim import run_store
from worker.store import keys

TICK = os.sysconf("SC_CLK_TCK")
FINISHED = {"done", "disabled", "dry_run", "duplicate"}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / TICK, int(fields[12]) / TICK


@dataclass
class Snapshot:
    """Counters at one moment; two of them give what happened in between."""

    at: float
    redis_cpu: float
    commands: int
    cpu: dict[str, tuple[float, float]]  # process -> (user, system) seconds
    by_command: dict[str, int]  # calls of each Redis command

    @classmethod
    def take(cls, client: redis.Redis, redis_pid: int, pids: dict[str, int]) -> Snapshot:
        stats = client.info("stats")
        calls = {name.removeprefix("cmdstat_"): int(v["calls"])
                 for name, v in client.info("commandstats").items()}
        return cls(time.monotonic(), sum(cpu_seconds(redis_pid)),
                   int(stats["total_commands_processed"]),
                   {name: cpu_seconds(pid) for name, pid in pids.items()}, calls)

    def since(self, before: Snapshot) -> dict[str, Any]:
        def used(name: str, part: int) -> float:
            return self.cpu[name][part] - before.cpu.get(name, self.cpu[name])[part]

        workers = [k for k in self.cpu if k.startswith("worker:")]
        user, system = (sum(used(k, part) for k in workers) for part in (0, 1))
        calls = {k: v - before.by_command.get(k, 0) for k, v in self.by_command.items()}
        return {"seconds": self.at - before.at, "redis_cpu": self.redis_cpu - before.redis_cpu,
                "commands": self.commands - before.commands, "workers_cpu": user + system,
                "workers_system_cpu": system,
                "flower_cpu": sum(used("flower", p) for p in (0, 1)) if "flower" in self.cpu
                else 0.0,
                "by_command": dict(sorted(((k, v) for k, v in calls.items() if v),
                                          key=lambda kv: -kv[1]))}


class MemoryWatch(threading.Thread):
    """Redis's used_memory, polled: the peak of a stretch of time."""

    def __init__(self, client: redis.Redis, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="fleet-memory")
        self.client, self.interval = client, interval
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, int(self.client.info("memory")["used_memory"]))

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.peak


@dataclass(eq=False)  # a thread: hashable by identity
class AdHoc(threading.Thread):
    """An outside caller: pause then unpause one ad-hoc guest after another, each sent to
    ``dormant.control`` and awaited, ``pace`` seconds apart; latencies by phase."""

    app: Celery
    targets: list[str]
    pace: float = 0.5
    phase: str = "outside"
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    done: int = 0

    def __post_init__(self) -> None:
        super().__init__(daemon=True, name="fleet-adhoc")
        self.stopped = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            guest = self.targets[n % len(self.targets)]
            for action in ("dormant.pause", "dormant.unpause"):  # always leave it running
                phase, started = self.phase, time.monotonic()
                try:
                    result = self.app.send_task(action, args=[guest], queue="dormant.control",
                                                kwargs={"request_id": f"adhoc-{n}-{action}"})
                    answer = result.get(timeout=300)
                    if answer["outcome"] not in {"changed", "already"}:
                        self.failures.append(f"{action} {guest}: {answer['outcome']}")
                except Exception as exc:  # recorded; the run goes on
                    self.failures.append(f"{action} {guest}: {exc!r}")
                    continue
                self.latencies.setdefault(phase, []).append(time.monotonic() - started)
                self.done += 1
            n += 1
            self.stopped.wait(self.pace)

    def stop(self) -> None:
        self.stopped.set()
        self.join(600)


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else (
        values * 99)
    return {"count": len(values), "p50_ms": round(cuts[49] * 1000, 1),
            "p99_ms": round(cuts[98] * 1000, 1), "max_ms": round(max(values) * 1000, 1)}


# -- the night ---------------------------------------------------------------------------------
def night(app: Celery, state: redis.Redis, hosts: list[str], *, timeout: float) -> dict[str, Any]:
    """Send what beat sends at night (``dormant.reclaim_fleet``) and wait until every host's
    run is finished. Returns the run ids and the wall time from sending to the last done."""
    started_wall, started = time.time(), time.monotonic()
    app.send_task("dormant.reclaim_fleet", queue="dormant.control")
    deadline = started + timeout
    runs: dict[str, str] = {}
    while True:
        if len(runs) < len(hosts):
            for rid in state.zrangebyscore(keys.RUNS, started_wall - 5, "+inf"):
                runs.setdefault(str(rid).split(":", 1)[0], str(rid))
        done = [h for h, rid in runs.items() if _finished(run_store.meta(state, rid))]
        if len(done) == len(hosts):
            return {"runs": runs, "wall_s": time.monotonic() - started}
        if time.monotonic() > deadline:
            raise TimeoutError(f"night not over after {timeout:g}s: {len(done)}/{len(hosts)} "
                               f"runs done, {len(runs)} started")
        time.sleep(0.5)  # polling the reports, as `dormant reclaim` does


def _finished(meta: dict[str, Any] | None) -> bool:
    return meta is not None and meta.get("status") in FINISHED


# -- the outcome --------------------------------------------------------------------------------
def states(app: Celery, hosts: list[str], *, timeout: float = 300) -> dict[str, str]:
    """uuid -> state, as each host's libvirt says (``dormant.status`` of every guest)."""
    sent = {h: app.send_task("dormant.status", queue=f"dormant.{h}") for h in hosts}
    found: dict[str, str] = {}
    for result in sent.values():
        for row in result.get(timeout=timeout):
            found[row["instance"]] = row["state"]
    return found


def suspends(state: redis.Redis, uuids: list[str]) -> dict[str, int]:
    """uuid -> how many suspends its journal records as done (``changed``)."""
    with state.pipeline(transaction=False) as pipe:
        for u in uuids:
            pipe.xrange(keys.journal(u))
        replies = pipe.execute()
    counted = {}
    for u, entries in zip(uuids, replies, strict=True):
        bodies = [json.loads(fields["entry"]) for _id, fields in entries]
        counted[u] = sum(1 for e in bodies if e.get("action") == "suspend"
                         and e.get("outcome") == "changed")
    return counted


def check(fleet: Fleet, real: dict[str, str], journaled: dict[str, int]) -> dict[str, Any]:
    """Every idle guest suspended exactly once, every busy one kept, nobody lost."""
    problems: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for g in fleet.guests:
        state, count = real.get(g.uuid), journaled.get(g.uuid, 0)
        if g.kind in SUSPENDED_KINDS:
            bad = ("lost (not in libvirt)" if state is None else
                   "suspended twice" if count > 1 else
                   "idle but not suspended" if state != "suspended" or count != 1 else "")
        elif g.kind in KINDS:  # busy, late: must be kept
            bad = ("lost (not in libvirt)" if state is None else
                   "busy but suspended" if state == "suspended" or count else "")
        else:  # ad-hoc: paused and unpaused all night, left running
            bad = "ad-hoc guest not running" if state != "running" else ""
        if bad:
            problems[bad] += 1
            examples.setdefault(bad, []).append(g.name)
    kinds = Counter(g.kind for g in fleet.guests)
    return {"ok": not problems, "problems": dict(problems),
            "examples": {k: v[:5] for k, v in examples.items()},
            "suspended": sum(1 for g in fleet.guests if real.get(g.uuid) == "suspended"),
            "expected_suspended": sum(kinds[k] for k in SUSPENDED_KINDS),
            "kept": sum(kinds[k] for k in KINDS if k not in SUSPENDED_KINDS)}
