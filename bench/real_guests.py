"""Suspend and restore of N real Linux guests with filled memory, side by side in one run.

Each guest (tests/support/linux_guest.py) fills ``--fill`` MiB of RAM with incompressible data,
so a save writes that much and more. In one run, on the same guests:

* the disk: direct-I/O sequential write bandwidth of the save directory (the ceiling);
* dormant drain (real worker, ``--pool threads``, host cap ``--cap``) vs raw parallel managedSave
  (one thread and connection per guest, at most ``--cap`` at once, the same flags) vs one at a
  time; dormant restore vs raw parallel restore;
* aggregate MiB/s of each (sum of the save images / wall time) as a fraction of the disk's;
* host MemAvailable before and after each drain (the page cache a buffered save fills);
* ``--sweep``: raw parallel saves at caps 1, 2, 4, 8, 16 (throughput of each);
* ``--buffered``: raw parallel saves without VIR_DOMAIN_SAVE_BYPASS_CACHE, for comparison;
* ``--formats``: each save-image format's speed and size, by piping the first 128 MiB of one
  real image through the program libvirt runs for it (gzip, bzip2, xz, lzop; raw as is).

Every guest's memory checksum is verified after the last restore. Run as root with libvirtd:

    .venv/bin/python -m bench.real_guests                     # 6 x 512 MiB
    .venv/bin/python -m bench.real_guests -n 4 --fill 256 --sweep --buffered --formats --json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import libvirt

from tests.support.linux_guest import LinuxGuest, LinuxGuestFactory
from tests.support.services import (
    RedisServer,
    WorkerProcess,
    free_port,
    new_workdir,
    test_env,
    unique,
    wait_until,
)
from worker.hypervisor import Hypervisor
from worker.reclaim import run_store

URI = "qemu:///system"
_FLAGS = Hypervisor(URI)  # the flags dormant uses by default
SAVE_FLAGS = libvirt.VIR_DOMAIN_SAVE_RUNNING | _FLAGS.save_flags
RESTORE_FLAGS = _FLAGS.restore_flags
SAVE_DIR = Path("/var/lib/libvirt/qemu/save")
MIB = 2**20


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


def direct_write_mib_s(directory: Path, size_mib: int = 1024) -> float:
    """Sequential O_DIRECT writes of 4 MiB blocks, fsync included (then the file is removed)."""
    path = directory / f".dormant-bench-{os.getpid()}"
    block = mmap.mmap(-1, 4 * MIB)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(4 * MIB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(size_mib // 4):
            os.write(fd, block)
        os.fsync(fd)
        return size_mib / (time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def image_mib(guests: list[LinuxGuest]) -> float:
    return sum((SAVE_DIR / f"{g.name}.save").stat().st_size for g in guests) / MIB


def _state(g: LinuxGuest) -> int:
    return g.domain.state()[0]


def raw_parallel(guests: list[LinuxGuest], cap: int, *, save: bool, flags: int) -> float:
    """At most ``cap`` managedSave (or create) calls at once, one connection per thread."""
    local = threading.local()
    barrier = threading.Barrier(min(cap, len(guests)))

    def one(g: LinuxGuest) -> None:
        if getattr(local, "conn", None) is None:
            local.conn = libvirt.open(URI)
            with suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=30)  # connections open before the clock matters
        domain = local.conn.lookupByUUIDString(g.uuid)
        if save:
            domain.managedSave(flags)
        else:
            domain.createWithFlags(flags)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cap) as pool:
        list(pool.map(one, guests))
    return time.perf_counter() - started


def one_at_a_time(guests: list[LinuxGuest], flags: int) -> float:
    started = time.perf_counter()
    for g in guests:
        g.domain.managedSave(flags)
    return time.perf_counter() - started


def restore_all(guests: list[LinuxGuest]) -> None:
    for g in guests:
        if _state(g) == libvirt.VIR_DOMAIN_SHUTOFF:
            g.domain.createWithFlags(RESTORE_FLAGS)


def through_dormant(app, state, host: str, guests: list[LinuxGuest], kind: str,  # type: ignore[no-untyped-def]
                    of_run: str = "") -> tuple[float, str]:
    rid = f"{kind}:{host}:bench-{unique('')}"
    started = time.perf_counter()
    if kind == "drain":
        app.send_task("dormant.drain", kwargs={"run_id": rid,
                                               "instances": [g.uuid for g in guests]},
                      queue=f"dormant.{host}")
    else:
        app.send_task("dormant.restore", kwargs={"run_id": of_run, "restore_id": rid},
                      queue=f"dormant.{host}")
    report = wait_until(lambda: (r := run_store.load(state, rid)) and r["status"] == "done" and r,
                        timeout=900, interval=0.02, message=f"{kind} finished")
    elapsed = time.perf_counter() - started
    outcomes = {e["outcome"] for e in report["entries"]}
    if outcomes != {"suspended" if kind == "drain" else "resumed"}:
        raise RuntimeError(f"dormant {kind}: {outcomes}")
    return elapsed, rid


def formats(image: Path, sample_mib: int = 128) -> dict[str, dict[str, float]]:
    """What each save_image_format costs, by running the program libvirt runs for it on the
    first ``sample_mib`` of a real image (xz needs minutes for a whole one on a loaded host)."""
    sample = image.with_name(f".dormant-bench-sample-{os.getpid()}")
    with image.open("rb") as src:
        sample.write_bytes(src.read(sample_mib * MIB))
    try:
        return _formats(sample)
    finally:
        sample.unlink(missing_ok=True)


def _formats(image: Path) -> dict[str, dict[str, float]]:
    size = image.stat().st_size / MIB
    out: dict[str, dict[str, float]] = {"raw": {"mib": round(size, 1), "s": 0.0, "ratio": 1.0}}
    for name, command in (("gzip", ["gzip", "-c"]), ("bzip2", ["bzip2", "-c"]),
                          ("xz", ["xz", "-c"]), ("lzop", ["lzop", "-c"])):
        if not shutil.which(command[0]):
            out[name] = {"missing": 1.0}
            continue
        with image.open("rb") as src:
            started = time.perf_counter()
            done = subprocess.run(command, stdin=src, capture_output=True, check=True)
            seconds = time.perf_counter() - started
        compressed = len(done.stdout) / MIB
        out[name] = {"mib": round(compressed, 1), "s": round(seconds, 2),
                     "ratio": round(compressed / size, 3), "mib_s": round(size / seconds, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--guests", type=int, default=6)
    parser.add_argument("--fill", type=int, default=512, help="MiB filled per guest")
    parser.add_argument("--cap", type=int, default=0,
                        help="concurrency for dormant and raw parallel (0 = dormant's default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="dormant vs raw rounds, alternating which goes first (median)")
    parser.add_argument("--sweep", action="store_true", help="raw saves at caps 1..16")
    parser.add_argument("--buffered", action="store_true", help="also save without bypass")
    parser.add_argument("--formats", action="store_true", help="save-image format costs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from worker.core.settings import Settings
    cap = args.cap or Settings(host="x").reclaim_host_cap
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open(URI)
    factory = LinuxGuestFactory(conn)
    redis_server = RedisServer(port=free_port(), workdir=new_workdir("dormant-bench-redis-"))
    worker: WorkerProcess | None = None
    host = unique("bench-host-")
    token = unique("")
    result: dict[str, object] = {"guests": args.guests, "fill_mib": args.fill, "cap": cap,
                                 "domain_type": factory.domain_type,
                                 "loadavg_start": os.getloadavg()[0]}
    try:
        redis_server.start()
        env = test_env(redis_server, host, DORMANT_RECLAIM_HOST_CAP=str(cap),
                       DORMANT_RECLAIM_SCOPE=f"dormant-test-real{token}-*",
                       DORMANT_LOG_LEVEL="WARNING")
        worker = WorkerProcess(name=unique("bench"), env=env,
                               log_path=new_workdir("dormant-bench-worker-") / "worker.log",
                               args=["-P", "threads", "-c", str(max(cap, 2))])
        worker.start()
        guests = [factory.create(fill_mib=args.fill,
                                 name=f"dormant-test-real{token}-{i}-p{os.getpid()}")
                  for i in range(args.guests)]
        sums = {g.uuid: g.wait_filled(timeout=1800) for g in guests}
        app = redis_server.celery_client("bench")
        state = redis_server.client(2)
        wait_until(lambda: app.control.ping(destination=[worker.nodename], timeout=0.5),
                   timeout=60, interval=0.2, message="worker answers")

        disk = direct_write_mib_s(SAVE_DIR)
        result["disk_direct_write_mib_s"] = round(disk, 1)

        def record(label: str, seconds: float, mib: float) -> None:
            print(json.dumps({label: round(seconds, 2), "mib": round(mib, 1)}),
                  file=sys.stderr, flush=True)  # a partial record survives a crash
            result[f"{label}_s"] = round(seconds, 2)
            result[f"{label}_mib_s"] = round(mib / seconds, 1)
            result[f"{label}_of_disk"] = round(mib / seconds / disk, 3)

        def dormant_pair() -> None:
            before = mem_available_mib()
            seconds, drain_rid = through_dormant(app, state, host, guests, "drain")
            result["image_mib_total"] = round(image_mib(guests), 1)
            result["memavailable_mib_drain"] = [before, mem_available_mib()]
            record("dormant_drain", seconds, image_mib(guests))
            seconds, _ = through_dormant(app, state, host, guests, "restore", drain_rid)
            record("dormant_restore", seconds, mib)

        def raw_pair() -> None:
            before = mem_available_mib()
            record("raw_parallel_save", raw_parallel(guests, cap, save=True, flags=SAVE_FLAGS),
                   mib)
            result["memavailable_mib_raw"] = [before, mem_available_mib()]
            record("raw_parallel_restore",
                   raw_parallel(guests, cap, save=False, flags=RESTORE_FLAGS), mib)

        # Rounds alternate which side goes first (A-B, B-A, ...): order effects cancel out.
        guests[0].domain.managedSave(SAVE_FLAGS)
        mib = image_mib(guests[:1]) * len(guests)  # refined by the first drain
        restore_all(guests)
        ratios: dict[str, list[float]] = {"drain": [], "restore": []}
        for n in range(args.rounds):
            for side in ((dormant_pair, raw_pair) if n % 2 == 0 else (raw_pair, dormant_pair)):
                side()
            mib = float(result["image_mib_total"])  # type: ignore[arg-type]
            ratios["drain"].append(result["raw_parallel_save_s"]  # type: ignore[operator]
                                   / result["dormant_drain_s"])
            ratios["restore"].append(result["raw_parallel_restore_s"]  # type: ignore[operator]
                                     / result["dormant_restore_s"])
        result["dormant_drain_over_raw_rounds"] = [round(r, 3) for r in ratios["drain"]]
        result["dormant_restore_over_raw_rounds"] = [round(r, 3) for r in ratios["restore"]]
        result["dormant_drain_over_raw"] = round(statistics.median(ratios["drain"]), 3)
        result["dormant_restore_over_raw"] = round(statistics.median(ratios["restore"]), 3)

        record("one_at_a_time_save", one_at_a_time(guests, SAVE_FLAGS), mib)
        restore_all(guests)

        if args.buffered:
            flags = SAVE_FLAGS & ~libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE
            before = mem_available_mib()
            record("buffered_parallel_save", raw_parallel(guests, cap, save=True, flags=flags),
                   image_mib(guests))
            result["memavailable_mib_buffered"] = [before, mem_available_mib()]
            record("buffered_parallel_restore",
                   raw_parallel(guests, cap, save=False, flags=0), mib)
        if args.sweep:
            sweep = {}
            for c in (1, 2, 4, 8, 16):
                seconds = raw_parallel(guests, c, save=True, flags=SAVE_FLAGS)
                sweep[c] = round(mib / seconds, 1)
                print(json.dumps({"sweep_cap": c, "mib_s": sweep[c]}), file=sys.stderr,
                      flush=True)
                restore_all(guests)
            best = max(sweep.values())
            result["sweep_mib_s"] = sweep
            result["default_cap_share_of_best"] = round(sweep.get(cap, 0) / best, 3) \
                if cap in sweep else None
        if args.formats:
            guests[0].domain.managedSave(SAVE_FLAGS)
            result["formats"] = formats(SAVE_DIR / f"{guests[0].name}.save")
            print(json.dumps(result["formats"]), file=sys.stderr, flush=True)
            restore_all(guests)
        for g in guests:
            if g.checksum(timeout=600) != sums[g.uuid]:
                raise RuntimeError(f"{g.name}: memory changed across the benchmark")
        result["memory_intact"] = True
        result["loadavg_end"] = os.getloadavg()[0]
    finally:
        if worker is not None:
            worker.stop()
        factory.cleanup()
        redis_server.stop()
        with suppress(libvirt.libvirtError):
            conn.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
