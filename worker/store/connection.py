"""The state store's Redis client: dormant's one Redis error boundary.

Every module that talks to the state store (the transition store, runs, samples, the registry,
the kill switch...) gets its client from :func:`connect`, so every command, pipeline and Lua
script call passes through the same translation: once redis-py's own retries of a brief blip
are used up, a connection error or a timeout becomes :class:`StateStoreUnavailable`, the
transient (retried) branch of dormant's error tree, exactly as libvirt's errors are translated
once in ``worker/hypervisor/errors.py``. So does READONLY: a master demoted to a replica by a
failover, still answering a client that knew its old address, is an outage of that client
until it asks again (``sentinel://`` URLs ask the sentinels: :mod:`worker.store.sentinel`).
Other Redis errors (a wrong type, a script error) are bugs and stay what they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from worker.core.errors import StateStoreUnavailable
from worker.core.settings import Settings, redis_tls
from worker.store.sentinel import SentinelOptions, is_sentinel, master_client

OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)


@contextmanager
def translated() -> Iterator[None]:
    """Redis outages become StateStoreUnavailable, a transient (retried) error."""
    try:
        yield
    except OUTAGES as exc:
        raise StateStoreUnavailable(f"state store unavailable: {exc}") from None


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
