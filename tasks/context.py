"""Per-process resources of a worker: settings, the hypervisor and the state store.

Created lazily on first use, so nothing is opened before a prefork pool forks; a forked
child notices the new pid and opens its own.
"""

from __future__ import annotations

import os
import threading

from worker.core import settings as settings_mod
from worker.fleet.registry import TTL_INTERVALS
from worker.hypervisor import Hypervisor, shared
from worker.store import connection
from worker.transition import guards as store_mod
from worker.transition.context import Context
from worker.transition.room import Reserve, Room

_lock = threading.Lock()
_cached: dict[int, Context] = {}


def settings() -> settings_mod.Settings:
    return settings_mod.get()


def room(client: connection.StateRedis, hypervisor: Hypervisor,
         s: settings_mod.Settings) -> Room:
    """The host's room checks. libvirt's test driver writes no image: no disk check there."""
    mib = 2**20
    return Room(client, hypervisor, s.host, save_dir=s.save_dir,
                disk_reserve=Reserve(s.save_reserve_fraction, s.save_reserve_mib * mib),
                memory_reserve=Reserve(s.memory_reserve_fraction, s.memory_reserve_mib * mib),
                check_disk=not s.libvirt_uri.startswith("test"))


def context() -> Context:
    """This process's transition context (hypervisor URI fixed by configuration)."""
    pid = os.getpid()
    ctx = _cached.get(pid)
    if ctx is None:
        with _lock:
            ctx = _cached.get(pid)
            if ctx is None:
                s = settings()
                client = connection.for_settings(s)
                hypervisor = shared(
                    s.libvirt_uri, timeout=s.libvirt_timeout,
                    save_timeout=s.libvirt_save_timeout,
                    save_seconds_per_gib=s.libvirt_save_seconds_per_gib,
                    bypass_cache=s.save_bypass_cache,
                )
                ctx = Context(
                    hypervisor=hypervisor,
                    store=store_mod.Store(
                        client, lock_ttl=s.lock_ttl, result_ttl=s.result_ttl,
                        registry_ttl=s.registry_interval * TTL_INTERVALS,
                        wait_replicas=s.state_wait_replicas, wait_timeout=s.state_wait_timeout,
                    ),
                    host=s.host,
                    room=room(client, hypervisor, s),
                    lock_wait=s.lock_wait,
                    verify_timeout=s.verify_timeout,
                )
                _cached.clear()
                _cached[pid] = ctx
    return ctx
