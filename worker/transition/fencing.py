"""The guest is the last judge of fences: a transition records its fence in the guest's own
libvirt metadata before it acts, and refuses to act when the guest carries one as new.

Why: the fencing number comes from Redis, and Redis replication is asynchronous. A fence
``INCR``ed on a master that dies before its replica saw it is handed out again by the promoted
replica, so two holders can carry the same number (the critique of Redlock: the resource
itself must reject a token that went backwards). ``DORMANT_STATE_WAIT_REPLICAS`` makes that
rare; this makes it harmless. The fence lives beside the guest, survives any Redis failover,
and every transition of the guest passes here: a holder whose fence is not greater than the
guest's is stale (``StaleLock``, journaled) and takes a fresh fence above the guest's instead
(runner.py). Cost of the extra libvirt calls: bench/RESULTS.md, "Fences at the guest".

Where the fence is kept: written where it counts now, the running domain while active (a
managed save carries it into its image) and the definition while shut off; read from every
copy a later start could bring back (running domain and definition; definition and save image)
and the newest taken. Writing the definition of a running guest as well would cost libvirt a
rewrite of its XML file on every pause (~10 ms here instead of ~3).

Read-compare-write is atomic per guest because one worker runs per host and
:func:`exclusive` holds a process lock per guest from the state read to the end of the libvirt
call (a prefork pool's children are separate processes: the threads pool is the deployment).

The element, in a namespace of its own so that an operator's ``virsh metadata --set`` of the
policy element (``worker/reclaim/selection.py``, replaced whole by libvirt) never erases it::

    <fence value="12">
      <claim value="12" request="nightly-7-web-1" host="kvm1" at="1796563745.024"/>
      ... the last HISTORY claims, newest first (what the fault suite checks)
    </fence>
"""

from __future__ import annotations

import logging
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.core.errors import InstanceBusy, StaleLock

if TYPE_CHECKING:
    from worker.hypervisor import Guest

log = logging.getLogger("dormant.transition")

NAMESPACE = "https://dormant.dev/xmlns/1/fence"
KEY = "dormant-fence"  # the XML prefix libvirt stores the element under
HISTORY = 8  # claims kept per guest: ~0.6 KB of domain XML


@dataclass(frozen=True)
class Claim:
    """One transition's fence as the guest recorded it."""

    value: int
    request: str = ""
    host: str = ""
    at: float = 0.0


@dataclass(frozen=True)
class Mark:
    """The fence a guest carries and the claims that led to it, newest first."""

    value: int = 0
    claims: tuple[Claim, ...] = ()


def parse(xml: str | None) -> Mark:
    """The mark in one copy of the element; an absent or unreadable one counts as no fence
    (the next claim writes a good one), with a warning for the unreadable."""
    if not xml:
        return Mark()
    try:
        root = ET.fromstring(xml)
        claims = tuple(Claim(int(c.get("value", "0")), c.get("request", ""), c.get("host", ""),
                             float(c.get("at", "0"))) for c in root if c.tag.endswith("claim"))
        return Mark(int(root.get("value", "0")), claims)
    except (ET.ParseError, ValueError) as exc:
        log.warning("unreadable fence in guest metadata (%s): %s", exc, xml[:200])
        return Mark()


def newest(marks: Iterable[Mark]) -> Mark:
    """The highest fence among the copies (running domain, stored definition)."""
    return max(marks, key=lambda m: m.value, default=Mark())


def claimed(mark: Mark, claim: Claim) -> Mark:
    """``mark`` with ``claim`` on top (kept to HISTORY claims)."""
    return Mark(claim.value, (claim, *mark.claims)[:HISTORY])


def render(mark: Mark) -> str:
    root = ET.Element("fence", value=str(mark.value))
    for c in mark.claims:
        ET.SubElement(root, "claim", value=str(c.value), request=c.request, host=c.host,
                      at=f"{c.at:.3f}")
    return ET.tostring(root, encoding="unicode")


def read(guest: Guest) -> Mark:
    """The fence the guest carries: the newest of its copies (a restore brings back the live
    XML of the save image, older than the definition the resume wrote while it was shut off)."""
    return newest(parse(xml) for xml in guest.metadata_copies(NAMESPACE))


def claim(guest: Guest, *, fence: int, request_id: str, host: str, now: float) -> Mark:
    """Record ``fence`` at the guest before acting, or StaleLock (``guest_fence`` in its
    details) when the guest already carries a fence at least as new."""
    current = read(guest)
    if current.value >= fence:
        last = current.claims[0] if current.claims else None
        by = f" (request {last.request} on {last.host})" if last and last.request else ""
        raise StaleLock(
            f"fence {fence} is not newer than fence {current.value} that {guest.name} "
            f"carries{by}: a newer holder acted on it; this one does not act",
            guest_fence=current.value)
    mark = claimed(current, Claim(fence, request_id, host, now))
    guest.set_metadata(NAMESPACE, KEY, render(mark))
    return mark


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _forget_locks_after_fork() -> None:
    """A forked child holds none of its parent's guests."""
    global _locks_guard
    _locks.clear()
    _locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


@contextmanager
def exclusive(instance: str, timeout: float) -> Iterator[None]:
    """One transition at a time per guest in this process, from reading its state to the end
    of its libvirt call: normally the Redis lock already ensures it; after a failover that
    lost a lock it is what keeps two holders from acting at once."""
    with _locks_guard:
        lock = _locks.setdefault(instance.lower(), threading.Lock())
    if not lock.acquire(timeout=timeout):
        raise InstanceBusy(f"instance {instance} is being changed by another transition of "
                           f"this worker (waited {timeout:g}s)")
    try:
        yield
    finally:
        lock.release()
