"""The only module that imports libvirt.

``Hypervisor`` owns connections and translates every libvirt error, once, by error code and
domain into dormant's error tree. ``Guest`` wraps one virDomain with one method per meaning.

Why a connection per task thread: libvirtd runs at most ``max_client_requests`` (default 5)
calls at once for one client connection, so long managedSave calls from a threaded worker
would queue behind each other on a shared one.

Why every call has a deadline: a libvirt call can block for ever (a QEMU stuck in D-state, a
domain whose lock libvirtd leaked, a hung libvirtd) and a Python thread blocked in C cannot be
interrupted. So each connection is a :class:`_Line`: the connection plus the one thread that
makes every call on it (libvirt-python releases the GIL during a call). The task thread hands
the call over and waits with a timeout. Past the deadline the call is *abandoned*: the line is
retired (never used again; the next call opens a fresh one), and the task gets
``HypervisorBusy`` naming the call and the seconds waited, with the still-running call attached
as ``exc.outstanding`` (a Future) so the caller can keep the guest locked until it returns.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import libvirt

from worker.core import metrics, states
from worker.core.errors import (
    HypervisorBusy,
    HypervisorRefused,
    HypervisorUnavailable,
    InvalidTransition,
    UnknownInstance,
)
from worker.core.states import Observed, State
from worker.demo.fleet import FLEET
from worker.hypervisor.forkgate import gate
from worker.transition.table import Step

log = logging.getLogger("dormant.hypervisor")
T = TypeVar("T")

# Error codes that mean the connection to libvirtd is gone or never came up.
_CONNECTION_CODES = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
}
# Codes that mean "connection lost" only when raised by the remote/RPC layer.
_REMOTE_CODES = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR}
_REMOTE_DOMAINS = {libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC}
# Codes that usually pass: the domain's state-change lock, an agent or a job in progress.
_BUSY_CODES = {
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
}
_MISSING_CODES = {libvirt.VIR_ERR_NO_DOMAIN}
_GUEST_CACHE_SIZE = 4096  # domain handles kept per thread connection (Hypervisor.observe)
_INVALID_CODES = {libvirt.VIR_ERR_OPERATION_INVALID}


def _quiet_error_handler(_ctx: object, err: tuple[Any, ...]) -> None:
    """Keep libvirt from printing every error to stderr; errors still raise as exceptions."""
    log.debug("libvirt: %s", err[2] if len(err) > 2 else err)


libvirt.registerErrorHandler(_quiet_error_handler, None)


def translate(exc: libvirt.libvirtError, what: str) -> Exception:
    """Map a libvirtError to dormant's tree by code and domain, never by message text."""
    code, domain = exc.get_error_code(), exc.get_error_domain()
    detail = f"{what}: {exc.get_error_message()} (libvirt error {code})"
    if code in _CONNECTION_CODES or (code in _REMOTE_CODES and domain in _REMOTE_DOMAINS):
        return HypervisorUnavailable(f"hypervisor unavailable: {detail}")
    if code in _BUSY_CODES:
        return HypervisorBusy(detail)
    if code in _MISSING_CODES:
        return UnknownInstance(detail)
    if code in _INVALID_CODES:
        return InvalidTransition(detail)
    return HypervisorRefused(detail)


@dataclass(frozen=True)
class DomainStats:
    """One ``getAllDomainStats`` record, flattened to what reclamation needs."""

    uuid: str
    name: str
    state: State
    cpu_time_ns: int | None
    vcpus: int
    net_rx_bytes: int
    net_tx_bytes: int
    block_rd_bytes: int
    block_wr_bytes: int


# -- calls in flight -------------------------------------------------------------------------
_inflight: dict[int, tuple[str, float]] = {}  # id(future) -> (what, monotonic start)
_ABANDONED_MAX = 32  # retired lines whose call is still outstanding, per process


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
_abandoned: set[_Line] = set()
_abandoned_lock = threading.Lock()


def _forget_the_parents_calls() -> None:
    """In a forked child: the parent's calls and stuck lines are not this process's."""
    global _abandoned_lock
    _inflight.clear()
    _abandoned.clear()
    _abandoned_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_the_parents_calls)


class _Line:
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


class Guest:
    """One libvirt domain, with methods named for what they mean to dormant."""

    def __init__(self, domain: libvirt.virDomain, hypervisor: Hypervisor,
                 line: _Line | None = None) -> None:
        self._domain = domain
        self._hypervisor = hypervisor
        self._line = line  # the connection the handle belongs to; its calls go there
        self.uuid: str = domain.UUIDString()
        self.name: str = domain.name()
        self.cached_epoch = 0  # Hypervisor.observe's cache: the epoch this handle was kept at

    def _call(self, what: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        return self._hypervisor.call(f"{what} {self.name}", fn, line=self._line,
                                     timeout=timeout)

    def observe(self) -> Observed:
        """Read the real state from libvirt (never from a cache)."""
        state, reason = self._call("read state of", self._domain.state)
        has_image = False
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            has_image = bool(self._call("check saved image of", self._domain.hasManagedSaveImage))
        job = self.job_running() if states.needs_job_check(state, reason) else True
        return states.from_libvirt(state, reason, has_image, job_running=job)

    def job_running(self) -> bool:
        """Whether a libvirt job (save, restore, migration...) is moving this guest now."""
        try:
            info = self._call("read job of", self._domain.jobInfo)
        except HypervisorRefused:  # a driver without job info (test driver): nothing runs
            return False
        return bool(info) and info[0] != libvirt.VIR_DOMAIN_JOB_NONE

    def _save_deadline(self) -> float:
        """Seconds a save or restore may take: a base plus a share per GiB of memory."""
        kib = self._call("read memory size of", self._domain.maxMemory)
        return self._hypervisor.save_deadline(int(kib) * 1024)

    def pause(self) -> None:
        """Stop the vCPUs, keep memory in RAM (virDomainSuspend)."""
        self._call("pause", self._domain.suspend)

    def unpause(self) -> None:
        self._call("unpause", self._domain.resume)

    def save_memory_to_disk(self) -> None:
        """Managed save; the guest restores *running* whatever state it was saved in."""
        flags = libvirt.VIR_DOMAIN_SAVE_RUNNING | self._hypervisor.save_flags
        self._call("suspend", lambda: self._domain.managedSave(flags),
                   timeout=self._save_deadline())

    def restore(self) -> None:
        """Start from the managed-save image (virDomainCreate)."""
        flags = self._hypervisor.restore_flags
        self._call("resume", lambda: self._domain.createWithFlags(flags),
                   timeout=self._save_deadline())

    def restore_paused(self) -> None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED | self._hypervisor.restore_flags
        self._call(
            "resume paused",
            lambda: self._domain.createWithFlags(flags),
            timeout=self._save_deadline(),
        )

    def run(self, step: Step) -> None:
        """Perform one planned step."""
        {
            Step.PAUSE: self.pause,
            Step.UNPAUSE: self.unpause,
            Step.SAVE: self.save_memory_to_disk,
            Step.RESTORE: self.restore,
            Step.RESTORE_PAUSED: self.restore_paused,
        }[step]()

    def metadata(self, namespace: str) -> str | None:
        """The element dormant keeps in the domain's ``<metadata>``, or None."""
        def read() -> str | None:
            try:
                return cast(str | None, self._domain.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise
        return self._call("read metadata of", read)


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
        # (events, worker/events.py); handles cached before that epoch are looked up afresh.
        self._forgotten: dict[str, int] = {}
        self._epoch = 0

    def save_deadline(self, memory_bytes: int) -> float:
        return self.save_timeout + self.save_seconds_per_gib * memory_bytes / 2**30

    # -- connection ------------------------------------------------------------------------
    def _open(self, line: _Line) -> libvirt.virConnect:
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

    def line(self) -> _Line:
        """This thread's line, opened on first use and replaced after it broke or hung.

        A line inherited across fork (a prefork child replaced after the parent connected)
        is forgotten, never used or closed: its socket and thread belong to the parent.
        """
        line: _Line | None = getattr(self._local, "line", None)
        if line is not None and not line.retired and line.pid == os.getpid():
            return line
        with _abandoned_lock:
            stuck = len(_abandoned)
        if stuck >= _ABANDONED_MAX:
            raise HypervisorBusy(
                f"{stuck} abandoned libvirt calls on {self.uri} are still outstanding; "
                "not opening another connection until some return"
            )
        line = self._local.line = _Line()
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

    def _drop(self, line: _Line | None = None) -> None:
        current = getattr(self._local, "line", None)
        line = line or current
        if line is current:
            self._local.line = None
        if line is not None and line.pid == os.getpid():
            line.retire()

    def close(self) -> None:
        self._drop()

    def call(self, what: str, fn: Callable[[], T], *, line: _Line | None = None,
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

    def _wait(self, line: _Line, what: str, future: Future[T], timeout: float) -> T:
        try:
            return future.result(timeout)
        except FutureTimeout:
            if future.cancel():  # never started: the line is busy with an earlier stuck call
                pass
            else:
                with _abandoned_lock:
                    _abandoned.add(line)
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

    def stats(self) -> Iterator[DomainStats]:
        """One ``getAllDomainStats`` call for every domain: state, cpu, vcpu, net, block."""
        conn, line = self.connection(), self.line()
        wanted = (
            libvirt.VIR_DOMAIN_STATS_STATE
            | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_VCPU
            | libvirt.VIR_DOMAIN_STATS_INTERFACE
            | libvirt.VIR_DOMAIN_STATS_BLOCK
        )
        records = self.call("read domain stats", lambda: conn.getAllDomainStats(wanted, 0),
                            line=line)
        for domain, record in records:
            has_image = False
            state = record.get("state.state", libvirt.VIR_DOMAIN_NOSTATE)
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
                try:
                    has_image = bool(self.call("check image", domain.hasManagedSaveImage,
                                               line=line))
                except UnknownInstance:  # undefined since the stats call: gone, not an error
                    continue
            reason = record.get("state.reason", 0)
            job = True
            if states.needs_job_check(state, reason):
                try:  # a finished paused restore, or a job still running
                    job = Guest(domain, self, line).job_running()
                except UnknownInstance:
                    continue
            observed = states.from_libvirt(state, reason, has_image, job_running=job)
            yield DomainStats(
                uuid=domain.UUIDString(),
                name=domain.name(),
                state=observed.state,
                cpu_time_ns=record.get("cpu.time"),
                vcpus=int(record.get("vcpu.current", record.get("vcpu.maximum", 1)) or 1),
                net_rx_bytes=_sum(record, "net", "rx.bytes"),
                net_tx_bytes=_sum(record, "net", "tx.bytes"),
                block_rd_bytes=_sum(record, "block", "rd.bytes"),
                block_wr_bytes=_sum(record, "block", "wr.bytes"),
            )


def _sum(record: dict[str, Any], group: str, field: str) -> int:
    count = int(record.get(f"{group}.count", 0))
    return sum(int(record.get(f"{group}.{i}.{field}", 0)) for i in range(count))


_shared: dict[str, Hypervisor] = {}
_shared_lock = threading.Lock()


def shared(uri: str, *, bypass_cache: bool = True, **deadlines: float) -> Hypervisor:
    """The process-wide Hypervisor for ``uri`` (connections are still per thread).

    ``deadlines`` (``timeout``, ``save_timeout``, ``save_seconds_per_gib``) and
    ``bypass_cache`` apply when it is first made.
    """
    with _shared_lock:
        if uri not in _shared:
            _shared[uri] = Hypervisor(uri, on_connect=_seed_demo_fleet,
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


def _seed_demo_fleet(conn: libvirt.virConnect) -> None:
    """Give libvirt's in-process test driver ``make run``'s demo fleet (the fallback where
    libvirtd cannot run): the same names and UUIDs as the real one (worker/demo_fleet.py).

    ``test:///default`` is the embedded default hypervisor; it starts with one domain and is
    private to this process, so defining a demo fleet here touches nothing real. Its guests
    report no CPU time, so reclamation never finds them idle.
    """
    if conn.getURI() != "test:///default":
        return
    existing = set(conn.listDefinedDomains()) | {d.name() for d in conn.listAllDomains()}
    for guest in FLEET:
        if guest.name in existing:
            continue
        xml = (
            f"<domain type='test'><name>{guest.name}</name><uuid>{guest.uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        )
        try:
            conn.defineXML(xml).create()
        except libvirt.libvirtError as exc:  # another thread seeded it first
            log.debug("demo fleet: %s", exc.get_error_message())


# -- lifecycle events ------------------------------------------------------------------------
# Kept at the end of the module and self-contained: only worker/events.py uses it, in a
# process of its own (see EventStream).

@dataclass(frozen=True)
class DomainEvent:
    """One lifecycle event as libvirt said it: virDomainEventType and its detail code."""

    uuid: str
    name: str
    event: int
    detail: int
    at: float


_event_loop_pid = 0
_event_loop_lock = threading.Lock()


def _run_event_loop() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.warning("libvirt event loop iteration failed")


def _ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it on a daemon thread.

    Registration must come before the connection that wants events is opened, and it is
    for good: every connection this process opens afterwards gets a server keepalive that
    only a running loop answers. That is why an EventStream lives in a process of its own:
    a forked Celery pool child would inherit the registration without the loop, and libvirtd
    drops its idle connections after about 30 s (measured here).
    """
    global _event_loop_pid
    with _event_loop_lock:
        if _event_loop_pid == os.getpid():
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-event-loop", daemon=True).start()
        _event_loop_pid = os.getpid()


class EventStream:
    """Domain lifecycle events of one libvirt URI, resubscribed after every reconnect.

    ``run`` blocks until ``stop`` is set: it opens its own connection (keepalive on, so a dead
    libvirtd is noticed within ``keepalive_interval * (keepalive_count + 1)`` seconds even
    with no event flowing), subscribes to ``VIR_DOMAIN_EVENT_ID_LIFECYCLE`` (which in libvirt
    9.0 also carries defined/undefined, with RENAMED details for a rename), reports
    ``connected``/``disconnected`` through ``on_status`` and opens a fresh connection after
    libvirt's close callback says the old one went away. ``on_event`` runs on libvirt's event
    loop thread: it must only hand the event on, never call libvirt.
    """

    def __init__(self, uri: str, *, keepalive_interval: int = 5, keepalive_count: int = 3,
                 retry_max: float = 5.0) -> None:
        self.uri = uri
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self.retry_max = retry_max

    def run(self, on_event: Callable[[DomainEvent], None], on_status: Callable[[str], None],
            stop: threading.Event) -> None:
        _ensure_event_loop()
        pause = 0.1
        while not stop.is_set():
            closed = threading.Event()
            try:
                conn, callback_id = self._subscribe(on_event, closed)
            except libvirt.libvirtError as exc:
                on_status(f"unavailable: {exc.get_error_message()}")
                stop.wait(pause)
                pause = min(pause * 2, self.retry_max)
                continue
            pause = 0.1
            on_status("connected")
            while not stop.is_set() and not closed.wait(0.25):
                pass
            on_status("disconnected")
            self._unsubscribe(conn, callback_id)

    def _subscribe(self, on_event: Callable[[DomainEvent], None],
                   closed: threading.Event) -> tuple[libvirt.virConnect, int]:
        conn = libvirt.open(self.uri)
        try:
            try:
                conn.setKeepAlive(self.keepalive_interval, self.keepalive_count)
            except libvirt.libvirtError as exc:  # a local driver (test:///) has no keepalive
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
            conn.registerCloseCallback(lambda _conn, _reason, _opaque: closed.set(), None)

            def lifecycle(_conn: object, dom: libvirt.virDomain, event: int, detail: int,
                          _opaque: object) -> None:
                on_event(DomainEvent(uuid=dom.UUIDString(), name=dom.name(), event=event,
                                     detail=detail, at=time.time()))

            callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)
        except libvirt.libvirtError:
            with suppress(libvirt.libvirtError):
                conn.close()
            raise
        return conn, callback_id

    @staticmethod
    def _unsubscribe(conn: libvirt.virConnect, callback_id: int) -> None:
        for undo in (lambda: conn.domainEventDeregisterAny(callback_id),
                     conn.unregisterCloseCallback, conn.close):
            with suppress(libvirt.libvirtError):
                undo()
