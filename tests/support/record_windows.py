"""Record real activity samples of tiny KVM guests, for tests/unit/test_activity.py.

    .venv/bin/python -m tests.support.record_windows tests/unit/data/recorded_windows.json

Four guests sampled once a second through ``worker.reclaim.sampling.collect`` (the sampler's
own call), for about two and a half minutes: one halted (idle), one spinning (busy), one halted
that is paused for 20 s, then managed-saved and restored (its counters restart), and one
spinning that is paused for a while. The recorder also stops sampling for 6 s (a gap). What
is written is the raw samples: the test replays them through the storage path and checks the
decisions against the ones made from the raw counters.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import libvirt

from tests.support.guests import GuestFactory
from worker.hypervisor import Hypervisor
from worker.reclaim import sampling

SECONDS = 150
GAP = range(110, 116)  # seconds without a sample


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "recorded_windows.json")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("qemu:///system")
    factory = GuestFactory(conn)
    hv = Hypervisor("qemu:///system")
    try:
        guests = {"idle": factory.create("idle"), "busy": factory.create("busy"),
                  "idle-paused-saved": factory.create("idle"),
                  "busy-paused": factory.create("busy")}
        wanted = {g.uuid: kind for kind, g in guests.items()}
        recorded: dict[str, list[list[object]]] = {kind: [] for kind in guests}
        started = time.monotonic()
        for second in range(SECONDS):
            events = {40: lambda: guests["idle-paused-saved"].domain.suspend(),
                      60: lambda: guests["idle-paused-saved"].domain.resume(),
                      80: lambda: guests["idle-paused-saved"].domain.managedSave(0),
                      90: lambda: guests["idle-paused-saved"].domain.create(),
                      30: lambda: guests["busy-paused"].domain.suspend(),
                      70: lambda: guests["busy-paused"].domain.resume()}
            if second in events:
                events[second]()
            if second not in GAP:
                for uuid, _name, s in sampling.collect(hv, now=time.time()):
                    if uuid in wanted:
                        recorded[wanted[uuid]].append(list(s))
            time.sleep(max(0.0, started + second + 1 - time.monotonic()))  # pacing samples
        out.write_text(json.dumps({"interval_s": 1, "gap_s": [GAP.start, GAP.stop],
                                   "guests": recorded}, indent=None) + "\n")
        print(f"{out}: {sum(len(v) for v in recorded.values())} samples")
    finally:
        hv.close()
        factory.cleanup()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
