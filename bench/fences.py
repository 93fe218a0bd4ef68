"""What recording the fence at the guest costs (worker/transition/fencing.py).

One tiny real KVM guest on the local libvirtd (``qemu:///system``), the transition runner in
this process over a private redis-server, no Celery: the libvirt calls are what is measured.
Alternating A-B-B-A blocks of pause/unpause transitions with the guest check and without it
(``fencing.claim`` replaced by a no-op: the transitions of before), then the two parts of the
check alone (reading the element's copies; writing it to the running domain and its
definition), then suspend/resume pairs both ways.

Run: ``.venv/bin/python -m bench.fences [--cycles 50] [--saves 3]``; recorded in
bench/RESULTS.md, "Fences at the guest".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import libvirt

from tests.support.guests import GuestFactory, TestGuest
from tests.support.services import RedisServer, free_port, new_workdir
from worker.hypervisor import Hypervisor
from worker.store.connection import connect
from worker.transition import fencing
from worker.transition.context import Context, Request
from worker.transition.guards import Store
from worker.transition.runner import run
from worker.transition.table import Action

URI = "qemu:///system"


@contextmanager
def without_guest_check() -> Iterator[None]:
    real = fencing.claim
    fencing.claim = lambda *_a, **_k: fencing.Mark()  # type: ignore[assignment]
    try:
        yield
    finally:
        fencing.claim = real  # type: ignore[assignment]


def timed(fn: Callable[[], object], count: int) -> list[float]:
    """Milliseconds of each of ``count`` calls."""
    out = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50, help="pause+unpause pairs per block")
    parser.add_argument("--saves", type=int, default=3, help="suspend+resume pairs per arm")
    opts = parser.parse_args(argv)
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-bench-fences-"))
    server.start()
    conn = libvirt.open(URI)
    factory = GuestFactory(conn)
    hv = Hypervisor(URI)
    try:
        guest: TestGuest = factory.create("idle")
        ctx = Context(hypervisor=hv, store=Store(connect(server.url(2)), lock_ttl=30,
                                                 result_ttl=600),
                      host="bench", lock_wait=5, verify_timeout=30)
        n = iter(range(10**9))

        def pair(actions: tuple[Action, Action] = (Action.PAUSE, Action.UNPAUSE)) -> None:
            for action in actions:
                result = run(ctx, Request(action=action, instance=guest.uuid,
                                          request_id=f"b-{os.getpid()}-{next(n)}"))
                assert result["outcome"] == "changed", result

        blocks: dict[str, list[float]] = {"with": [], "without": []}
        for arm in ("with", "without", "without", "with") * 2:
            if arm == "with":
                blocks[arm] += timed(pair, opts.cycles)
            else:
                with without_guest_check():
                    blocks[arm] += timed(pair, opts.cycles)
        handle = hv.guest(guest.uuid)
        reads = timed(lambda: fencing.read(handle), 200)
        mark = fencing.read(handle)
        writes = timed(lambda: handle.set_metadata(fencing.NAMESPACE, fencing.KEY,
                                                   fencing.render(mark)), 100)
        saves: dict[str, list[float]] = {"with": [], "without": []}
        saved = (Action.SUSPEND, Action.RESUME)
        for arm in ("with", "without") * opts.saves:
            if arm == "with":
                saves[arm] += timed(lambda: pair(saved), 1)
            else:
                with without_guest_check():
                    saves[arm] += timed(lambda: pair(saved), 1)
    finally:
        hv.close()
        factory.cleanup()
        conn.close()
        server.stop()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    per_transition = (med(blocks["with"]) - med(blocks["without"])) / 2
    per_save_pair = med(saves["with"]) - med(saves["without"])
    print(f"Fences at the guest, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| measured | median | p90 |\n|---|---|---|")
    rows = [
        ("pause + unpause, without the guest check (ms per pair)", blocks["without"]),
        ("pause + unpause, with it (ms per pair)", blocks["with"]),
        ("read the element (running domain and definition)", reads),
        ("write it (the running domain, where it counts while active)", writes),
        ("suspend + resume, without (ms per pair)", saves["without"]),
        ("suspend + resume, with (ms per pair)", saves["with"]),
    ]
    for label, values in rows:
        p90 = sorted(values)[int(len(values) * 0.9) - 1] if len(values) >= 10 else max(values)
        print(f"| {label} | {med(values):.1f} ms | {p90:.1f} ms |")
    print(f"\nper transition that acts: +{per_transition:.1f} ms "
          f"({per_transition / (med(blocks['without']) / 2) * 100:.0f} % of a pause or unpause); "
          f"per suspend+resume pair: {per_save_pair:+.0f} ms "
          f"({per_save_pair / med(saves['without']) * 100:+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
