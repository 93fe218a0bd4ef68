"""Which host serves which instance: published by workers, read by clients.

Each worker writes, for every domain it sees, ``where:<uuid> = host`` and
``name:<name> = uuid`` with a TTL of three refresh intervals, so a host that disappears drops
out of the registry by itself. A recorded transition refreshes its instance's entry too.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, cast

import redis

from worker.core import validation
from worker.hypervisor import Hypervisor
from worker.store import keys

TTL_INTERVALS = 3
FORGET_HOST = 7 * 86400  # seconds after its last refresh a host leaves the list of hosts


def publish(client: redis.Redis, hv: Hypervisor, host: str, *, interval: int) -> dict[str, int]:
    """Publish every domain of this host; return how many are in each state."""
    ttl = interval * TTL_INTERVALS
    counts: Counter[str] = Counter()
    members: dict[str, str] = {}
    with client.pipeline(transaction=False) as pipe:
        for stat in hv.stats(activity=False):  # states only: never holds up a sample
            counts[str(stat.state)] += 1
            members[stat.uuid] = stat.name
            pipe.set(keys.where(stat.uuid), host, ex=ttl)
            pipe.set(keys.name(stat.name), stat.uuid, ex=ttl)
        pipe.delete(keys.host_instances(host))
        if members:
            pipe.hset(keys.host_instances(host), mapping=dict[Any, Any](members))
        pipe.expire(keys.host_instances(host), ttl)
        now = time.time()
        pipe.zadd(keys.HOSTS, {host: now})
        pipe.zremrangebyscore(keys.HOSTS, "-inf", now - FORGET_HOST)
        pipe.execute()
    return dict(counts)


def resolve(client: redis.Redis, instance: str) -> tuple[str | None, str | None]:
    """(uuid, host) for a UUID or name, or Nones when no worker has published it."""
    uuid = (instance.lower() if validation.is_uuid(instance)
            else cast(str | None, client.get(keys.name(instance))))
    if uuid is None:
        return None, None
    return uuid, cast(str | None, client.get(keys.where(uuid)))


def hosts(client: redis.Redis, *, max_age: float | None = None) -> list[str]:
    """Hosts that published recently (all known hosts when ``max_age`` is None)."""
    low: Any = "-inf" if max_age is None else time.time() - max_age
    return cast(list[str], client.zrangebyscore(keys.HOSTS, low, "+inf"))


def instances_of(client: redis.Redis, host: str) -> dict[str, str]:
    """uuid -> name of the instances a host last published."""
    return cast(dict[str, str], client.hgetall(keys.host_instances(host)))


def remember(client: redis.Redis, host: str, uuid: str, name: str, *, interval: int) -> None:
    """A domain defined (or renamed) on this host: publish it now, not at the next refresh."""
    ttl = interval * TTL_INTERVALS
    with client.pipeline(transaction=False) as pipe:
        pipe.set(keys.where(uuid), host, ex=ttl)
        pipe.set(keys.name(name), uuid, ex=ttl)
        pipe.hset(keys.host_instances(host), uuid, name)
        pipe.hset(keys.watched(host), uuid, name)
        pipe.execute()


def forget_name(client: redis.Redis, name: str, uuid: str) -> None:
    """Drop ``name -> uuid`` (the old name of a renamed domain), unless it names another."""
    if client.get(keys.name(name)) == uuid:
        client.delete(keys.name(name))


def forget(client: redis.Redis, host: str, uuid: str, name: str) -> None:
    """A domain undefined on this host: drop it from the registry now."""
    forget_name(client, name, uuid)
    if client.get(keys.where(uuid)) == host:  # not if another host serves it by now
        client.delete(keys.where(uuid))
    with client.pipeline(transaction=False) as pipe:
        pipe.hdel(keys.host_instances(host), uuid)
        pipe.hdel(keys.watched(host), uuid)
        pipe.execute()


def watched(client: redis.Redis, host: str) -> dict[str, str]:
    """uuid -> name of the guests this host's event watcher last saw."""
    return cast(dict[str, str], client.hgetall(keys.watched(host)))


def set_watched(client: redis.Redis, host: str, members: dict[str, str]) -> None:
    """Replace what this host's watcher saw (kept as long as a forgotten host's name)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(keys.watched(host))
        if members:
            pipe.hset(keys.watched(host), mapping=dict[Any, Any](members))
            pipe.expire(keys.watched(host), FORGET_HOST)
        pipe.execute()
