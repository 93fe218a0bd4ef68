"""A host's interrupted transitions come back as soon as its worker is up again.

Redis has no consumer-loss redelivery: a message delivered to a worker that was SIGKILLed
stays in kombu's ``unacked`` hash until ``visibility_timeout`` (an hour by default, and it
must outlast the longest save) has passed. dormant runs exactly one worker per host, so
unacknowledged messages of ``dormant.<host>`` found when that host's worker starts were
delivered to a dead incarnation, and can be restored at once.

Presence: each worker keeps its node name in ``dormant:host:<host>:workers`` (a sorted set
scored by when the entry lapses), renewed every third of ``DORMANT_HOST_CLAIM_TTL``; a killed
worker's entry lapses by itself, a stopped one removes it. At start-up, *before it consumes*,
a worker announces itself, waits (at most one TTL) for other entries to lapse, then:

* alone — it restores every unacked message routed to ``dormant.<host>`` that was delivered
  before it started, with kombu's own ``QoS.restore_by_tag`` (the call its visibility sweep
  makes: one WATCH transaction per message, so two restorers never duplicate one);
* not alone — a second live worker serves the same host: it says so (an error in the log
  naming the other node) and restores nothing, since those messages may be the other
  worker's; they come back through the visibility timeout as before.

The same holds after the worker's broker connection drops and comes back (a Redis restart):
messages the old connection delivered that the worker no longer runs or holds would never be
acknowledged, so the sole worker of a host restores them too (:func:`recover_after_reconnect`).
And as a safety net for every other way a message can be left behind (a task whose result and
acknowledgement both met a broker outage, seen in the fault suite), the sole worker sweeps its
queue's unacked messages every ``DORMANT_ORPHAN_SWEEP_INTERVAL`` seconds and restores those
it does not hold that are older than twice that (:func:`restore_orphans`). A message restored
by mistake would only run as a duplicate: request ids make that a no-op.

Messages of ``dormant.control`` are never touched: they may belong to any live worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, cast

import redis

from worker.core.errors import StateStoreUnavailable
from worker.store import keys

# A plain redis-py client raises RedisError; the state store's boundary client raises
# StateStoreUnavailable (worker/store/connection.py). Presence survives both.
_OUTAGES = (redis.RedisError, StateStoreUnavailable)

log = logging.getLogger("dormant.recovery")


class Presence:
    """This worker's entry among its host's workers, renewed by a daemon thread."""

    def __init__(self, client: redis.Redis, host: str, node: str, ttl: float) -> None:
        self.client, self.host, self.node, self.ttl = client, host, node, ttl
        self.key = keys.host_workers(host)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def announce(self) -> None:
        now = time.time()
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(self.key, "-inf", now)
            pipe.zadd(self.key, {self.node: now + self.ttl})
            pipe.expire(self.key, int(self.ttl) + 1)
            pipe.execute()

    def others(self) -> dict[str, float]:
        """Other live workers of this host: node -> seconds until their entry lapses."""
        now = time.time()
        rows = cast(list[tuple[str, float]],
                    self.client.zrangebyscore(self.key, now, "+inf", withscores=True))
        return {node: score - now for node, score in rows if node != self.node}

    def keep(self) -> None:
        """Renew every ttl/3 until :meth:`leave`; a Redis blip is retried next time."""
        def renew() -> None:
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.announce()
                except _OUTAGES as exc:
                    log.warning("could not renew presence of %s: %s", self.node, exc)

        self._thread = threading.Thread(target=renew, name="dormant-presence", daemon=True)
        self._thread.start()

    def leave(self) -> None:
        self._stop.set()
        try:
            self.client.zrem(self.key, self.node)
        except _OUTAGES as exc:  # it lapses by itself
            log.warning("could not remove presence of %s: %s", self.node, exc)


def wait_alone(presence: Presence, *, poll: float = 0.25) -> dict[str, float]:
    """Announce, then wait until every other entry has lapsed or shown itself alive.

    A dead worker's entry lapses within one TTL; a live one is renewed within a third of
    it. Returns the other workers seen alive (empty: this worker is alone).
    """
    presence.announce()
    deadline = time.monotonic() + presence.ttl + 1
    first = presence.others()
    if first:
        log.info("host %s: waiting up to %.0fs for the entries of %s to lapse (a dead worker's "
                 "does; a live one's is renewed)", presence.host, presence.ttl,
                 ", ".join(sorted(first)))
    alive: dict[str, float] = {}
    pending = dict(first)
    while pending and time.monotonic() < deadline:
        time.sleep(poll)
        presence.announce()
        now = presence.others()
        for node in list(pending):
            if node not in now:
                del pending[node]  # lapsed: that worker is gone
            elif now[node] > pending[node] + poll:
                alive[node] = now[node]  # renewed: that worker lives
                del pending[node]
            else:
                pending[node] = now[node]
    return {**alive, **pending}


UNACKED_BATCH = 100  # deliveries read per HMGET


def restore_unacked(connection: Any, queue: str, *, delivered_before: float,
                    keep: frozenset[str] = frozenset()) -> list[str]:
    """Put back every unacked message routed to ``queue`` delivered before the given time,
    except those of the task ids in ``keep`` (the ones this worker still runs or holds).

    ``connection`` is a kombu Connection to the Redis broker. Returns the restored task ids.
    """
    channel = connection.default_channel
    qos = channel.qos
    client = channel.client
    restored = []
    # The unacked hash holds every host's deliveries: read only those delivered before the
    # time (kombu indexes them by delivery time, in the same transaction), never the whole
    # hash -- a sweep by every worker of everything would grow with the square of the hosts.
    tags = client.zrangebyscore(channel.unacked_index_key, "-inf", f"({delivered_before!r}")
    for start in range(0, len(tags), UNACKED_BATCH):
        batch = tags[start:start + UNACKED_BATCH]
        for tag, raw in zip(batch, client.hmget(channel.unacked_key, batch), strict=True):
            if raw is None or f'"{queue}"]'.encode() not in _bytes(raw):
                continue  # acknowledged meanwhile, or another queue's (decoded only if ours)
            try:
                payload, _exchange, routing_key = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if routing_key != queue or payload.get("headers", {}).get("id") in keep:
                continue
            qos.restore_by_tag(tag, client=client, leftmost=True)
            restored.append(str(payload.get("headers", {}).get("id") or tag))
    return restored


def _bytes(raw: str | bytes) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()


def recover(app: Any, client: redis.Redis, *, host: str, queue: str, node: str,
            ttl: float) -> tuple[Presence, list[str]]:
    """Start-up of a host's worker: presence, then restore the dead incarnation's messages."""
    started = time.time()
    presence = Presence(client, host, node, ttl)
    others = wait_alone(presence)
    presence.keep()
    if others:
        log.error("host %s is also served by live worker(s) %s: run exactly one worker per "
                  "host; interrupted transitions now wait for the visibility timeout",
                  host, ", ".join(sorted(others)))
        return presence, []
    with app.connection_for_write() as connection:
        restored = restore_unacked(connection, queue, delivered_before=started)
    if restored:
        log.warning("host %s: restored %d interrupted transition(s) of a previous worker: %s",
                    host, len(restored), ", ".join(restored))
    return presence, restored


def recover_after_reconnect(app: Any, presence: Presence, *, queue: str,
                            keep: frozenset[str]) -> list[str]:
    """After the broker connection dropped and came back: restore what the old connection had
    delivered and this worker will never acknowledge (a message it held but had not started
    when the connection died, or one whose task ended while the broker was down) — never one
    it still runs or holds (``keep``). Only a host's sole worker may do this.
    """
    return _restore_not_held(app, presence, queue=queue, keep=keep,
                             delivered_before=time.time(),
                             why="the lost broker connection had delivered")


def restore_orphans(app: Any, presence: Presence, *, queue: str, keep: frozenset[str],
                    older_than: float) -> list[str]:
    """Restore this host's unacked messages delivered more than ``older_than`` seconds ago
    that this worker does not run or hold (``keep``): nobody will ever acknowledge them."""
    return _restore_not_held(app, presence, queue=queue, keep=keep,
                             delivered_before=time.time() - older_than,
                             why="nobody held (orphaned)")


def _restore_not_held(app: Any, presence: Presence, *, queue: str, keep: frozenset[str],
                      delivered_before: float, why: str) -> list[str]:
    others = presence.others()
    if others:
        log.error("not restoring messages %s: host %s is also served by %s", why,
                  presence.host, ", ".join(sorted(others)))
        return []
    with app.connection_for_write() as connection:
        restored = restore_unacked(connection, queue, delivered_before=delivered_before,
                                   keep=keep)
    if restored:
        log.warning("host %s: restored %d message(s) %s: %s", presence.host, len(restored),
                    why, ", ".join(restored))
    return restored
