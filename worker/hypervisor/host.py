"""``Hypervisor``: the connections to one libvirt URI, and the way every call is made.

Why a connection per task thread: libvirtd runs at most ``max_client_requests`` (default 5)
calls at once for one client connection, so long managedSave calls from a threaded worker
would queue behind each other on a shared one.

Why every call has a deadline (:mod:`worker.hypervisor.calls`): past it the call is abandoned,
its connection retired, and the task gets ``HypervisorBusy`` naming the call and the seconds
waited, with the still-running call attached as ``exc.outstanding`` (a Future) so the caller
can keep the guest locked until it returns. Errors are translated once
(:mod:`worker.hypervisor.errors`).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from typing import TypeVar, cast

import libvirt

from worker.core import metrics
from worker.core.errors import (
    HypervisorBusy,
    HypervisorUnavailable,
    InvalidTransition,
    UnknownInstance,
)
from worker.core.states import Observed, State
from worker.hypervisor.calls import ABANDONED_MAX, Line, abandon, abandoned
from worker.hypervisor.domain_stats import DomainStats, collect
from worker.hypervisor.errors import translate
from worker.hypervisor.guest import Guest
from worker.hypervisor.testdriver import seed_demo_fleet

log = logging.getLogger("dormant.hypervisor")
T = TypeVar("T")
_GUEST_CACHE_SIZE = 4096  # domain handles kept per thread connection (Hypervisor.observe)


def _looks_like_uuid(instance: str) -> bool:
    try:
        uuidlib.UUID(instance)
    except ValueError:
        return False
    return True


class Hypervisor:
    """Connections to one libvirt URI, fixed by the worker's configuration (never by a caller).

    ``timeout`` bounds every quick call (and connecting); saves and restores get
    ``save_timeout + save_seconds_per_gib x the guest's memory in GiB``.
    """

    def __init__(self, uri: str, *, on_connect: Callable[[libvirt.virConnect], None] | None = None,
                 timeout: float = 30.0, save_timeout: float = 120.0,
                 save_seconds_per_gib: float = 30.0, bypass_cache: bool = True) -> None:
        self.uri = uri
        # Save images written and read with O_DIRECT: faster here, and a drain that exists to
        # free host memory does not fill the page cache with images (docs/operations.md).
        # libvirt's test driver has no cache and rejects the restore flag.
        bypass = bypass_cache and not uri.startswith("test")
        self.save_flags = libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE if bypass else 0
        self.restore_flags = libvirt.VIR_DOMAIN_START_BYPASS_CACHE if bypass else 0
        self.timeout = timeout
        self.save_timeout = save_timeout
        self.save_seconds_per_gib = save_seconds_per_gib
        self._local = threading.local()
        self._on_connect = on_connect
        # uuid -> epoch of the rename/undefine that made every cached handle of it stale
        # (events, worker/drift/watcher.py); handles cached before that epoch are looked up afresh.
        self._forgotten: dict[str, int] = {}
        self._epoch = 0

    def save_deadline(self, memory_bytes: int) -> float:
        return self.save_timeout + self.save_seconds_per_gib * memory_bytes / 2**30

    # -- connection ------------------------------------------------------------------------
    def _open(self, line: Line) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorUnavailable(
                f"hypervisor unavailable: cannot connect to {self.uri}: {exc.get_error_message()}"
            ) from None
        if self._on_connect is not None:
            self._on_connect(conn)
        line.conn = conn
        return conn

    def line(self) -> Line:
        """This thread's line, opened on first use and replaced after it broke or hung.

        A line inherited across fork (a prefork child replaced after the parent connected)
        is forgotten, never used or closed: its socket and thread belong to the parent.
        """
        line: Line | None = getattr(self._local, "line", None)
        if line is not None and not line.retired and line.pid == os.getpid():
            return line
        stuck = abandoned()
        if stuck >= ABANDONED_MAX:
            raise HypervisorBusy(
                f"{stuck} abandoned libvirt calls on {self.uri} are still outstanding; "
                "not opening another connection until some return"
            )
        line = self._local.line = Line()
        what = f"connect to {self.uri}"
        try:
            self._wait(line, what, line.submit(what, lambda: self._open(line)), self.timeout)
        except HypervisorBusy as exc:
            self._local.line = None
            raise HypervisorUnavailable(f"hypervisor unavailable: {exc}") from None
        except BaseException:
            self._local.line = None
            line.retire()
            raise
        return line

    def connection(self) -> libvirt.virConnect:
        """This thread's libvirt connection (see :meth:`line`)."""
        conn = self.line().conn
        assert conn is not None
        return conn

    def _drop(self, line: Line | None = None) -> None:
        current = getattr(self._local, "line", None)
        line = line or current
        if line is current:
            self._local.line = None
        if line is not None and line.pid == os.getpid():
            line.retire()

    def close(self) -> None:
        self._drop()

    def call(self, what: str, fn: Callable[[], T], *, line: Line | None = None,
             timeout: float | None = None) -> T:
        """Run one libvirt call on its connection's thread, within a deadline.

        Its libvirt error is translated; a broken connection is dropped; past the deadline
        the call is abandoned (see the module docstring).
        """
        if line is None:
            line = self.line()
        elif line.retired or line.pid != os.getpid():
            raise HypervisorBusy(f"{what}: its connection was retired after an abandoned call")
        return self._wait(line, what, line.submit(what, fn), timeout or self.timeout)

    def _wait(self, line: Line, what: str, future: Future[T], timeout: float) -> T:
        try:
            return future.result(timeout)
        except FutureTimeout:
            if future.cancel():  # never started: the line is busy with an earlier stuck call
                pass
            else:
                abandon(line)
            self._drop(line)
            metrics.libvirt_call_abandoned()
            log.warning("libvirt call abandoned after %gs: %s", timeout, what)
            busy = HypervisorBusy(f"{what}: no answer from libvirt after {timeout:g}s; "
                                  "call abandoned (connection retired)")
            busy.outstanding = future  # type: ignore[attr-defined]
            busy.seconds = timeout  # type: ignore[attr-defined]
            raise busy from None
        except libvirt.libvirtError as exc:
            err = translate(exc, what)
            if isinstance(err, HypervisorUnavailable):
                self._drop(line)
            raise err from None

    # -- domains ---------------------------------------------------------------------------
    def guest(self, instance: str) -> Guest:
        """Look a guest up by UUID or name; UnknownInstance when there is none."""
        conn, line = self.connection(), self.line()
        lookup = conn.lookupByUUIDString if _looks_like_uuid(instance) else conn.lookupByName
        domain = self.call(f"look up {instance!r}", lambda: lookup(instance), line=line)
        return Guest(domain, self, line)

    def observe(self, instance: str) -> tuple[Guest | None, Observed]:
        """The guest and its state; ``(None, missing)`` when it does not exist.

        A UUID's domain handle is kept per connection: it saves a lookup call on the
        transition hot path (see bench/RESULTS.md). The state is still read every time; a
        handle whose domain has gone is dropped and looked up afresh.
        """
        line = self.line()
        cache = line.guests
        cached = cache.get(instance)
        if cached is not None and self._forgotten.get(instance.lower(), 0) > cached.cached_epoch:
            cache.pop(instance, None)
            cached = None
        if cached is not None:
            try:
                return cached, cached.observe()
            except UnknownInstance:
                cache.pop(instance, None)
        try:
            guest = self.guest(instance)
        except UnknownInstance:
            return None, Observed(State.MISSING)
        if _looks_like_uuid(instance):
            if len(cache) >= _GUEST_CACHE_SIZE:
                cache.clear()
            guest.cached_epoch = self._epoch
            cache[instance] = guest
        return guest, guest.observe()

    def forget(self, uuid: str) -> None:
        """Drop every thread's cached handle of ``uuid`` (renamed, undefined or redefined)."""
        self._epoch += 1
        self._forgotten[uuid.lower()] = self._epoch

    def guests(self) -> list[Guest]:
        conn, line = self.connection(), self.line()
        return [Guest(d, self, line)
                for d in self.call("list domains", conn.listAllDomains, line=line)]

    def ping(self) -> int:
        """libvirt's version number, from a call every healthy libvirtd answers at once."""
        conn, line = self.connection(), self.line()
        return int(self.call("read version of libvirtd", conn.getLibVersion, line=line))

    # -- whole domains (make run's demo fleet only; transitions never create or remove) -----
    def define_and_start(self, xml: str) -> Guest:
        """Define a persistent domain from ``xml`` and start it."""
        conn = self.connection()
        domain = self.call("define domain", lambda: conn.defineXML(xml))
        guest = Guest(domain, self)
        guest._call("start", domain.create)
        return guest

    def remove(self, name: str) -> bool:
        """Destroy ``name``, drop its managed-save image and undefine it; False when absent."""
        conn = self.connection()
        try:
            domain = self.call(f"look up {name!r}", lambda: conn.lookupByName(name))
        except UnknownInstance:
            return False
        with suppress(InvalidTransition):  # not running: nothing to destroy
            self.call(f"destroy {name}", domain.destroy)
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        try:
            self.call(f"undefine {name}", lambda: domain.undefineFlags(flags))
        except UnknownInstance:
            return False
        return True

    def stats(self, *, activity: bool = True) -> Iterator[DomainStats]:
        """One ``getAllDomainStats`` call for every domain (see :mod:`.domain_stats`); only
        their states (no job on any guest) with ``activity=False``."""
        return collect(self, activity=activity)

    def stats_of(self, instances: list[str]) -> list[DomainStats]:
        """The same statistics for some domains only (``virDomainListGetStats``): what a
        check of one guest costs must not grow with the number of guests on its host.
        Instances that do not exist are left out."""
        domains = []
        for instance in instances:
            try:
                domains.append(self.guest(instance).domain)
            except UnknownInstance:
                continue
        if not domains:
            return []
        # Waiting for these guests' own jobs: the reading decides whether to save one.
        return list(collect(cast(Hypervisor, _Some(self, domains)), wait_for_jobs=True))


class _Some:
    """A :class:`Hypervisor` as :func:`.domain_stats.collect` sees it when only some domains
    are wanted: its connection answers ``getAllDomainStats`` (whatever the flags) with
    ``domainListGetStats`` of those domains; everything else is the hypervisor's own."""

    def __init__(self, hypervisor: Hypervisor, domains: list[libvirt.virDomain]) -> None:
        self._hypervisor = hypervisor
        self._domains = domains

    def connection(self) -> _SomeDomains:
        return _SomeDomains(self._hypervisor.connection(), self._domains)

    def __getattr__(self, name: str) -> object:
        return getattr(self._hypervisor, name)


class _SomeDomains:
    def __init__(self, conn: libvirt.virConnect, domains: list[libvirt.virDomain]) -> None:
        self._conn = conn
        self._domains = domains

    def getAllDomainStats(self, stats: int = 0, flags: int = 0) -> list[tuple[object, object]]:
        found: list[tuple[object, object]] = self._conn.domainListGetStats(self._domains, stats,
                                                                           flags)
        return found

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


_shared: dict[str, Hypervisor] = {}
_shared_lock = threading.Lock()


def shared(uri: str, *, bypass_cache: bool = True, **deadlines: float) -> Hypervisor:
    """The process-wide Hypervisor for ``uri`` (connections are still per thread).

    ``deadlines`` (``timeout``, ``save_timeout``, ``save_seconds_per_gib``) and
    ``bypass_cache`` apply when it is first made.
    """
    with _shared_lock:
        if uri not in _shared:
            _shared[uri] = Hypervisor(uri, on_connect=seed_demo_fleet,
                                      bypass_cache=bypass_cache, **deadlines)
        return _shared[uri]


@contextmanager
def connected(uri: str) -> Iterator[Hypervisor]:
    """A private Hypervisor for short-lived tools; closes its connection afterwards."""
    hv = Hypervisor(uri)
    try:
        yield hv
    finally:
        hv.close()
