"""The state store's Redis client: dormant's one Redis error boundary.

Every module that talks to the state store (the transition store, runs, samples, the registry,
the kill switch...) gets its client from :func:`connect`, so every command, pipeline and Lua
script call passes through the same translation: once redis-py's own retries of a brief blip
are used up, a connection error or a timeout becomes :class:`StateStoreUnavailable`, the
transient (retried) branch of dormant's error tree, exactly as libvirt's errors are translated
once in ``worker/hypervisor/errors.py``. A Redis at ``maxmemory`` (``noeviction``, the
policy production uses) refuses writes with an OOM error: that becomes
:class:`StateStoreFull`, transient as well, counted in ``dormant_state_store_full_total`` and
logged at error level (at most every few seconds per process) for an alert to fire on. What
it refused was not done: a Lua script or a transaction is refused whole (Redis stops a script
only at its first write), so a transition retried later finds nothing half-written. So is
READONLY: a master demoted to a replica by a failover, still answering a client that knew its
old address, is an outage of that client until it asks again (``sentinel://`` URLs ask the
sentinels: :mod:`worker.store.sentinel`). Other Redis errors (a wrong type, a script error)
are bugs and stay what they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from worker.core import metrics
from worker.core.errors import StateStoreFull, StateStoreUnavailable
from worker.core.settings import Settings, redis_tls
from worker.store.sentinel import SentinelOptions, is_sentinel, master_client

log = logging.getLogger("dormant.store")

OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)
FULL_LOG_EVERY = 10.0  # seconds between two "state store full" log lines of one process
_last_full_log = [0.0]


@contextmanager
def translated() -> Iterator[None]:
    """Redis outages become StateStoreUnavailable, a full Redis StateStoreFull: both transient
    (retried)."""
    try:
        yield
    except OUTAGES as exc:
        raise StateStoreUnavailable(f"state store unavailable: {exc}") from None
    except redis.exceptions.OutOfMemoryError as exc:
        raise full(exc) from None


def full(exc: Exception) -> StateStoreFull:
    """Count and log a write refused by a Redis at maxmemory; the error to raise for it."""
    metrics.state_store_full()
    now = time.monotonic()
    if now - _last_full_log[0] >= FULL_LOG_EVERY:
        _last_full_log[0] = now
        log.error("state store full: Redis refuses writes at maxmemory (%s); transitions are "
                  "retried, nothing is half-written; raise maxmemory or free memory", exc)
    return StateStoreFull(f"state store full (Redis at maxmemory refuses writes): {exc}")


class Boundary:
    """Mixin for a redis-py client class: commands and pipelines translate outages.

    A mixin rather than a wrapper, so scripts registered on the client (which call back into
    ``execute_command``) and pipelines it creates are translated too; tests put it over
    fakeredis to inject outages (tests/unit/test_state_redis.py).
    """

    def execute_command(self, *args: Any, **options: Any) -> Any:
        with translated():
            return super().execute_command(*args, **options)  # type: ignore[misc]

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> StatePipeline:
        return StatePipeline(self.connection_pool, self.response_callbacks,  # type: ignore[attr-defined]
                             transaction, shard_hint)


class StatePipeline(Pipeline):
    """A pipeline whose round trip translates outages (queueing a command sends nothing)."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        with translated():
            return super().execute(raise_on_error)

    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        with translated():
            return super().immediate_execute_command(*args, **options)


class StateRedis(Boundary, redis.Redis):
    """``redis.Redis`` behind the boundary."""


def connect(url: str, *, tls_ca: str = "",
            sentinel: SentinelOptions | None = None) -> StateRedis:
    """A state-store client that retries brief connection blips itself, then translates.

    A ``rediss://`` URL verifies the server's certificate and host name (against ``tls_ca``
    when given, else the system's CAs). A ``sentinel://`` URL follows the master the
    sentinels name (``sentinel``: its name, the sentinels' password, TLS).
    """
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    if is_sentinel(url):
        return master_client(url, sentinel or SentinelOptions(ca=tls_ca), StateRedis, **common)
    return cast(StateRedis, StateRedis.from_url(url, **(redis_tls(url, tls_ca) or {}), **common))


def for_settings(s: Settings) -> StateRedis:
    """The state store of the given settings (``DORMANT_STATE_URL`` with its TLS and
    Sentinel options)."""
    return connect(s.state_url, tls_ca=s.tls_ca, sentinel=SentinelOptions.from_settings(s))
