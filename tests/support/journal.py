"""Read what dormant recorded, and what libvirt really says, straight from the source.

Integration tests check a transition twice: in the guest's real libvirt state (never through
dormant) and in the journal/idempotency records dormant wrote to the state Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import libvirt

from tests.support.services import RedisServer, wait_until
from worker.store import keys

STATE_DB = 2  # test_env puts DORMANT_STATE_URL on db 2 of the private redis-server
URI = "qemu:///system"
PID_FILE = "/run/libvirtd.pid"


def journal(redis_server: RedisServer, instance: str | None = None, *,
            external: bool = False) -> list[dict[str, Any]]:
    """Every journal entry of ``instance`` (or the fleet-wide stream), oldest first.

    Entries of changes made outside dormant (``outcome: external``: a test defining and
    starting its guests, for one) are left out unless ``external`` is true, so a test of
    dormant's own transitions sees only those.
    """
    key = keys.journal(instance) if instance else keys.JOURNAL_ALL
    rows = redis_server.client(STATE_DB).xrange(key)
    entries = [json.loads(fields["entry"]) for _id, fields in rows]
    return [e for e in entries if external or e.get("outcome") != "external"]


def record(redis_server: RedisServer, request_id: str) -> dict[str, Any] | None:
    raw = redis_server.client(STATE_DB).get(keys.request(request_id))
    return json.loads(raw) if raw else None


def real_state(domain: libvirt.virDomain) -> str:
    """The guest's state in dormant's words, read with libvirt by the test itself."""
    state, reason = domain.state()
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return "running"
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return "paused(user)" if reason == libvirt.VIR_DOMAIN_PAUSED_USER else f"paused({reason})"
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return "suspended" if domain.hasManagedSaveImage() else "shutoff"
    return f"libvirt-state-{state}/{reason}"


def base_state(state: str) -> str:
    """``paused(user)`` -> ``paused``."""
    return state.split("(", 1)[0]


def saving(domain: libvirt.virDomain) -> bool:
    """True while a managedSave job runs on the domain (paused with reason SAVE)."""
    state, reason = domain.state()
    return state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_SAVE


# -- stopping libvirtd on purpose -------------------------------------------------------------
def libvirtd_answers() -> bool:
    done = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, check=False,
                          timeout=20)
    return done.returncode == 0


def libvirtd_pid() -> int:
    """The running libvirtd's pid, from its pid file (checked against /proc)."""
    pid = int(Path(PID_FILE).read_text().strip())
    if Path(f"/proc/{pid}/comm").read_text().strip() != "libvirtd":
        raise RuntimeError(f"{PID_FILE} names pid {pid}, which is not libvirtd")
    return pid


def libvirtd_running() -> bool:
    """This machine's libvirtd, by its pid file (pgrep would also see one in a container)."""
    try:
        libvirtd_pid()
    except (OSError, ValueError, RuntimeError):
        return False
    return True


def start_libvirtd() -> None:
    """Start libvirtd unless it answers; a previous one still exiting holds its pid file."""

    def up() -> bool:
        if libvirtd_answers():
            return True
        if not libvirtd_running():
            subprocess.run(["libvirtd", "-d"], check=False)
        return False

    wait_until(up, timeout=60, interval=0.3, message="libvirtd answers again")


@contextmanager
def libvirtd_stopped() -> Iterator[None]:
    """Stop libvirtd (running QEMU guests keep running) and always start it again."""
    try:
        pid = libvirtd_pid()
        os.kill(pid, signal.SIGTERM)  # that one daemon, by its pid file, nothing else
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30, interval=0.1,
                   message="libvirtd exits")
        yield
    finally:
        start_libvirtd()


def revive(conn: libvirt.virConnect) -> None:
    """Point a connection object broken by a libvirtd restart at a fresh connection.

    The session-wide ``libvirt_conn`` fixture (and the GuestFactory holding it) outlives a
    test that restarts libvirtd; swapping the handle keeps every later test working.
    """
    try:
        conn.getLibVersion()  # a real round trip: isAlive() misses a peer that went away
        return
    except libvirt.libvirtError:
        pass
    deadline = time.monotonic() + 30
    while True:
        try:
            fresh = libvirt.open(URI)
            break
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    old, conn._o = conn._o, fresh._o  # type: ignore[attr-defined]
    fresh._o = None  # type: ignore[attr-defined]
    with suppress(Exception):
        libvirt.libvirtmod.virConnectClose(old)  # type: ignore[attr-defined]
