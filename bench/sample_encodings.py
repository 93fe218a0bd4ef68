"""Ways to keep a day of activity samples in Redis, measured: bytes per guest-day and the time
to load and decide a guest (bench/RESULTS.md "Fleet scale", why the codes were chosen).

The same day of 288 five-minute samples (a quiet guest with some noise) for ``--guests``
guests, stored each way on a private redis-server; memory by Redis's ``MEMORY USAGE`` (and the
growth of ``used_memory``), load + decide timed over all guests in one process:

* ``json-zset``: the old form -- a sorted set of JSON members ``[t, state, cpu, ...]``;
* ``stream``: a Redis stream per guest, one entry of eight fields per sample;
* ``raw-rows SET``: the counters as 47-byte binary rows, one string written with SET;
* ``raw-rows APPEND``: the same rows appended one sample at a time, as a sampler would;
* ``codes APPEND``: dormant's four one-byte codes per sample, appended one at a time;
* ``codes SET (dormant)``: what dormant stores (worker/reclaim/activity.py), through
  ``sampling.store`` -- the record written whole with SET, sample times once per host.

    .venv/bin/python -m bench.sample_encodings --guests 2000
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from tests.support.services import RedisServer, free_port, new_workdir
from worker.reclaim import sampling
from worker.reclaim.activity import Sample
from worker.reclaim.idle import IdlePolicy, decide
from worker.store import keys

DAY, STEP = 288, 300.0
ROW = struct.Struct("<dBqHQQQQ")  # t, state, cpu ns, vcpus, rx, tx, rd, wr: 47 bytes
POLICY = IdlePolicy()


def day(rng: random.Random, times: list[float]) -> list[Sample]:
    """A quiet guest's day at its host's sample times (one stats call samples all guests)."""
    cpu, rx, tx, rd = 10**12, 10**9, 10**9, 10**9
    out = []
    for t in times:
        cpu += int(STEP * 1e9 * rng.uniform(0.0001, 0.01))
        rx += int(STEP * rng.uniform(0, 500))
        tx += int(STEP * rng.uniform(0, 200))
        rd += int(STEP * rng.uniform(0, 1000))
        out.append(Sample(t, "running", cpu, 2, rx, tx, rd, 0))
    return out


def _json(s: Sample) -> str:
    return json.dumps([s.t, "r", s.cpu_ns, s.vcpus, s.rx, s.tx, s.rd, s.wr],
                      separators=(",", ":"))


def _from_json(m: str) -> Sample:
    t, _c, cpu, v, rx, tx, rd, wr = json.loads(m)
    return Sample(t, "running", cpu, v, rx, tx, rd, wr)


def _row(s: Sample) -> bytes:
    return ROW.pack(s.t, 1, s.cpu_ns or 0, s.vcpus, s.rx, s.tx, s.rd, s.wr)


def _rows(blob: bytes) -> list[Sample]:
    return [Sample(t, "running", c, v, rx, tx, rd, wr)
            for t, _s, c, v, rx, tx, rd, wr in ROW.iter_unpack(blob)]


def measure(client: redis.Redis, raw: redis.Redis, name: str, guests: dict[str, list[Sample]],
            write: Callable[[str, list[Sample]], None],
            load: Callable[[list[str]], dict[str, Any]] | None, prefix: str,
            now: float) -> dict[str, Any]:
    before = int(client.info("memory")["used_memory"])
    for uuid, samples in guests.items():
        write(uuid, samples)
    used = (int(client.info("memory")["used_memory"]) - before) / len(guests)
    sizes = [int(raw.memory_usage(f"{prefix}{u}") or 0) for u in list(guests)[:200]]
    result: dict[str, Any] = {"encoding": name, "memory_usage_per_guest_day": round(
        sum(sizes) / len(sizes)), "used_memory_per_guest": round(used)}
    if load is not None:
        uuids = list(guests)
        started = time.perf_counter()
        loaded = load(uuids)
        idle = sum(decide(u, loaded[u], POLICY, now=now).idle for u in uuids)
        result["load_and_decide_us_per_guest"] = round(
            (time.perf_counter() - started) / len(uuids) * 1e6)
        result["idle"] = idle
    raw.flushdb()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=2000)
    args = parser.parse_args(argv)
    rng = random.Random(1)
    now = time.time()
    times = [round(now - (DAY - 1 - k) * STEP + rng.uniform(0, 0.5), 3) for k in range(DAY)]
    guests = {f"{i:08x}-0000-4000-8000-{i:012x}": day(rng, times) for i in range(args.guests)}
    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-bench-encodings-"))
    server.start()
    try:
        client = server.client(2)
        raw = redis.Redis.from_url(server.url(2))
        results = []

        def zset_write(u: str, ss: list[Sample]) -> None:
            client.zadd(f"z:{u}", {_json(s): s.t for s in ss})

        def zset_load(uuids: list[str]) -> dict[str, Any]:
            with client.pipeline(transaction=False) as pipe:
                for u in uuids:
                    pipe.zrangebyscore(f"z:{u}", 0, "+inf")
                return {u: [_from_json(m) for m in ms]
                        for u, ms in zip(uuids, pipe.execute(), strict=True)}

        results.append(measure(client, raw, "json-zset (the old form)", guests, zset_write,
                               zset_load, "z:", now))

        def stream_write(u: str, ss: list[Sample]) -> None:
            with client.pipeline(transaction=False) as pipe:
                for s in ss:
                    pipe.xadd(f"s:{u}", {"t": s.t, "c": s.cpu_ns or 0, "v": s.vcpus, "rx": s.rx,
                                         "tx": s.tx, "rd": s.rd, "wr": s.wr, "s": "r"})
                pipe.execute()

        def stream_load(uuids: list[str]) -> dict[str, Any]:
            with client.pipeline(transaction=False) as pipe:
                for u in uuids:
                    pipe.xrange(f"s:{u}")
                return {u: [Sample(float(f["t"]), "running", int(f["c"]), int(f["v"]),
                                   int(f["rx"]), int(f["tx"]), int(f["rd"]), int(f["wr"]))
                            for _id, f in es] for u, es in zip(uuids, pipe.execute(), strict=True)}

        results.append(measure(client, raw, "stream", guests, stream_write, stream_load, "s:",
                               now))

        def rows_set(u: str, ss: list[Sample]) -> None:
            raw.set(f"r:{u}", b"".join(map(_row, ss)))

        def rows_load(uuids: list[str]) -> dict[str, Any]:
            blobs = cast(list[bytes], raw.mget([f"r:{u}" for u in uuids]))
            return {u: _rows(b) for u, b in zip(uuids, blobs, strict=True)}

        results.append(measure(client, raw, "raw-rows SET (47 B/sample)", guests, rows_set,
                               rows_load, "r:", now))

        def rows_append(u: str, ss: list[Sample]) -> None:
            with raw.pipeline(transaction=False) as pipe:
                for s in ss:
                    pipe.append(f"a:{u}", _row(s))
                pipe.execute()

        results.append(measure(client, raw, "raw-rows APPEND", guests, rows_append, None, "a:",
                               now))

        def codes_append(u: str, ss: list[Sample]) -> None:
            with raw.pipeline(transaction=False) as pipe:
                for _s in ss:
                    pipe.append(f"c:{u}", b"\x01\x02\x03\x04")
                pipe.execute()

        results.append(measure(client, raw, "codes APPEND (4 B/sample)", guests, codes_append,
                               None, "c:", now))

        items = [(u, u, s) for u, ss in guests.items() for s in ss]

        def dormant_write(u: str, ss: list[Sample]) -> None:
            if u == next(iter(guests)):  # one store for the whole host, as a sampler would
                sampling.store(client, "kvm-a", items, window=86400, now=now)

        def dormant_load(uuids: list[str]) -> dict[str, Any]:
            return sampling.load(client, uuids, since=now - 86400, host="kvm-a")

        results.append(measure(client, raw, "codes SET (dormant)", guests, dormant_write,
                               dormant_load, keys.activity(""), now))
    finally:
        server.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
