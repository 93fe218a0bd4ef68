"""The simulated hypervisor of one ``make fleet`` host (bench/fleet.py), and nothing else.

bench/fleet.py puts this directory on the PYTHONPATH of the ``celery -A tasks worker``
processes it starts (and of no other process), with ``FLEET_SIM_GUESTS`` naming this host's
generated guests. Python imports ``sitecustomize`` at start-up, before Celery and dormant:

* it defines and starts those guests in libvirt's in-process test driver (``test:///default``,
  the worker's ``DORMANT_LIBVIRT_URI``), one instance shared by every connection of the
  worker, and keeps a connection open, since the driver's state lives while one does;
* the test driver reports no ``cpu.time`` (ENVIRONMENT.md), without which dormant's re-check
  before each suspend rightly refuses to act, and no network or disk. So the stats of these
  guests get synthetic counters, the same functions of time as the day of samples the
  simulation stored (fleet_activity.py).

Everything else -- tasks, runs, transitions, Redis -- is dormant's own code, unchanged.
"""

from __future__ import annotations

import json
import os
import time

_GUESTS = os.environ.get("FLEET_SIM_GUESTS")
if _GUESTS:
    import dataclasses

    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    _conn = libvirt.open("test:///default")  # kept: the in-process driver lives while it does
    for _dom in _conn.listAllDomains():
        if _dom.name() == "test":  # the driver's own sample domain: not part of the fleet
            _dom.destroy()
            _dom.undefine()
    with open(_GUESTS) as _f:
        for _name, _uuid in json.load(_f):
            _conn.defineXML(
                f"<domain type='test'><name>{_name}</name><uuid>{_uuid}</uuid>"
                "<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os>"
                "</domain>").create()

    from fleet_activity import counters, kind_of  # type: ignore[import-not-found]

    from worker.hypervisor import domain_stats, host

    _collect = domain_stats.collect

    def _with_cpu(hypervisor, *, activity=True, **kw):  # type: ignore[no-untyped-def]
        now = time.time()
        for st in _collect(hypervisor, activity=activity, **kw):
            if activity and st.cpu_time_ns is None:
                cpu, rx, tx, disk = counters(kind_of(st.name), now, live=True)
                st = dataclasses.replace(st, cpu_time_ns=cpu, net_rx_bytes=rx,
                                         net_tx_bytes=tx, block_rd_bytes=disk)
            yield st

    domain_stats.collect = _with_cpu
    host.collect = _with_cpu  # type: ignore[attr-defined]
