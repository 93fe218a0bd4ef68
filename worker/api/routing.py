"""Where a request goes: the host serving an instance (from the registry workers publish), and
whether a live worker serves a host (its presence in Redis, else one broadcast) -- the part of
:class:`~worker.api.client.Client` that decides before anything is sent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
from celery import Celery

from worker.core import validation
from worker.core.errors import (
    InvalidInput,
    NoWorker,
    UnknownInstance,
)
from worker.core.settings import CONTROL_QUEUE, Settings, queue_for_host
from worker.core.validation import quote
from worker.fleet import registry
from worker.fleet.registry import TTL_INTERVALS
from worker.store import keys

# A worker without a presence entry (worker/fleet/recovery.py; e.g. Redis was down as it started) is
# still found by a broadcast asking which workers consume the queue; replies are awaited this
# long, only when presence finds none.
INSPECT_TIMEOUT = 1.0


class Routing:
    """Registry and liveness look-ups over a Celery app and the state store."""

    app: Celery
    state: redis.Redis
    settings: Settings

    def locate(self, instance: str) -> tuple[str | None, str | None]:
        """(uuid, host) from the registry; Nones when no worker has published the instance."""
        return registry.resolve(self.state, validation.instance(instance))

    def queue_for(self, instance: str) -> str:
        """The host queue serving ``instance``, or the control queue when it is unknown."""
        _uuid, host = self.locate(instance)
        return queue_for_host(host) if host else CONTROL_QUEUE

    def hosts(self) -> list[str]:
        """Hosts whose workers published to the registry within its lifetime."""
        max_age = self.settings.registry_interval * TTL_INTERVALS
        return sorted(registry.hosts(self.state, max_age=max_age))

    def workers_of(self, hosts: Sequence[str]) -> dict[str, list[str]]:
        """The live workers (node names) serving each host: their presence entries in Redis
        (worker/recovery.py), else what one broadcast finds consuming the host's queue."""
        hosts = list(hosts)
        now = time.time()
        with self.state.pipeline(transaction=False) as pipe:
            for host in hosts:
                pipe.zrangebyscore(keys.host_workers(host), now, "+inf")
            found = {h: sorted(nodes) for h, nodes in zip(hosts, pipe.execute(), strict=True)}
        missing = [h for h in hosts if not found[h]]
        if missing:
            consumers = self._consumers()
            for host in missing:
                found[host] = consumers.get(queue_for_host(host), [])
        return found

    def serving(self, host: str | None) -> list[str]:
        """Live workers serving ``host``; for None, those consuming ``dormant.control``."""
        if host is not None:
            return self.workers_of([host])[host]
        nodes = sorted({n for ns in self.workers_of(self.hosts()).values() for n in ns})
        return nodes or self._consumers().get(CONTROL_QUEUE, [])

    def _consumers(self) -> dict[str, list[str]]:
        """queue -> nodes consuming it, from the workers that answer one broadcast."""
        replies = self.app.control.inspect(timeout=INSPECT_TIMEOUT).active_queues() or {}
        queues: dict[str, list[str]] = {}
        for node, consumed in replies.items():
            for queue in consumed or []:
                queues.setdefault(str(queue.get("name")), []).append(node)
        return {q: sorted(nodes) for q, nodes in queues.items()}

    def live_hosts(self) -> list[str]:
        """Hosts in the registry that a live worker serves now."""
        return [h for h, nodes in self.workers_of(self.hosts()).items() if nodes]

    def live_host(self, host: str) -> str:
        """``host`` when a live worker serves it. A host no worker ever published is
        InvalidInput (a typo: nothing is queued); a known host whose worker is gone is
        NoWorker; both name the live hosts."""
        if host in registry.hosts(self.state) and self.serving(host):
            return host
        live = self.live_hosts()
        names = ", ".join(live) if live else "none (is any worker running?)"
        if host in registry.hosts(self.state):
            raise NoWorker(f"no live worker serves host {quote(host)}; live hosts: {names}")
        raise InvalidInput(f"unknown host {quote(host)}: no live worker serves it; "
                           f"live hosts: {names}")

    def require_worker(self, instance: str) -> str | None:
        """The host whose worker will answer for ``instance`` (None: the control queue's);
        NoWorker at once when no live worker would take the task."""
        _uuid, host = self.locate(instance)
        if self.serving(host):
            return host
        live = self.live_hosts()
        names = ", ".join(live) if live else "none (is any worker running?)"
        where = f"host {quote(host)} (which serves {quote(instance)})" if host else \
            f"{CONTROL_QUEUE} (no worker has published {quote(instance)})"
        raise NoWorker(f"no live worker serves {where}; live hosts: {names}")

    def published(self, instance: str, *, host: str | None = None) -> str:
        """The UUID of an instance some worker (of ``host``) has published, or
        UnknownInstance."""
        uuid, where = self.locate(instance)
        if uuid is None or where is None:
            raise UnknownInstance(f"unknown instance {quote(instance)}: no worker has "
                                  "published it")
        if host is not None and where != host:
            raise UnknownInstance(f"instance {quote(instance)} is on host {where}, "
                                  f"not {host}")
        return uuid
