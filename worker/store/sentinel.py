"""Redis behind Sentinel: ``sentinel://`` URLs for the state store, the result backend and the
broker, spelled the way Celery and kombu spell them.

``sentinel://[[user]:password@]host:port[/db];sentinel://host2:port2[/db];...`` names the
sentinels (one ``;``-separated URL each, default port 26379); the database and the password
of the *master* come from the first one, as in Celery and kombu. The master's name
(``DORMANT_SENTINEL_MASTER``), the sentinels' own password (``DORMANT_SENTINEL_PASSWORD``,
when they require one) and TLS (``DORMANT_SENTINEL_TLS``: to the sentinels and to the master,
certificates checked against ``DORMANT_TLS_CA``) are settings, since neither Celery nor kombu
read them from the URL.

Why one module: the state store uses redis-py's ``Sentinel`` directly and Celery/kombu get
the same facts as transport options (``master_name``, ``sentinel_kwargs``), so a worker, its
result backend and its broker always follow the same master.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from worker.core.errors import ConfigurationError

if TYPE_CHECKING:
    from worker.core.settings import Settings

SCHEME = "sentinel"
DEFAULT_PORT = 26379
SENTINEL_TIMEOUT = 2.0  # seconds for one question to one sentinel (a dead one is skipped)
R = TypeVar("R", bound=redis.Redis)


def is_sentinel(url: str) -> bool:
    return url.startswith(f"{SCHEME}://")


@dataclass(frozen=True)
class SentinelURL:
    """The sentinels of a ``sentinel://`` URL and what the master is reached with."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse(url: str) -> SentinelURL:
    """Split a ``sentinel://...;sentinel://...`` URL; ConfigurationError says what is wrong."""
    chunks = [c.strip() for c in url.split(";") if c.strip()]
    if not chunks:
        raise ConfigurationError(f"{_hide(url)!r} names no sentinel")
    sentinels = []
    for chunk in chunks:
        parts = urlsplit(chunk)
        if parts.scheme != SCHEME or not parts.hostname:
            raise ConfigurationError(
                f"{_hide(chunk)!r} is not a sentinel address (sentinel://host:port[/db]; "
                "several joined by ';')")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigurationError(f"{_hide(chunk)!r} has a malformed port") from None
        sentinels.append((parts.hostname, port))
    first = urlsplit(chunks[0])
    path = first.path.strip("/")
    if path and not path.isdigit():
        raise ConfigurationError(f"{_hide(chunks[0])!r}: the database must be a number")
    return SentinelURL(
        sentinels=tuple(sentinels), db=int(path or 0),
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None)


def _hide(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


@dataclass(frozen=True)
class SentinelOptions:
    """The settings that a ``sentinel://`` URL cannot carry (see the module docstring)."""

    master: str = "dormant"
    password: str = ""  # the sentinels' own (requirepass of sentinel.conf); "" = none
    tls: bool = False
    ca: str = ""

    @classmethod
    def from_settings(cls, s: Settings) -> SentinelOptions:
        return cls(master=s.sentinel_master, password=s.sentinel_password,
                   tls=s.sentinel_tls, ca=s.tls_ca)

    def tls_options(self) -> dict[str, Any]:
        """redis-py's TLS arguments: certificate and host name always checked."""
        if not self.tls:
            return {}
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
        if self.ca:
            options["ssl_ca_certs"] = self.ca
        return options

    def sentinel_kwargs(self) -> dict[str, Any]:
        """How to talk to the sentinels themselves (kombu's and Celery's ``sentinel_kwargs``):
        short timeouts, so discovery moves on from a dead sentinel at once."""
        kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT,
                                  "socket_connect_timeout": SENTINEL_TIMEOUT}
        if self.password:
            kwargs["password"] = self.password
        if self.tls:
            kwargs.update(ssl=True, **self.tls_options())
        return kwargs

    def transport_options(self, url: str) -> dict[str, Any]:
        """What Celery's broker or result backend needs besides a ``sentinel://`` URL
        (merged into ``broker_transport_options`` / ``result_backend_transport_options``);
        nothing for any other URL."""
        if not is_sentinel(url):
            return {}
        return {"master_name": self.master, "sentinel_kwargs": self.sentinel_kwargs()}


def master_client(url: str, options: SentinelOptions, redis_class: type[R],
                  **connection: Any) -> R:
    """A client of whichever server the sentinels name master now.

    redis-py asks the sentinels again after a broken connection, and a connection that meets
    READONLY (a demoted master) is dropped and raises ConnectionError, so a failover surfaces
    as an outage of a few seconds rather than as writes to a replica.
    """
    found = parse(url)
    sentinel = Sentinel(list(found.sentinels), sentinel_kwargs=options.sentinel_kwargs())
    tls = options.tls_options()
    if tls:
        connection.update(ssl=True, **tls)
    client: R = sentinel.master_for(options.master, redis_class=redis_class, db=found.db,
                                    username=found.username, password=found.password,
                                    **connection)
    return client
