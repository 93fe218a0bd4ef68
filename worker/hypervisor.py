"""The only module that imports libvirt.

``Hypervisor`` owns connections (one per thread, opened lazily after fork, reopened when
broken) and translates every libvirt error, once, by error code and domain into dormant's
error tree. ``Guest`` wraps one virDomain with one method per meaning.

Why a connection per thread: libvirtd runs at most ``max_client_requests`` (default 5) calls at
once for one client connection, so long managedSave calls from a threaded worker would queue
behind each other on a shared one.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from worker import states
from worker.errors import (
    HypervisorBusy,
    HypervisorRefused,
    HypervisorUnavailable,
    InvalidTransition,
    UnknownInstance,
)
from worker.states import Observed, State
from worker.transitions import Step

log = logging.getLogger(__name__)
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
# Paused reasons a finished job leaves behind (restore or snapshot revert with START_PAUSED).
_SETTLED_JOB_REASONS = {libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
                        libvirt.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT}
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


class Guest:
    """One libvirt domain, with methods named for what they mean to dormant."""

    def __init__(self, domain: libvirt.virDomain, hypervisor: Hypervisor) -> None:
        self._domain = domain
        self._hypervisor = hypervisor
        self.uuid: str = domain.UUIDString()
        self.name: str = domain.name()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self._hypervisor.call(f"{what} {self.name}", fn)

    def observe(self) -> Observed:
        """Read the real state from libvirt (never from a cache)."""
        state, reason = self._call("read state of", self._domain.state)
        has_image = False
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            has_image = bool(self._call("check saved image of", self._domain.hasManagedSaveImage))
        if (state == libvirt.VIR_DOMAIN_PAUSED and reason in _SETTLED_JOB_REASONS
                and not self._job_running()):
            # A managed-save image restored with START_PAUSED stays "paused (migration)" for
            # good once the restore finished: a pause asked for, not a job still moving it.
            return Observed(State.PAUSED, "user")
        return states.from_libvirt(state, reason, has_image)

    def _job_running(self) -> bool:
        try:
            info = self._call("read job of", self._domain.jobInfo)
        except HypervisorRefused:  # a driver without job info (test driver): nothing runs
            return False
        return bool(info) and info[0] != libvirt.VIR_DOMAIN_JOB_NONE

    def pause(self) -> None:
        """Stop the vCPUs, keep memory in RAM (virDomainSuspend)."""
        self._call("pause", self._domain.suspend)

    def unpause(self) -> None:
        self._call("unpause", self._domain.resume)

    def save_memory_to_disk(self) -> None:
        """Managed save; the guest restores *running* whatever state it was saved in."""
        self._call("suspend", lambda: self._domain.managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING))

    def restore(self) -> None:
        """Start from the managed-save image (virDomainCreate)."""
        self._call("resume", self._domain.create)

    def restore_paused(self) -> None:
        self._call(
            "resume paused",
            lambda: self._domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED),
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
        try:
            return self._domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise translate(exc, f"read metadata of {self.name}") from None


def _looks_like_uuid(instance: str) -> bool:
    try:
        uuidlib.UUID(instance)
    except ValueError:
        return False
    return True


class Hypervisor:
    """Connections to one libvirt URI, fixed by the worker's configuration (never by a caller)."""

    def __init__(self, uri: str, *, on_connect: Callable[[libvirt.virConnect], None] | None = None):
        self.uri = uri
        self._local = threading.local()
        self._on_connect = on_connect

    # -- connection ------------------------------------------------------------------------
    def _open(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorUnavailable(
                f"hypervisor unavailable: cannot connect to {self.uri}: {exc.get_error_message()}"
            ) from None
        if self._on_connect is not None:
            self._on_connect(conn)
        return conn

    def connection(self) -> libvirt.virConnect:
        """This thread's connection, opened on first use and reopened after it broke.

        A connection inherited across fork (a prefork child replaced after the parent
        connected) is forgotten, never used or closed: its socket belongs to the parent.
        """
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = self._local.conn = self._open()
            self._local.pid = os.getpid()
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if getattr(self._local, "pid", None) != os.getpid():
            return
        if conn is not None:
            with suppress(libvirt.libvirtError):
                conn.close()

    def close(self) -> None:
        self._drop()

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one libvirt call, translating its error; a broken connection is dropped."""
        try:
            return fn()
        except libvirt.libvirtError as exc:
            err = translate(exc, what)
            if isinstance(err, HypervisorUnavailable):
                self._drop()
            raise err from None

    # -- domains ---------------------------------------------------------------------------
    def guest(self, instance: str) -> Guest:
        """Look a guest up by UUID or name; UnknownInstance when there is none."""
        conn = self.connection()
        lookup = conn.lookupByUUIDString if _looks_like_uuid(instance) else conn.lookupByName
        return Guest(self.call(f"look up {instance!r}", lambda: lookup(instance)), self)

    def observe(self, instance: str) -> tuple[Guest | None, Observed]:
        """The guest and its state; ``(None, missing)`` when it does not exist.

        A UUID's domain handle is kept per thread connection: it saves a lookup call on the
        transition hot path (see bench/RESULTS.md). The state is still read every time; a
        handle whose domain has gone is dropped and looked up afresh.
        """
        conn = self.connection()
        cached_for = getattr(self._local, "guests", None)
        if cached_for is None or cached_for[0] is not conn:  # new thread, reconnect or fork
            cached_for = self._local.guests = (conn, {})
        cache: dict[str, Guest] = cached_for[1]
        cached = cache.get(instance)
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
            cache[instance] = guest
        return guest, guest.observe()

    def guests(self) -> list[Guest]:
        conn = self.connection()
        return [Guest(d, self) for d in self.call("list domains", conn.listAllDomains)]

    def stats(self) -> Iterator[DomainStats]:
        """One ``getAllDomainStats`` call for every domain: state, cpu, vcpu, net, block."""
        conn = self.connection()
        wanted = (
            libvirt.VIR_DOMAIN_STATS_STATE
            | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_VCPU
            | libvirt.VIR_DOMAIN_STATS_INTERFACE
            | libvirt.VIR_DOMAIN_STATS_BLOCK
        )
        records = self.call("read domain stats", lambda: conn.getAllDomainStats(wanted, 0))
        for domain, record in records:
            has_image = False
            state = record.get("state.state", libvirt.VIR_DOMAIN_NOSTATE)
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
                try:
                    has_image = bool(self.call("check image", domain.hasManagedSaveImage))
                except UnknownInstance:  # undefined since the stats call: gone, not an error
                    continue
            reason = record.get("state.reason", 0)
            if state == libvirt.VIR_DOMAIN_PAUSED and reason in _SETTLED_JOB_REASONS:
                try:  # a finished paused restore, or a job still running: Guest tells them apart
                    observed = Guest(domain, self).observe()
                except UnknownInstance:
                    continue
            else:
                observed = states.from_libvirt(state, reason, has_image)
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


def shared(uri: str) -> Hypervisor:
    """The process-wide Hypervisor for ``uri`` (connections are still per thread)."""
    with _shared_lock:
        if uri not in _shared:
            _shared[uri] = Hypervisor(uri, on_connect=_seed_demo_fleet)
        return _shared[uri]


@contextmanager
def connected(uri: str) -> Iterator[Hypervisor]:
    """A private Hypervisor for short-lived tools; closes its connection afterwards."""
    hv = Hypervisor(uri)
    try:
        yield hv
    finally:
        hv.close()


DEMO_FLEET = ("demo-web", "demo-db", "demo-batch", "demo-idle")


def _seed_demo_fleet(conn: libvirt.virConnect) -> None:
    """Give libvirt's in-process test driver a few running guests to play with.

    ``test:///default`` is the embedded default hypervisor; it starts with one domain and is
    private to this process, so defining a demo fleet here touches nothing real.
    """
    if conn.getURI() != "test:///default":
        return
    existing = set(conn.listDefinedDomains()) | {d.name() for d in conn.listAllDomains()}
    for name in DEMO_FLEET:
        if name in existing:
            continue
        xml = (
            f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        )
        try:
            conn.defineXML(xml).create()
        except libvirt.libvirtError as exc:  # another thread seeded it first
            log.debug("demo fleet: %s", exc.get_error_message())
