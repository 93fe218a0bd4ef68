"""The Redis side of one transition: idempotency, the per-instance lock, the journal.

Three Lua scripts (``worker/transition/lua/*.lua``, each with a signature header naming its keys and
arguments) keep a transition to two or three round trips:

* ``begin``  — refuse a request id reused for something else (its fingerprint differs), return
  the recorded result if the request already finished, otherwise take the instance lock
  (bumping its fencing counter, binding a new id to its fingerprint) or report it busy;
* ``intent`` — remember the state before a libvirt call, so a redelivered message knows the
  call was its own;
* ``finish`` — if (and only if) the lock still carries our fence, store the result, append the
  journal entry, update the auto-unpause deadline and release the lock.

A lock's value is ``<fence>:<token>``; a process-wide keeper thread (:mod:`.keeper`) renews
every lock this process holds, so a long managedSave keeps it while a dead worker's lock
lapses by its TTL.

With ``wait_replicas`` (``DORMANT_STATE_WAIT_REPLICAS``) the two writes a failover must not
lose, the lock and fence that ``begin`` takes and the result that ``finish`` records, are
followed by ``WAIT`` on the same connection (a pipeline: WAIT counts the writes of its own
connection). Replication is asynchronous; without it a promoted replica may hand out a fence
number that already reached a guest, or forget a finished request. Fewer replicas than asked
(or than are connected, when fewer are) acknowledging in time is ``StateStoreUnavailable``:
retried like any outage. A master with no replica left (the other died and was replaced)
goes on alone: nothing could be promoted without its writes, and the replica that returns
synchronises from it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from worker.core.errors import InstanceBusy, StaleLock, StateStoreUnavailable
from worker.store import keys
from worker.store.connection import translated
from worker.transition.keeper import keeper

log = logging.getLogger("dormant.store")

# Journals are bounded (docs/operations.md "Sizing Redis"). An instance's stream costs ~4.7 KB
# for its first entries (Redis preallocates a 4 KB stream node) and ~0.75 KB per entry after:
# it keeps about the newest 100 (seven weeks of a nightly suspend and a morning resume; ~80 KB)
# and goes 90 days after its last entry (a deleted guest's). The fleet stream keeps the newest
# 100,000 (~75 MB).
JOURNAL_MAXLEN = 100  # entries kept per instance stream (approximate trim)
JOURNAL_ALL_MAXLEN = 100_000
JOURNAL_TTL = 90 * 86400  # seconds an instance's journal outlives its last entry

_LUA = Path(__file__).with_name("lua")


def _script(name: str) -> str:
    """A Lua script of lua/ beside this module, read once at import (each opens with its
    signature)."""
    return (_LUA / f"{name}.lua").read_text()


_BEGIN, _INTENT, _FINISH, _RENEW, _EXTERNAL = (
    _script(n) for n in ("begin", "intent", "finish", "renew", "external"))


@dataclass
class Held:
    """A lock this process holds."""

    instance: str
    value: str  # "<fence>:<token>"
    previous: dict[str, Any] | None  # a pending record left by an earlier, interrupted attempt

    @property
    def fence(self) -> int:
        return int(self.value.split(":", 1)[0])


@dataclass(frozen=True)
class WatchPoint:
    """What the journal said about an instance before its real state was read."""

    fence: str  # '' when no transition ever locked it
    entries: list[tuple[str, dict[str, Any]]]  # (stream id, entry), newest first


@dataclass
class Done:
    """The request already finished: its recorded result."""

    result: dict[str, Any]


@dataclass
class Reused:
    """The request id was first used for something else: that request's record."""

    record: dict[str, Any]


class Store:
    """Idempotency records, per-instance locks and the journal, in the state Redis."""

    def __init__(self, client: redis.Redis, *, lock_ttl: float, result_ttl: int,
                 registry_ttl: int = 0, wait_replicas: int = 0,
                 wait_timeout: float = 1.0) -> None:
        self.redis = client
        self.registry_ttl = registry_ttl  # >0: a recorded transition also refreshes `where`
        self.lock_ttl_ms = int(lock_ttl * 1000)
        self.result_ttl = result_ttl
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = max(1, int(wait_timeout * 1000))  # WAIT 0 would block for ever
        self._connected = wait_replicas  # replicas the master had at the last write (ROLE)
        self._begin = client.register_script(_BEGIN)
        self._intent = client.register_script(_INTENT)
        self._finish = client.register_script(_FINISH)
        self._renew = client.register_script(_RENEW)
        self._external = client.register_script(_EXTERNAL)

    # -- the three steps of a transition ---------------------------------------------------
    def begin(self, request_id: str, instance: str, token: str, *, fingerprint: str = "",
              pending: dict[str, Any] | None = None,
              fence_floor: int = 0) -> Held | Done | Reused | tuple[str, int]:
        """Reused (the id was first used for another fingerprint), Done (already finished),
        Held (lock taken; a new id is bound to ``fingerprint``) or ("busy", ms left).
        ``fence_floor``: the guest carries this fence; hand out a greater one."""
        record = "" if not fingerprint else json.dumps(
            {"status": "pending", **(pending or {}), "fingerprint": fingerprint}, sort_keys=True)
        reply, short = self._replicated(lambda client: self._begin(
            keys=[keys.request(request_id), keys.lock(instance), keys.fence(instance)],
            args=[token, self.lock_ttl_ms, fingerprint, record, self.result_ttl, fence_floor],
            client=client))
        status = reply[0]
        if status == "mismatch":
            return Reused(json.loads(reply[1]))
        if status == "done":
            return Done(json.loads(reply[1]))
        if status == "busy":
            return ("busy", int(reply[2]))
        previous = json.loads(reply[2]) if reply[2] else None
        if short:
            with suppress(StateStoreUnavailable):  # let it lapse now: the retry takes another
                self.renew(keys.lock(instance), reply[1], ttl_ms=1)
            raise self._unreplicated(f"the lock and fence on {instance}", short)
        keeper.add(self, keys.lock(instance), reply[1])
        return Held(instance=instance, value=reply[1], previous=previous)

    def _replicated(self, script: Callable[[Any], Any]) -> tuple[Any, str]:
        """Run one script and, with ``wait_replicas``, WAIT on the same connection for as
        many replicas as asked, or as are connected if fewer (ROLE says: a master left alone
        by a failover goes on, it has no replica that could be promoted without the write).
        Returns the script's reply and "" or what fell short."""
        if not self.wait_replicas:
            with translated():
                return script(self.redis), ""
        wanted = min(self.wait_replicas, self._connected)
        with translated(), self.redis.pipeline(transaction=False) as pipe:
            script(pipe)
            if wanted:
                pipe.execute_command("WAIT", wanted, self.wait_timeout_ms)
            pipe.execute_command("ROLE")
            replies = pipe.execute()
        acked = int(replies[1]) if wanted else 0
        role = replies[-1]
        self._replicas(len(role[2]) if role and role[0] == "master" else 0)
        needed = min(wanted, self._connected)  # one that just (dis)appeared is not waited for
        if acked >= needed:
            return replies[0], ""
        return replies[0], f"acknowledged by {acked} of {needed} replica(s)"

    def _replicas(self, connected: int) -> None:
        """Note how many replicas the master has; say so when it falls below the setting."""
        before, self._connected = self._connected, connected
        if connected < self.wait_replicas <= before:
            log.warning("the state store's master has %d replica(s), fewer than the %d "
                        "DORMANT_STATE_WAIT_REPLICAS asks for: writes are acknowledged by those "
                        "there are until they return", connected, self.wait_replicas)
        elif before < self.wait_replicas <= connected:
            log.warning("the state store's master has %d replica(s) again", connected)

    def _unreplicated(self, what: str, short: str) -> StateStoreUnavailable:
        return StateStoreUnavailable(
            f"state store: {what} {short} within {self.wait_timeout_ms} ms; a failover could "
            "lose it", replicated=short)

    def acquire(self, request_id: str, instance: str, *, wait: float, fingerprint: str = "",
                pending: dict[str, Any] | None = None,
                fence_floor: int = 0) -> Held | Done | Reused:
        """Like :meth:`begin`, polling a busy lock for up to ``wait`` seconds."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait
        pause = 0.005
        while True:
            outcome = self.begin(request_id, instance, token, fingerprint=fingerprint,
                                 pending=pending, fence_floor=fence_floor)
            if not isinstance(outcome, tuple):
                return outcome
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InstanceBusy(
                    f"instance {instance} is locked by another transition "
                    f"(lock expires in {outcome[1] / 1000:.1f}s)"
                )
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.25)

    def record_intent(self, held: Held, request_id: str, pending: dict[str, Any]) -> None:
        """Remember what this request is about to do (for a redelivered retry of it)."""
        with translated():
            ok = self._intent(
                keys=[keys.lock(held.instance), keys.request(request_id)],
                args=[held.value, json.dumps({"status": "pending", **pending}), self.result_ttl],
            )
        if not ok:
            raise StaleLock(f"lost the lock on {held.instance} before calling libvirt; "
                            "nothing was done", before_acting=True)

    def finish(
        self,
        held: Held | None,
        *,
        instance: str,
        request_id: str,
        entry: dict[str, Any],
        record: dict[str, Any] | None,
        deadline: float | str | None = None,
        host: str = "",
        journal_instance: bool = True,
    ) -> None:
        """Store the result (``record``), journal ``entry``, set/clear the deadline, unlock.

        A recorded result also refreshes the registry entry saying which host serves it.
        ``journal_instance=False`` journals in the fleet journal only and leaves the registry
        alone (an unknown instance gets no journal and no registry entry of its own).

        With a held lock and a record to store, refuse (StaleLock) when the lock was lost:
        a newer holder may already have changed the instance.
        """
        deadline_arg = "" if deadline is None else str(deadline)
        must_own = held is not None and record is not None
        if held is not None:  # whatever happens next, this process stops renewing the lock
            keeper.remove(self, keys.lock(instance))
        run = self._replicated if must_own else self._alone  # a result must be replicated
        ok, short = run(lambda client: self._finish(
            client=client,
            keys=[
                keys.lock(instance),
                keys.request(request_id),
                keys.journal(instance),
                keys.JOURNAL_ALL,
                keys.DEADLINES,
                keys.deadline(instance),
                keys.where(instance),
            ],
            args=[
                held.value if held else "",
                json.dumps(record, sort_keys=True) if record is not None else "",
                self.result_ttl,
                json.dumps(entry, sort_keys=True),
                deadline_arg,
                "1" if must_own else "0",
                JOURNAL_MAXLEN,
                JOURNAL_ALL_MAXLEN,
                instance,
                request_id,
                host,
                self.registry_ttl if journal_instance else 0,  # never for an unknown one
                "1" if journal_instance else "0",
                JOURNAL_TTL,
            ],
        ))
        if not ok:
            raise StaleLock(
                f"the lock on {instance} expired while held (fence {held.fence if held else '?'}); "
                "a newer transition owns the instance, so this result was not recorded"
            )
        if short:  # recorded, but only on the master
            raise self._unreplicated(f"the result of {request_id}", short)

    def _alone(self, script: Callable[[Any], Any]) -> tuple[Any, str]:
        """Run one script with no WAIT (a failure or a release: a redelivery redoes it)."""
        with translated():
            return script(self.redis), ""

    def holds(self, held: Held) -> bool:
        """Whether the lock still carries this holder's fence (checked on slow paths only)."""
        with translated():
            return self.redis.get(keys.lock(held.instance)) == held.value

    def renew(self, key: str, value: str, *, ttl_ms: int = 0) -> bool:
        return bool(self._renew(keys=[key], args=[value, ttl_ms or self.lock_ttl_ms]))

    # -- reading -----------------------------------------------------------------------------
    def journal(self, instance: str | None = None, *, count: int = 50) -> list[dict[str, Any]]:
        """Newest-last journal entries of one instance, or of the whole fleet."""
        key = keys.journal(instance) if instance else keys.JOURNAL_ALL
        with translated():
            rows = cast(list[tuple[str, dict[str, str]]], self.redis.xrevrange(key, count=count))
        return [json.loads(fields["entry"]) for _id, fields in reversed(rows)]

    def request(self, request_id: str) -> dict[str, Any] | None:
        with translated():
            raw = self.redis.get(keys.request(request_id))
        return json.loads(raw) if raw else None

    def started(self, request_id: str) -> bool:
        """Whether a request got as far as a libvirt call or a result. The pending record
        that binds a new id to its fingerprint (written with the lock) does not count."""
        record = self.request(request_id)
        return record is not None and (record.get("status") != "pending"
                                       or "state_before" in record)

    def journal_only(self, entry: dict[str, Any], instance: str | None = None) -> None:
        """Journal an entry that has no lock or record (bad input, unknown instance)."""
        body = json.dumps(entry, sort_keys=True)
        with translated(), self.redis.pipeline(transaction=False) as pipe:
            if instance:
                pipe.xadd(keys.journal(instance), {"entry": body}, maxlen=JOURNAL_MAXLEN,
                          approximate=True)
                pipe.expire(keys.journal(instance), JOURNAL_TTL)
            pipe.xadd(keys.JOURNAL_ALL, {"entry": body}, maxlen=JOURNAL_ALL_MAXLEN,
                      approximate=True)
            pipe.execute()

    def claim_due_deadlines(self, now: float, *, limit: int = 100) -> list[dict[str, str]]:
        """Take the auto-unpause deadlines that have passed: each is returned to one caller only.

        A claimed deadline leaves the schedule; the unpause it leads to is a durable broker
        message, so a crash after claiming loses nothing.
        """
        with translated():
            due = cast(list[str], self.redis.zrangebyscore(keys.DEADLINES, "-inf", now,
                                                            start=0, num=limit))
            claimed: list[dict[str, str]] = []
            for instance in due:
                details = cast(dict[str, str], self.redis.hgetall(keys.deadline(instance)))
                if self.redis.zrem(keys.DEADLINES, instance):
                    self.redis.delete(keys.deadline(instance))
                    claimed.append({"instance": instance, **details})
        return claimed

    # -- changes made outside dormant (worker/drift/watcher.py) -----------------------------------
    def watch_point(self, instance: str, *, count: int = 20) -> WatchPoint:
        """The fence and newest journal entries, read *before* the real state is.

        :meth:`record_external` journals only if neither changed since, so a transition that
        ran in between is never mistaken for an outside change.
        """
        with translated(), self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.fence(instance))
            pipe.xrevrange(keys.journal(instance), count=count)
            fence, rows = pipe.execute()
        return WatchPoint(fence=fence or "",
                          entries=[(rid, json.loads(f["entry"])) for rid, f in rows])

    def record_external(self, instance: str, entry: dict[str, Any], seen: WatchPoint, *,
                        clear_deadline: bool) -> str:
        """Journal ``entry``: ``journaled``, or ``locked`` / ``moved`` (a transition's doing)."""
        with translated():
            return str(self._external(
                keys=[keys.lock(instance), keys.fence(instance), keys.journal(instance),
                      keys.JOURNAL_ALL, keys.DEADLINES, keys.deadline(instance)],
                args=[seen.fence, seen.entries[0][0] if seen.entries else "",
                      json.dumps(entry, sort_keys=True), "1" if clear_deadline else "0",
                      instance, JOURNAL_MAXLEN, JOURNAL_ALL_MAXLEN, JOURNAL_TTL],
            ))
