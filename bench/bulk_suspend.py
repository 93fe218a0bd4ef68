"""Bulk suspend of N real KVM guests: through dormant vs. one at a time, side by side.

* dormant: one ``dormant.drain`` of exactly this benchmark's guests (``instances=[...]``),
  carried out by a real worker (``--pool threads``, one libvirt connection per thread) with the
  host cap at N, timed from sending the task until its report says every guest is done, then
  checked with libvirt (every guest shut off with a managed-save image).
* one at a time: plain libvirt ``managedSave`` in a loop on one connection, the way
  libvirt-guests saves guests on host shutdown; each save timed on its own, so the same run
  also gives the time of a single managedSave.

Between the two the guests are restored (plain ``create``) and left to settle, so both sides
save the same running guests. Run as root on a host with libvirtd (qemu:///system):

    .venv/bin/python -m bench.bulk_suspend            # N=16, 32 MiB idle guests
    .venv/bin/python -m bench.bulk_suspend -n 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import suppress

import libvirt

from tests.support.guests import GuestFactory, TestGuest
from tests.support.services import (
    RedisServer,
    WorkerProcess,
    free_port,
    new_workdir,
    test_env,
    unique,
    wait_until,
)
from worker.reclaim import run_store

URI = "qemu:///system"


def _all_suspended(conn: libvirt.virConnect, guests: list[TestGuest]) -> bool:
    for g in guests:
        d = conn.lookupByUUIDString(g.uuid)
        if d.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF or not d.hasManagedSaveImage():
            return False
    return True


def _restore(conn: libvirt.virConnect, guests: list[TestGuest]) -> None:
    for g in guests:
        d = conn.lookupByUUIDString(g.uuid)
        if d.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
            d.create()
    wait_until(lambda: all(conn.lookupByUUIDString(g.uuid).state()[0]
                           == libvirt.VIR_DOMAIN_RUNNING for g in guests),
               timeout=60, message="guests running again")


def through_dormant(conn: libvirt.virConnect, guests: list[TestGuest], host: str,
                    redis_server: RedisServer) -> dict[str, float]:
    app = redis_server.celery_client("bench")
    state = redis_server.client(2)
    rid = f"drain:{host}:bench-{unique('')}"
    started = time.perf_counter()
    app.send_task("dormant.drain", kwargs={"run_id": rid, "instances": [g.uuid for g in guests]},
                  queue=f"dormant.{host}")

    def done() -> dict | None:
        report = run_store.load(state, rid)
        return report if report and report["status"] == "done" else None

    report = wait_until(done, timeout=300, interval=0.01, message="drain finished")
    elapsed = time.perf_counter() - started
    app.close()
    outcomes = [e["outcome"] for e in report["entries"]]
    if outcomes.count("suspended") != len(guests) or not _all_suspended(conn, guests):
        raise RuntimeError(f"dormant did not suspend every guest: {outcomes}")
    per_guest = [e["duration_ms"] / 1000 for e in report["entries"]]
    return {"batch_s": elapsed, "slowest_transition_s": max(per_guest),
            "median_transition_s": statistics.median(per_guest)}


def raw_parallel(guests: list[TestGuest]) -> float:
    """The hypervisor's floor: one thread and one connection per guest, managedSave at once."""
    conns = [libvirt.open(URI) for _ in guests]
    barrier = threading.Barrier(len(guests) + 1)
    errors: list[str] = []

    def save(conn: libvirt.virConnect, g: TestGuest) -> None:
        domain = conn.lookupByUUIDString(g.uuid)
        barrier.wait()
        try:
            domain.managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except libvirt.libvirtError as exc:
            errors.append(exc.get_error_message())

    threads = [threading.Thread(target=save, args=(c, g)) for c, g in zip(conns, guests,
                                                                           strict=True)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    if errors:
        raise RuntimeError(f"raw parallel saves failed: {errors}")
    return elapsed


def one_at_a_time(conn: libvirt.virConnect, guests: list[TestGuest]) -> dict[str, float]:
    times = []
    started = time.perf_counter()
    for g in guests:
        t0 = time.perf_counter()
        conn.lookupByUUIDString(g.uuid).managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    if not _all_suspended(conn, guests):
        raise RuntimeError("the sequential loop left a guest unsaved")
    return {"batch_s": total, "single_median_s": statistics.median(times),
            "single_min_s": min(times), "single_max_s": max(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--guests", type=int, default=16)
    parser.add_argument("-c", "--concurrency", type=int, default=16,
                        help="worker threads (and host cap)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="dormant / raw-parallel rounds, alternating (best and median kept)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open(URI)
    factory = GuestFactory(conn)
    redis_server = RedisServer(port=free_port(), workdir=new_workdir("dormant-bench-redis-"))
    worker: WorkerProcess | None = None
    host = unique("bench-host-")
    token = unique("")
    try:
        redis_server.start()
        env = test_env(redis_server, host, DORMANT_RECLAIM_HOST_CAP=str(args.concurrency),
                       DORMANT_RECLAIM_SCOPE=f"dormant-test-bulk{token}-*",
                       DORMANT_LOG_LEVEL="WARNING")
        workdir = new_workdir("dormant-bench-worker-")
        worker = WorkerProcess(name=unique("bench"), env=env, log_path=workdir / "worker.log",
                               args=["-P", "threads", "-c", str(args.concurrency)])
        worker.start()
        guests = [factory.create("idle", name=f"dormant-test-bulk{token}-{i}-p{os.getpid()}")
                  for i in range(args.guests)]
        app = redis_server.celery_client("bench")
        wait_until(lambda: worker.alive() and app.control.ping(
            destination=[worker.nodename], timeout=0.5), timeout=60, interval=0.2,
            message="worker answers")
        app.close()
        time.sleep(3)  # let the guests leave their BIOS: both sides save settled guests

        dormant_runs, raw_runs = [], []
        for _ in range(args.rounds):
            dormant_runs.append(through_dormant(conn, guests, host, redis_server))
            _restore(conn, guests)
            time.sleep(3)  # settle again: every side saves guests that halt
            raw_runs.append(raw_parallel(guests))
            _restore(conn, guests)
            time.sleep(3)
        plain = one_at_a_time(conn, guests)
    finally:
        if worker is not None:
            worker.stop()
        factory.cleanup()
        redis_server.stop()
        with suppress(libvirt.libvirtError):
            conn.close()

    batches = sorted(d["batch_s"] for d in dormant_runs)
    dormant = {"batch_s": statistics.median(batches)}
    result = {
        "guests": args.guests, "memory_mib": 32, "worker": f"threads -c {args.concurrency}",
        "rounds": args.rounds,
        "dormant_batch_s": round(dormant["batch_s"], 3),
        "dormant_batch_best_s": round(batches[0], 3),
        "dormant_batch_all_s": [round(b, 3) for b in (d["batch_s"] for d in dormant_runs)],
        "raw_parallel_median_s": round(statistics.median(raw_runs), 3),
        "raw_parallel_all_s": [round(r, 3) for r in raw_runs],
        "one_at_a_time_s": round(plain["batch_s"], 3),
        "single_managedsave_median_s": round(plain["single_median_s"], 3),
        "single_managedsave_min_max_s": [round(plain["single_min_s"], 3),
                                         round(plain["single_max_s"], 3)],
        "speedup": round(plain["batch_s"] / dormant["batch_s"], 2),
        "batch_over_single": round(dormant["batch_s"] / plain["single_median_s"], 2),
    }
    result["meets_speedup_8x"] = result["speedup"] >= 8
    result["meets_batch_within_1_5x_single"] = result["batch_over_single"] <= 1.5
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.guests} guests of {32} MiB, worker {result['worker']}")
        print(f"  dormant (drain, capped parallel): {result['dormant_batch_s']:.2f} s median "
              f"of {args.rounds} (all: {result['dormant_batch_all_s']})")
        print(f"  raw parallel managedSave threads: {result['raw_parallel_median_s']:.2f} s "
              f"median (all: {result['raw_parallel_all_s']})")
        print(f"  one at a time (managedSave loop):  {result['one_at_a_time_s']:.2f} s")
        print(f"  single managedSave (median):       {result['single_managedsave_median_s']:.2f} s")
        print(f"  speedup {result['speedup']:.1f}x (target >= 8x); batch / single = "
              f"{result['batch_over_single']:.2f} (target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
