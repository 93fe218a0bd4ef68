"""libvirt calls with deadlines: each connection is a :class:`Line`, one thread making every call.

A libvirt call can block for ever (a QEMU stuck in D-state, a domain whose lock libvirtd
leaked, a hung libvirtd) and a Python thread blocked in C cannot be interrupted. So the task
thread hands each call to its connection's own thread (libvirt-python releases the GIL during
a call) and waits with a timeout. Past the deadline the call is *abandoned*: the line is retired
(never used again; the next call opens a fresh one) and counted here until its call returns,
so the caller can keep the guest locked meanwhile and a hung libvirtd cannot make a worker
open connections without end.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

import libvirt

from worker.core import metrics
from worker.hypervisor.forkgate import gate

if TYPE_CHECKING:
    from worker.hypervisor.guest import Guest

T = TypeVar("T")

_inflight: dict[int, tuple[str, float]] = {}  # id(future) -> (what, monotonic start)
ABANDONED_MAX = 32  # retired lines whose call is still outstanding, per process


def calls_in_flight() -> tuple[int, float]:
    """How many libvirt calls this process is making now, and the age of the oldest (s)."""
    starts = [start for _what, start in list(_inflight.values())]
    if not starts:
        return 0, 0.0
    return len(starts), time.monotonic() - min(starts)


metrics.watch_libvirt_calls(calls_in_flight)


def oldest_calls(limit: int = 5) -> list[tuple[str, float]]:
    """The longest-running calls: (what, seconds), oldest first (for logs and health)."""
    now = time.monotonic()
    rows = sorted(list(_inflight.values()), key=lambda row: row[1])[:limit]
    return [(what, now - start) for what, start in rows]


_STOP = object()
_line_numbers = itertools.count(1)
_abandoned: set[Line] = set()
_abandoned_lock = threading.Lock()


def abandon(line: Line) -> None:
    """Count ``line`` as stuck until its outstanding call returns."""
    with _abandoned_lock:
        _abandoned.add(line)


def abandoned() -> int:
    """Retired lines whose call has not returned yet."""
    with _abandoned_lock:
        return len(_abandoned)


def _forget_the_parents_calls() -> None:
    """In a forked child: the parent's calls and stuck lines are not this process's."""
    global _abandoned_lock
    _inflight.clear()
    _abandoned.clear()
    _abandoned_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_the_parents_calls)


class Line:
    """One libvirt connection and the one daemon thread that makes every call on it.

    Daemon, not a ThreadPoolExecutor: an executor's threads are joined at interpreter exit,
    so a call stuck for ever would keep the worker from exiting.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.conn: libvirt.virConnect | None = None
        self.retired = False
        self.guests: dict[str, Guest] = {}  # domain handles of this connection (observe)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"dormant-libvirt-{next(_line_numbers)}")
        self._thread.start()

    def submit(self, what: str, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((future, what, fn))
        return future

    def retire(self) -> None:
        """Never use this line again; its thread closes the connection once idle."""
        if not self.retired:
            self.retired = True
            self._jobs.put(_STOP)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                break
            future, what, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            key = id(future)
            _inflight[key] = (what, time.monotonic())
            try:
                with gate.calling():  # never inside libvirt while the process forks
                    result = fn()
                future.set_result(result)
            except BaseException as exc:  # handed to the waiting task thread
                future.set_exception(exc)
            finally:
                _inflight.pop(key, None)
        with _abandoned_lock:
            _abandoned.discard(self)
        if self.conn is not None and self.pid == os.getpid():
            with suppress(libvirt.libvirtError):
                self.conn.close()
        self.conn = None
