"""Domain lifecycle events, for the drift watcher's pump process (``worker/drift/pump.py``).

Self-contained on purpose: registering libvirt's event loop changes every connection the
process opens afterwards (see :func:`_ensure_event_loop`), so only the pump imports this.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import libvirt

log = logging.getLogger("dormant.hypervisor")


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
