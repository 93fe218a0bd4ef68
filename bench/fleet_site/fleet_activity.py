"""The simulated guests' activity, one function of time for every counter: the day of samples
bench/fleet.py stores and what the simulated hosts' stats say now (sitecustomize.py) agree.

A guest's kind is the last part of its name (``h007-g0042-idle``): ``idle`` (0.02 % of a vCPU,
a trickle of network and disk), ``busy`` (50 %, busy network and disk), ``reset`` (idle, its
counters restart halfway through the day), ``gap`` (idle, three hours without samples and an
hour paused), ``late`` (idle all day, busy now: the re-check before the suspend must keep
it), ``adhoc`` (idle, outside reclamation's scope: the ad-hoc transitions' targets).
"""

from __future__ import annotations

KINDS = ("idle", "busy", "reset", "gap", "late")
SUSPENDED_KINDS = frozenset({"idle", "reset", "gap"})  # what one night must suspend, once each
IDLE = (0.0002, 50.0, 20.0, 100.0)  # vCPU share, rx, tx, disk bytes/s
BUSY = (0.5, 5000.0, 2000.0, 50000.0)


def kind_of(name: str) -> str:
    return name.rsplit("-", 1)[-1]


def counters(kind: str, t: float, *, live: bool, since: float = 0.0
             ) -> tuple[int, int, int, int]:
    """(cpu ns, rx, tx, disk bytes) at ``t`` seconds: cumulative, as libvirt reports them.
    ``live``: what the host says now (a ``late`` guest is busy now); ``since``: when the
    counters last restarted."""
    cpu, rx, tx, disk = BUSY if kind == "busy" or (live and kind == "late") else IDLE
    up = t - since
    return int(cpu * up * 1e9), int(rx * up), int(tx * up), int(disk * up)
