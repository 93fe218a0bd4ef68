"""Planning a night at fleet scale: load, decide and enqueue for 50,000 instances.

A day of synthetic samples (288 per instance, every 5 minutes, the default) is written to a
private redis-server through dormant's own storage path (``worker.reclaim.sampling.store``,
one call per host: not timed). Then, timed, for every host -- exactly what ``dormant.reclaim``
does per host, minus libvirt: load the host's samples (``worker.reclaim.sampling.load``),
decide (``worker.reclaim.idle.decide``), apply the safety rules
(``worker.reclaim.selection.select``), write the report and the run's work queue
(``worker.reclaim.run_store.create``), and enqueue the first ``cap`` actions as real Celery
messages on the host's queue (the rest wait in the run's queue and are sent as actions finish:
the host cap). The headline total includes loading.

The mix: 50 % idle, 30 % busy, 10 % idle with a counter reset (a reboot), 10 % with a sampling
gap and a paused hour. Run:

    .venv/bin/python -m bench.plan_fleet                    # 50,000 instances, 500 hosts
    .venv/bin/python -m bench.plan_fleet --instances 50000 --hosts 1000 --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from collections import Counter

from celery import Celery

from tests.support.services import RedisServer, free_port, new_workdir
from worker.reclaim import idle, run_store, sampling, selection
from worker.reclaim.sampling import Sample
from worker.store import keys

WINDOW = 86400.0
STEP = 300.0
SAMPLES = 288


def synthetic(kind: str, times: list[float], rng: random.Random) -> list[Sample]:
    """A day of 5-minute samples of one instance (cumulative counters) at its host's times."""
    out, cpu, rx, tx, disk = [], 10**12, 10**9, 10**9, 10**9
    vcpus = rng.choice((1, 2, 4))
    for i, t in enumerate(times):
        state = "running"
        if kind == "busy":
            cpu += int(STEP * 1e9 * vcpus * rng.uniform(0.2, 0.9))
            rx += int(STEP * rng.uniform(5e3, 5e4))
        else:
            cpu += int(STEP * 1e9 * vcpus * rng.uniform(0.0001, 0.01))
            rx += int(STEP * rng.uniform(0, 500))
        tx += int(STEP * rng.uniform(0, 200))
        disk += int(STEP * rng.uniform(0, 1000))
        if kind == "reset" and i == 144:
            cpu, rx, tx, disk = 10**9, 0, 0, 0
        if kind == "gappy" and 60 <= i < 96:
            continue  # three missed hours: one gap
        if kind == "gappy" and 180 <= i < 192:
            state = "paused"
        out.append(Sample(t=t, state=state, cpu_ns=cpu, vcpus=vcpus, rx=rx, tx=tx, rd=disk,
                          wr=0))
    return out


def build(client, hosts: int, instances: int, now: float, seed: int):  # type: ignore[no-untyped-def]
    """Every host's day of samples, stored through ``sampling.store`` (one call per host)."""
    rng = random.Random(seed)
    kinds = ["idle"] * 5 + ["busy"] * 3 + ["reset", "gappy"]
    fleet: dict[str, list[str]] = {f"host{h:04d}": [] for h in range(hosts)}
    names = list(fleet)
    truth: Counter[str] = Counter()
    items: dict[str, list[tuple[str, str, Sample]]] = {h: [] for h in fleet}
    start = {h: now - WINDOW + 1 + rng.uniform(0, STEP / 2) for h in fleet}  # per-host ticks
    for i in range(instances):
        host = names[i % hosts]
        u = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        kind = kinds[i % len(kinds)]
        truth[kind] += 1
        fleet[host].append(u)
        times = [start[host] + k * STEP for k in range(SAMPLES)]
        items[host] += [(u, f"vm{i}", s) for s in synthetic(kind, times, rng)]
    for host, host_items in items.items():
        sampling.store(client, host, sorted(host_items, key=lambda x: x[2].t), window=WINDOW,
                       now=now)
    return fleet, truth


def plan(client, app: Celery, fleet: dict[str, list[str]], *, now: float, cap: int,
         policy: idle.IdlePolicy, memory: dict[str, tuple[dict, dict]] | None = None,
         tag: str = "bench") -> dict[str, float | int]:  # type: ignore[no-untyped-def]
    """One night for every host; ``memory`` holds preloaded (samples, first seen) per host,
    else each host's are loaded from Redis as ``dormant.reclaim`` does."""
    t_load = t_decide = t_write = t_send = 0.0
    decided = queued = sent = 0
    verdicts: Counter[str] = Counter()
    safety = selection.Safety(min_age=3600)  # first seen = the day's first sample
    with app.producer_or_acquire() as producer:
        for host, uuids in fleet.items():
            t0 = time.perf_counter()
            if memory is None:
                history = sampling.load(client, uuids, since=now - WINDOW, host=host)
                first = {u: a.first_seen for u, a in history.items()}
            else:
                history, first = memory[host]
            t1 = time.perf_counter()
            candidates = [selection.Candidate(uuid=u, name=u[:8], state="running",
                                       decision=idle.decide(u, history[u], policy, now=now),
                                       first_seen=first[u]) for u in uuids]
            rid = f"{host}:{tag}"
            result = selection.select(candidates, safety, now=now, run_id=rid)
            t2 = time.perf_counter()
            suspend = selection.Verdict.SUSPEND
            entries = [{**e.as_dict(), "outcome": "pending" if e.verdict is suspend else "none"}
                       for e in result.entries]
            queue = [e.instance for e in result.to_suspend]
            run_store.create(client, rid, {"run_id": rid, "kind": "reclaim", "host": host,
                                      "started_at": now, "status": "acting"},
                        entries, queue=queue, ttl=3600)
            t3 = time.perf_counter()
            for instance in run_store.take(client, rid, cap):
                app.send_task("dormant.run_item", args=[rid, instance],
                              queue=f"dormant.{host}", producer=producer)
                sent += 1
            t4 = time.perf_counter()
            t_load += t1 - t0
            t_decide += t2 - t1
            t_write += t3 - t2
            t_send += t4 - t3
            decided += len(candidates)
            queued += len(queue)
            verdicts.update(result.counts())
    return {"load_s": t_load, "decide_select_s": t_decide, "write_reports_s": t_write,
            "send_s": t_send, "decided": decided, "to_suspend": queued, "messages": sent,
            **{f"verdict_{k}": v for k, v in sorted(verdicts.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=50_000)
    parser.add_argument("--hosts", type=int, default=500)
    parser.add_argument("--cap", type=int, default=8, help="DORMANT_RECLAIM_HOST_CAP")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-bench-plan-"))
    server.start()
    try:
        client = server.client(2)
        app = server.celery_client("bench", results=False)
        now = time.time()
        before = int(client.info("memory")["used_memory"])
        t0 = time.perf_counter()
        fleet, truth = build(client, args.hosts, args.instances, now, args.seed)
        setup = time.perf_counter() - t0
        memory_per_guest = (int(client.info("memory")["used_memory"]) - before) / args.instances
        some = next(iter(fleet.values()))[0]
        record_bytes = client.memory_usage(keys.activity(some))
        policy = idle.IdlePolicy(window=WINDOW, min_samples=12, max_gap=3 * STEP)
        broker = server.client(0)
        started = time.perf_counter()
        numbers = plan(client, app, fleet, now=now, cap=args.cap, policy=policy)
        total = time.perf_counter() - started
        in_broker = sum(broker.llen(f"dormant.{h}") for h in fleet)
        waiting = sum(client.llen(keys.run_queue(f"{h}:bench")) for h in fleet)
        broker.flushdb()
        memory = {h: (sampling.load(client, u, since=now - WINDOW, host=h),
                      sampling.first_seen(client, u)) for h, u in fleet.items()}
        started = time.perf_counter()
        in_memory = plan(client, app, fleet, now=now, cap=args.cap, policy=policy,
                         memory=memory, tag="bench2")
        total_in_memory = time.perf_counter() - started
        app.close()
    finally:
        server.stop()
    if in_broker != numbers["messages"] or in_broker + waiting != numbers["to_suspend"]:
        raise RuntimeError(f"enqueue lost work: {in_broker} messages + {waiting} waiting != "
                           f"{numbers['to_suspend']} to suspend")
    expected = truth["idle"] + truth["reset"] + truth["gappy"]
    if numbers["to_suspend"] != expected:
        raise RuntimeError(f"{numbers['to_suspend']} to suspend, expected {expected} "
                           f"(all but the busy ones): {dict(truth)}")
    result = {"instances": args.instances, "hosts": args.hosts, "cap": args.cap,
              "samples_per_instance": SAMPLES, "synthetic_mix": dict(truth),
              "setup_s (not timed)": round(setup, 2), "total_s": round(total, 3),
              **{k: round(v, 3) if isinstance(v, float) else v for k, v in numbers.items()},
              "messages_in_broker": in_broker, "waiting_in_run_queues": waiting,
              "meets_10s": total <= 10,
              "redis_bytes_per_guest": round(memory_per_guest),
              "memory_usage_one_record": record_bytes,
              "with_samples_in_memory": {
                  "total_s": round(total_in_memory, 3),
                  **{k: round(v, 3) for k, v in in_memory.items() if k.endswith("_s")}}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.instances} instances on {args.hosts} hosts, {SAMPLES} samples each "
              f"({memory_per_guest:.0f} B of Redis per guest, one record {record_bytes} B)")
        print(f"  total {total:.2f} s (target <= 10 s): load {numbers['load_s']:.2f} s, "
              f"decide+select {numbers['decide_select_s']:.2f} s, reports "
              f"{numbers['write_reports_s']:.2f} s, send {numbers['send_s']:.2f} s")
        print(f"  {numbers['to_suspend']} to suspend: {in_broker} Celery messages now "
              f"(cap {args.cap} per host), {waiting} waiting in the run queues")
        print(f"  the same night with every sample already in memory: {total_in_memory:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
