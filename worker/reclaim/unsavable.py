"""Guests libvirt refuses to save, remembered by their definition (the ``cannot_save`` verdict).

libvirt refuses at once to save a guest with a device that cannot migrate (an ivshmem
``<shmem>``, PCI passthrough, a vGPU, a mounted virtiofs share), and will again every night:
so the first refusal is remembered, with libvirt's reason and a digest of the guest's
persistent definition (``Guest.definition_digest``: ``<metadata>`` left out, where dormant
writes its own). Later runs give the guest the ``cannot_save`` verdict with that reason and
try nothing; once the definition changes (the device removed), the memory is dropped and the
guest is judged as any other.

One small JSON string per such guest (``keys.unsavable``), kept as long as reports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from worker.core.errors import UnknownInstance
from worker.store import keys

if TYPE_CHECKING:
    import redis

    from worker.hypervisor import Hypervisor

log = logging.getLogger("dormant.reclaim")


def remember(client: redis.Redis, hv: Hypervisor, uuid: str, *, reason: str, run_id: str,
             now: float, ttl: int) -> None:
    """Remember that libvirt refused to save ``uuid`` with its definition as it is now."""
    try:
        digest = hv.guest(uuid).definition_digest()
    except UnknownInstance:
        return
    client.set(keys.unsavable(uuid), json.dumps(
        {"digest": digest, "reason": reason, "run_id": run_id, "at": now}), ex=ttl)


def reasons(client: redis.Redis, hv: Hypervisor, uuids: Iterable[str]) -> dict[str, str]:
    """libvirt's reason for each of ``uuids`` it refused to save with the definition it has
    now; a remembered refusal of an older definition is forgotten."""
    wanted = list(uuids)
    if not wanted:
        return {}
    found: dict[str, str] = {}
    raw: list[Any] = client.mget([keys.unsavable(u) for u in wanted])
    for uuid, value in zip(wanted, raw, strict=True):
        if value is None:
            continue
        memory = json.loads(value)
        try:
            digest = hv.guest(uuid).definition_digest()
        except UnknownInstance:
            continue
        if digest == memory["digest"]:
            found[uuid] = str(memory["reason"])
        else:
            log.info("instance %s: its definition changed since libvirt refused to save it; "
                     "it is judged again", uuid)
            client.delete(keys.unsavable(uuid))
    return found
