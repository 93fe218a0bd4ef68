"""``make fleet``: a fleet on one Redis -- many hosts, tens of thousands of guests, one night.

For each fleet size asked for (``--scales``, default 1, 10 and 50 hosts of ``--per-host``
guests), on this machine and real parts:

1. a private redis-server; a day of 5-minute samples (288 per guest) for every guest written
   through dormant's own storage path, with a known mix (bench/fleet_hosts.py: idle, busy,
   idle with a counter reset, idle with a gap and a paused hour, idle all day but busy at the
   re-check);
2. one real ``celery -A tasks worker --pool threads`` per simulated host (``DORMANT_HOST``),
   driving libvirt's test driver seeded with that host's guests (bench/fleet_site/), and one
   Flower; the idle fleet's cost (heartbeats, events, registry refreshes, reconciliation,
   Flower) and one sampling round as beat sends it (``dormant.sample_fleet``);
3. an outside client sending ad-hoc pause/unpause pairs to ``dormant.control``, alone and
   then during the night: ``dormant.reclaim_fleet`` as beat sends it, every host's run
   carried out by its worker (decide, re-check, suspend, record);
4. the outcome, from each host's libvirt (``dormant.status``) and the journals: every idle
   guest suspended exactly once, every busy one kept, none lost; then ``dormant usage``'s
   families.

It prints one table for the largest fleet and one of cost per transition and per guest by
fleet size (flat means within 1.2x of 1 host), writes everything as JSON, and exits 1 when a
guest was lost, suspended twice or wrongly. ``FLEET_QUICK=1`` (CI): 1 and 3 hosts of 200.

    .venv/bin/python -m bench.fleet                               # ~45 min here
    .venv/bin/python -m bench.fleet --scales 2 --per-host 100     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fleet_hosts import DAY, Processes, generate, store_day
from bench.fleet_night import (
    AdHoc,
    MemoryWatch,
    Snapshot,
    check,
    night,
    percentiles,
    states,
    suspends,
)
from tests.support.services import RedisServer, free_port, new_workdir, wait_until
from worker.reclaim import sampling
from worker.store import usage


@dataclass(frozen=True)
class Preset:
    scales: tuple[int, ...]
    per_host: int
    idle_seconds: float
    adhoc_seconds: float


QUICK = Preset(scales=(1, 3), per_host=200, idle_seconds=15.0, adhoc_seconds=10.0)
FULL = Preset(scales=(1, 10, 50), per_host=1000, idle_seconds=300.0, adhoc_seconds=30.0)


def simulate(hosts: int, per_host: int, *, concurrency: int, idle_seconds: float,
             adhoc_seconds: float, night_timeout: float) -> dict[str, Any]:
    """One fleet, one night; every figure of the table."""
    workdir = new_workdir(f"dormant-fleet-{hosts}-")
    server = RedisServer(port=free_port(), workdir=workdir)
    server.start()
    procs = Processes(server, workdir)
    out: dict[str, Any] = {"hosts": hosts, "guests_per_host": per_host, "workdir": str(workdir)}
    try:
        state, broker = server.client(2), server.client(0)
        fleet = generate(hosts, per_host)
        out["guests"] = len(fleet.guests)
        empty = int(state.info("memory")["used_memory"])
        started = time.perf_counter()
        out["samples_stored"] = store_day(server.url(2), fleet, time.time())
        out["store_day_s"] = round(time.perf_counter() - started, 1)
        sampled = {f.family: f for f in usage.scan(state, "state", sample=500)}["samples"]
        out["samples_bytes_per_guest"] = round(sampled.bytes / len(fleet.guests))

        started = time.perf_counter()
        procs.start_workers(fleet, concurrency=concurrency)
        procs.start_flower()
        out["start_s"] = round(time.perf_counter() - started, 1)
        redis_pid = server.process.pid if server.process else 0

        # The idle fleet: heartbeats, events, registry refreshes, reconciliation, Flower. A
        # 300 s window (the full run's) holds exactly one reconciliation of every worker.
        time.sleep(10)  # lets start-up reconciliation end before the measured window
        before = Snapshot.take(state, redis_pid, procs.pids())
        time.sleep(idle_seconds)  # the measured window itself
        out["idle"] = Snapshot.take(state, redis_pid, procs.pids()).since(before)

        # One sampling round, as beat sends it.
        app = server.celery_client("fleet-client")
        before = Snapshot.take(state, redis_pid, procs.pids())
        sent_at = time.time()
        app.send_task("dormant.sample_fleet", queue="dormant.control")
        wait_until(lambda: all(sampling.sampled(state, h, since=sent_at) for h in fleet.hosts),
                   timeout=600, interval=0.2,
                   message="every host sampled")
        out["sample_round"] = Snapshot.take(state, redis_pid, procs.pids()).since(before)

        adhoc = AdHoc(app, [g.name for g in fleet.guests if g.kind == "adhoc"])
        adhoc.start()
        time.sleep(adhoc_seconds)  # ad-hoc transitions alone: the baseline latency
        adhoc.phase = "during"
        memory = MemoryWatch(state)
        memory.start()
        before = Snapshot.take(state, redis_pid, procs.pids())
        ran = night(app, state, fleet.hosts, timeout=night_timeout)
        out["night"] = Snapshot.take(state, redis_pid, procs.pids()).since(before)
        out["night"]["wall_s"] = ran["wall_s"]
        out["redis_peak_bytes"] = memory.stop()
        adhoc.phase = "after"
        adhoc.stop()
        out["adhoc"] = {phase: percentiles(v) for phase, v in adhoc.latencies.items()}
        out["adhoc"]["failures"] = adhoc.failures[:10]

        real = states(app, fleet.hosts)
        journaled = suspends(state, [g.uuid for g in fleet.guests])
        out["outcome"] = check(fleet, real, journaled)
        during = adhoc.latencies.get("during", [])
        out["transitions"] = out["outcome"]["suspended"] + len(during)
        out["families"] = [f.as_dict() for store, client in
                           (("state", state), ("broker", broker), ("results", server.client(1)))
                           for f in usage.scan(client, store)]
        out["redis_used_bytes"] = int(state.info("memory")["used_memory"]) - empty
        app.close()
    finally:
        procs.stop()
        server.stop()
    return out


def per_transition(run: dict[str, Any], *, net: bool = False) -> dict[str, float]:
    """The night's cost per transition; ``net``: less what the idle fleet spends in the same
    time (heartbeats, registry refreshes, reconciliation), which on this one machine grows
    with the night's length -- and so with the number of hosts sharing its two cores -- but
    on a real fleet runs on each host's own cores and does not come with a transition."""
    n, night_, idle = max(1, run["transitions"]), run["night"], run["idle"]
    share = night_["seconds"] / idle["seconds"] if net else 0.0
    return {"redis_commands": (night_["commands"] - share * idle["commands"]) / n,
            "redis_cpu_ms": (night_["redis_cpu"] - share * idle["redis_cpu"]) * 1000 / n,
            "worker_cpu_ms": (night_["workers_cpu"] - share * idle["workers_cpu"]) * 1000 / n,
            "redis_bytes_per_guest": run["redis_used_bytes"] / run["guests"]}


def table(run: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the one table (bench/RESULTS.md "Fleet scale")."""
    night_, idle, rnd, out = run["night"], run["idle"], run["sample_round"], run["outcome"]
    cost, net = per_transition(run), per_transition(run, net=True)
    per100 = 100 / run["hosts"]
    fams = sorted((f for f in run["families"] if f["bytes"]), key=lambda f: -f["bytes"])
    adhoc = run["adhoc"]
    rows = [
        ("fleet", f"{run['hosts']} hosts x {run['guests_per_host']} guests "
                  f"(+2 ad-hoc each) = {run['guests']:,} guests, one Redis"),
        ("a day of samples stored (288/guest)",
         f"{run['samples_stored']:,} samples in {run['store_day_s']} s; "
         f"{run['samples_bytes_per_guest']:,} B per guest-day"),
        ("night wall time (sent -> every run done)", f"{night_['wall_s']:.1f} s"),
        ("transitions/s fleet-wide", f"{run['transitions'] / night_['wall_s']:.1f} "
                                     f"({run['transitions']:,} in the night)"),
        ("idle guests suspended exactly once",
         f"{out['suspended']:,} / {out['expected_suspended']:,} suspended; "
         f"{out['kept']:,} busy kept; problems: {out['problems'] or 'none'}"),
        ("Redis peak memory (used_memory)", usage.human(run["redis_peak_bytes"])),
        ("Redis memory per family (after the night)", "; ".join(
            f"{f['store']}/{f['family']} {usage.human(f['bytes'])} ({f['keys']:,} keys)"
            for f in fams[:8])),
        ("Redis CPU per transition", f"{cost['redis_cpu_ms']:.2f} ms "
                                     f"({net['redis_cpu_ms']:.2f} ms net of the idle fleet)"),
        ("Redis commands per transition", f"{cost['redis_commands']:.1f} "
         f"({net['redis_commands']:.1f} net; " + ", ".join(
             f"{name} {calls / max(1, run['transitions']):.1f}"
             for name, calls in list(night_["by_command"].items())[:8]) + ")"),
        ("worker CPU per transition (all workers)",
         f"{cost['worker_cpu_ms']:.2f} ms ({net['worker_cpu_ms']:.2f} ms net; system "
         f"{night_['workers_system_cpu'] * 1000 / max(1, run['transitions']):.2f} ms)"),
        ("ad-hoc transition latency outside the night",
         _latency(adhoc.get("outside", {"count": 0}))),
        ("ad-hoc transition latency during the night",
         _latency(adhoc.get("during", {"count": 0}))),
        ("idle fleet per 100 workers: Redis CPU, Flower CPU",
         f"{idle['redis_cpu'] / idle['seconds'] * per100 * 100:.1f} % + "
         f"{idle['flower_cpu'] / idle['seconds'] * per100 * 100:.1f} % of a core; "
         f"{idle['commands'] / idle['seconds'] * per100:.0f} commands/s; workers "
         f"{idle['workers_cpu'] / idle['seconds'] * per100 * 100:.1f} % of a core"),
        ("one sampling round (beat's dormant.sample_fleet)",
         f"Redis {rnd['redis_cpu'] * 1e6 / run['guests']:.0f} us + workers "
         f"{rnd['workers_cpu'] * 1e6 / run['guests']:.0f} us CPU per guest, "
         f"{rnd['commands'] / run['hosts']:.0f} commands per host"),
    ]
    return rows


def _latency(p: dict[str, Any]) -> str:
    if not p.get("count"):
        return "none measured"
    return f"p50 {p['p50_ms']:.0f} ms, p99 {p['p99_ms']:.0f} ms ({p['count']} transitions)"


def flatness(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cost per transition and bytes per guest by fleet size, and each as a multiple of the
    smallest fleet's (the goal: within 1.2x)."""
    base = per_transition(runs[0], net=True)
    rows = []
    for run in runs:
        cost = per_transition(run, net=True)
        rows.append({"hosts": run["hosts"], "guests": run["guests"],
                     **{k: round(v, 2) for k, v in cost.items()},
                     **{f"{k}_x": round(v / base[k], 2) if base[k] else None
                        for k, v in cost.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    quick = os.environ.get("FLEET_QUICK", "") not in {"", "0"}
    preset = QUICK if quick else FULL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default=",".join(map(str, preset.scales)),
                        help="host counts to simulate, comma-separated")
    parser.add_argument("--per-host", type=int, default=preset.per_host)
    parser.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    parser.add_argument("--idle-seconds", type=float, default=preset.idle_seconds)
    parser.add_argument("--adhoc-seconds", type=float, default=preset.adhoc_seconds)
    parser.add_argument("--night-timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    runs = []
    for hosts in sorted(int(h) for h in args.scales.split(",")):
        print(f"-- {hosts} hosts x {args.per_host} guests ({DAY} samples each)", file=sys.stderr,
              flush=True)
        run = simulate(hosts, args.per_host, concurrency=args.concurrency,
                       idle_seconds=args.idle_seconds, adhoc_seconds=args.adhoc_seconds,
                       night_timeout=args.night_timeout)
        runs.append(run)
        print(f"   night {run['night']['wall_s']:.1f} s, outcome ok: {run['outcome']['ok']}",
              file=sys.stderr, flush=True)
    largest = runs[-1]
    width = max(len(k) for k, _ in table(largest))
    print(f"\nFleet scale ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {os.getloadavg()[0]:.1f})")
    for name, value in table(largest):
        print(f"  {name:<{width}}  {value}")
    print("\nCost by fleet size, net of the idle fleet (x = multiple of the smallest; "
          "goal <= 1.2)")
    flat = flatness(runs)
    for row in flat:
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
    path = args.json or Path(largest["workdir"]) / "fleet.json"
    path.write_text(json.dumps({"runs": runs, "flatness": flat}, indent=2, default=str))
    print(f"\nall figures: {path}")
    bad = [r for r in runs if not r["outcome"]["ok"] or r["adhoc"]["failures"]]
    for run in bad:
        print(f"FAILED at {run['hosts']} hosts: {run['outcome']['problems']} "
              f"{run['outcome']['examples']} ad-hoc failures: {run['adhoc']['failures']}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
