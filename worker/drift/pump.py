"""The event pump: a process of its own that prints libvirt's lifecycle events as JSON lines.

``python -m worker.drift.pump`` runs libvirt's event loop and
:class:`worker.hypervisor.events.EventStream`. It is a process of its own because registering
libvirt's event loop is for good and inherited by a forked Celery pool child, whose idle
connections libvirtd would then drop (see ``worker.hypervisor.events._ensure_event_loop``).
The worker's :class:`~worker.drift.watcher.Watcher` reads its stdout and closes its stdin to
stop it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import IO, Any

log = logging.getLogger("dormant.events")


def pump(uri: str, out: IO[str], stdin: IO[str]) -> None:
    """Print libvirt's lifecycle events of ``uri`` as JSON lines until stdin closes."""
    from worker.hypervisor.events import DomainEvent, EventStream

    stop = threading.Event()
    write_lock = threading.Lock()
    parent = os.getppid()

    def emit(message: dict[str, Any]) -> None:
        with write_lock:
            try:
                out.write(json.dumps(message) + "\n")
                out.flush()
            except (BrokenPipeError, ValueError):  # the worker is gone
                stop.set()

    def on_event(event: DomainEvent) -> None:
        emit({"type": "lifecycle", "uuid": event.uuid, "name": event.name,
              "event": event.event, "detail": event.detail, "at": event.at})

    def watch_stdin() -> None:
        stdin.read()  # returns at EOF: the worker closed our stdin or died
        stop.set()

    threading.Thread(target=watch_stdin, name="pump-stdin", daemon=True).start()
    stream = threading.Thread(
        target=EventStream(uri).run, name="pump-stream", daemon=True,
        args=(on_event, lambda status: emit({"type": "status", "status": status}), stop))
    stream.start()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # orphaned (the worker was SIGKILLed)
            stop.set()
    stream.join(5)


def main() -> None:
    from worker.core import logs
    from worker.core import settings as settings_mod

    # The worker ends the pump (closes its stdin). A Ctrl-C in make run's terminal reaches the
    # whole process group: the pump would die with a traceback and be restarted mid-shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = settings_mod.get()
    logging.basicConfig(stream=sys.stderr, level=s.log_level.upper())  # into the worker's log
    logs.configure(logging.getLogger(), json_lines=s.log_json, level=s.log_level)
    pump(s.libvirt_uri, sys.stdout, sys.stdin)


if __name__ == "__main__":
    main()
