"""Redis against RabbitMQ as dormant's broker: throughput and latency, same machine, one run.

What the choice costs an operator (docs/production.md "RabbitMQ"). Each pass is
bench/transitions.py's measurement -- one ``celery -A tasks worker`` on libvirtd's shared
``test+unix:///default``, no-op tasks (``dormant.ping``) and pause/unpause in awaited batches,
alternating -- plus the latency of one task at a time (send to result, nothing else queued).
The worker, the caller and the result backend (a private Redis) are the same for both
brokers; only ``DORMANT_BROKER_URL`` differs: the private Redis, or a private RabbitMQ node
(quorum queues, publisher confirms on the caller's side too). Passes run Redis, RabbitMQ,
RabbitMQ, Redis so drift on this shared machine hits both alike.

Run: ``.venv/bin/python -m bench.brokers -P threads -c 8`` (``--json`` for one document).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from bench.transitions import measure
from tests.support.rabbit import RabbitServer
from tests.support.services import free_port, new_workdir

ORDER = ("redis", "rabbitmq", "rabbitmq", "redis")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", "-P", default="threads", choices=["prefork", "threads"])
    parser.add_argument("--concurrency", "-c", type=int, default=8)
    parser.add_argument("--guests", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency", type=int, default=200,
                        help="one-at-a-time tasks of each kind per pass [200]")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    rabbit = RabbitServer(port=free_port(), workdir=new_workdir("dormant-bench-rabbit-"))
    rabbit.start()
    started = time.time()
    passes: list[dict[str, Any]] = []
    try:
        for broker in ORDER:
            print(f"-- {broker} ...", file=sys.stderr, flush=True)
            passes.append(measure(opts.pool, opts.concurrency, opts.guests, opts.cycles,
                                  opts.rounds, broker=rabbit if broker == "rabbitmq" else None,
                                  latency=opts.latency))
    finally:
        rabbit.stop()
    if opts.json:
        print(json.dumps(passes))
        return 0
    load = os.getloadavg()[0]
    print(f"Brokers, {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, "
          f"{(time.time() - started) / 60:.1f} min, load {load:.1f}; -P {opts.pool} "
          f"-c {opts.concurrency}, {opts.guests} guests, {passes[0]['tasks_per_kind']} tasks "
          f"of each kind per pass, latency over {opts.latency} one-at-a-time tasks\n")
    print("| pass | broker | no-op tasks/s | pause/unpause tasks/s | no-op latency p50 / p95 "
          "ms | pause/unpause latency p50 / p95 ms | CPU ms/task no-op, transition: "
          "redis-server / RabbitMQ node / all |")
    print("|---|---|---|---|---|---|---|")
    for n, res in enumerate(passes, 1):
        lat = res["latency_ms"]
        cpu = [" / ".join(f"{per.get(role, 0.0):.2f}" for role in ("redis", "rabbitmq", "total"))
               for per in (res["noop_cpu_ms_per_task"], res["transition_cpu_ms_per_task"])]
        print(f"| {n} | {res['broker']} | {res['noop_per_s']} | {res['transition_per_s']} | "
              f"{lat['noop']['p50']} / {lat['noop']['p95']} | "
              f"{lat['transition']['p50']} / {lat['transition']['p95']} | "
              f"{cpu[0]}; {cpu[1]} |")
    for broker in ("redis", "rabbitmq"):
        mine = [r for r in passes if r["broker"] == broker]
        print(f"\n{broker}: no-op {statistics.mean(r['noop_per_s'] for r in mine):.0f}/s, "
              f"pause/unpause {statistics.mean(r['transition_per_s'] for r in mine):.0f}/s; "
              f"total CPU ms/task no-op "
              f"{statistics.mean(r['noop_cpu_ms_per_task']['total'] for r in mine):.2f}, "
              f"transition "
              f"{statistics.mean(r['transition_cpu_ms_per_task']['total'] for r in mine):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
