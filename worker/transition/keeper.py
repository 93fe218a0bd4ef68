"""The lock keeper: one daemon thread per process renewing every instance lock it holds.

A transition's lock lives ``DORMANT_LOCK_TTL`` in Redis and is renewed every third of it
while its holder is alive, so a managed save that takes minutes keeps its lock while a dead
worker's lapses by itself. The keeper also bounds its own work: see :class:`Keeper`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

import redis

from worker.core.errors import StateStoreUnavailable

if TYPE_CHECKING:
    from worker.transition.guards import Store

log = logging.getLogger("dormant.store")


class Keeper:
    """One daemon thread per process renewing every lock the process holds.

    A lock stops being renewed when it is released, when a renewal finds it is no longer
    this holder's (it lapsed and was taken), or when renewals have failed for longer than
    its TTL (Redis unreachable all that time: it has lapsed there, and the transition learns
    so when it records its result) -- so a lost lock never slows the renewal of the others.
    """

    def __init__(self) -> None:
        # (id(store), key) -> (store, value, when it was last renewed: time.monotonic())
        self._held: dict[tuple[int, str], tuple[Store, str, float]] = {}
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._interval = 0.0  # seconds the keeper sleeps now; a shorter-lived lock wakes it
        self._wake = threading.Event()

    def add(self, store: Store, key: str, value: str) -> None:
        with self._mutex:
            self._held[(id(store), key)] = (store, value, time.monotonic())
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="dormant-lock-keeper",
                                                daemon=True)
                self._thread.start()
            elif store.lock_ttl_ms / 3000 < self._interval:
                self._wake.set()  # asleep for longer than this lock lives: renew sooner

    def held(self) -> dict[tuple[int, str], tuple[Store, str, float]]:
        """What is renewed now (a copy)."""
        with self._mutex:
            return dict(self._held)

    def remove(self, store: Store, key: str) -> None:
        with self._mutex:
            self._held.pop((id(store), key), None)

    def _run(self) -> None:
        while True:
            with self._mutex:  # with the snapshot, so add() compares against this sleep
                held = list(self._held.items())
                interval = min((s.lock_ttl_ms for _, (s, _v, _t) in held),
                               default=30_000) / 3000
                self._interval = max(interval, 0.05)
            for ident, (store, value, renewed) in held:
                self._renew(ident, store, value, renewed)
            self._wake.wait(self._interval)
            self._wake.clear()

    def _renew(self, ident: tuple[int, str], store: Store, value: str, renewed: float) -> None:
        key = ident[1]
        try:
            ours = store.renew(key, value)
        except (redis.RedisError, StateStoreUnavailable) as exc:
            lapsed = time.monotonic() - renewed > store.lock_ttl_ms / 1000
            log.warning("could not renew %s: %s%s", key, exc,
                        " (lapsed by now: no longer renewed)" if lapsed else "")
            if lapsed:
                self._drop(ident, value)
            return
        if not ours:
            log.warning("%s is no longer this holder's (it lapsed): no longer renewed", key)
            self._drop(ident, value)
            return
        with self._mutex:
            if self._held.get(ident, (None, None))[1] == value:
                self._held[ident] = (store, value, time.monotonic())

    def _drop(self, ident: tuple[int, str], value: str) -> None:
        with self._mutex:
            if self._held.get(ident, (None, None))[1] == value:  # not a newer hold of it
                del self._held[ident]


keeper = Keeper()
