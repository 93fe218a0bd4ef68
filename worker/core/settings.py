"""dormant's configuration: every ``DORMANT_*`` environment variable, read once.

Unknown ``DORMANT_*`` names are rejected rather than ignored, so a typo cannot silently
leave a safety setting (kill switch, per-host cap) at its default.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from worker.core.errors import ConfigurationError
from worker.store import sentinel

PREFIX = "DORMANT_"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Typed settings; each field maps to ``DORMANT_<FIELD NAME IN UPPER CASE>``."""

    # Redis (redis://, rediss://) or RabbitMQ (amqp://; quorum queues): worker/fleet/broker.py
    # says what each needs. The result backend and the state store are always Redis.
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    state_url: str = "redis://127.0.0.1:6379/2"
    # What virsh uses as root. Only the demo and the tests choose libvirt's fake test:///
    # driver, explicitly: a worker never drives a fake hypervisor by default.
    libvirt_uri: str = "qemu:///system"
    host: str = ""
    # PEM bundle of the CA that signs the Redis server certificate, for rediss:// URLs
    # (certificates are always verified; empty = the system's CAs).
    tls_ca: str = ""

    # Redis behind Sentinel (sentinel:// URLs, worker/store/sentinel.py): the name the
    # sentinels monitor, their own password ("" = none) and TLS to them and to the master.
    sentinel_master: str = "dormant"
    sentinel_password: str = ""
    sentinel_tls: bool = False
    # Replicas that must acknowledge (Redis WAIT) a lock and fence taken and a result recorded
    # before a transition goes on: such a write survives a failover. 0 = a single Redis.
    state_wait_replicas: int = 0
    state_wait_timeout: float = 1.0  # seconds; no acknowledgement in time = transient error
    # Seconds dormant's own senders (CLI, Client.wait, run items, forwarding, auto-unpauses)
    # wait for an answer before sending the same request again (same request id), doubling
    # up to ten times this: a message lost in a failover costs a delay, not the request.
    resend_after: float = 30.0

    # Delivery and retries. Every countdown stays far below the visibility timeout.
    visibility_timeout: int = 3600  # seconds before Redis redelivers an unacked message
    # (the Redis broker's; RabbitMQ redelivers when the consumer's channel closes)
    max_retries: int = 6  # transient libvirt failures retried this many times
    retry_backoff: int = 2  # first backoff step in seconds, doubled each retry
    retry_backoff_max: int = 60  # seconds, cap of one backoff step

    # Per-instance lock and the post-condition check.
    lock_ttl: int = 30  # seconds; renewed every ttl/3 while the holder is alive
    lock_wait: float = 60.0  # seconds a task waits for a busy instance before retrying
    verify_timeout: float = 30.0  # seconds to see the target state after a libvirt call
    result_ttl: int = 7 * 86400  # seconds an idempotency record is kept

    # Deadlines of libvirt calls: past one, the call is abandoned (HypervisorBusy, retried).
    libvirt_timeout: float = 30.0  # seconds for a quick call (state, pause, lookup, connect)
    libvirt_save_timeout: float = 120.0  # seconds for a save or restore, plus per GiB below
    libvirt_save_seconds_per_gib: float = 30.0  # added per GiB of guest memory (~35 MB/s)
    save_bypass_cache: bool = True  # O_DIRECT save images (false where the save dir lacks it)

    # Room on the host (worker/transition/room.py). A save needs the guest's memory free in the
    # save directory's filesystem, a restore needs it in the host's available memory; each
    # also keeps a reserve free: this fraction of the filesystem (or of the host's memory),
    # but at least the floor in MiB.
    save_dir: str = "/var/lib/libvirt/qemu/save"  # where libvirtd writes managed-save images
    save_reserve_fraction: float = 0.10
    save_reserve_mib: int = 2048
    memory_reserve_fraction: float = 0.10
    memory_reserve_mib: int = 2048
    # The Redis broker only (RabbitMQ requeues a dead worker's messages itself):
    host_claim_ttl: int = 15  # seconds a dead worker's claim on its host outlives it
    orphan_sweep_interval: int = 30  # seconds between sweeps for messages nobody holds
    concurrency: int = 0  # worker pool size (threads or processes); 0 = Celery's default

    # Registry of which host serves which instance.
    registry_interval: int = 60  # seconds between registry refreshes
    deadline_check_interval: int = 15  # seconds between auto-unpause checks

    # Lifecycle events and reconciliation (worker/drift/watcher.py).
    events: bool = True  # watch libvirt's lifecycle events and journal external changes
    reconcile_interval: int = 300  # seconds between reconciliations (0 = only at start-up)

    # Reclamation.
    sample_interval: int = 300
    idle_window: int = 86400
    idle_min_samples: int = 12
    reclaim_hour: int = 2
    reclaim_minute: int = 30
    reclaim_timezone: str = "UTC"
    # Seconds between reclamation runs instead of the nightly crontab (make run's demo uses a
    # few minutes); 0 = nightly at reclaim_hour:reclaim_minute.
    reclaim_every: int = 0
    reclaim_enabled: bool = True  # the global kill switch's default (Redis can also flip it)
    reclaim_dry_run: bool = False
    reclaim_grace: bool = False  # mark on the first idle night, suspend on a later one
    reclaim_min_age: int = 86400  # seconds a guest must have been observed before reclamation
    reclaim_host_cap: int = 8  # concurrent suspends per host
    reclaim_grace_period: int = 43200  # seconds between a grace mark and the suspend
    reclaim_recheck_seconds: float = 2.0  # fresh activity measured just before a suspend
    reclaim_report_ttl: int = 90 * 86400  # seconds reports and manifests are kept
    reclaim_scope: str = ""  # glob of domain names reclaim/drain may touch ("" = all)
    idle_cpu_percent: float = 3.0
    idle_cpu_quantile: float = 0.97
    idle_net_rx_bps: float = 2000.0
    idle_net_tx_bps: float = 1000.0
    idle_net_quantile: float = 0.95
    idle_disk_bps: float = 20000.0
    idle_disk_quantile: float = 0.95
    idle_min_span_fraction: float = 0.5  # usable samples must cover this much of the window
    idle_max_gap: float = 0.0  # seconds; a longer interval is a gap (0 = 3 sample intervals)
    notify_webhook: str = ""

    # Observability.
    log_json: bool = False
    log_level: str = "INFO"
    metrics_port: int = 0  # 0 = no metrics endpoint in this process

    def __post_init__(self) -> None:
        if not self.host:
            object.__setattr__(self, "host", socket.gethostname())
        _check(self)

    @property
    def host_queue(self) -> str:
        return queue_for_host(self.host)


CONTROL_QUEUE = "dormant.control"


def redis_tls(url: str, ca: str = "", *, sentinel_tls: bool = False) -> dict[str, object] | None:
    """Celery's ``broker_use_ssl`` / ``redis_backend_use_ssl`` for a ``rediss://`` URL (or a
    ``sentinel://`` one with ``DORMANT_SENTINEL_TLS``: then for the master's connections).

    Without them Celery's broker connects to rediss:// without checking the certificate.
    """
    sentinel = url.startswith("sentinel://") and sentinel_tls
    if not url.startswith("rediss://") and not sentinel:
        return None
    options: dict[str, object] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if ca:
        options["ssl_ca_certs"] = ca
    return options


def celery_tls(s: Settings) -> dict[str, dict[str, object]]:
    """Celery's ``broker_use_ssl`` / ``redis_backend_use_ssl`` entries for the ``rediss://``
    URLs among the broker and the result backend (the worker's and the client's alike)."""
    entries = {"broker_use_ssl": redis_tls(s.broker_url, s.tls_ca, sentinel_tls=s.sentinel_tls),
               "redis_backend_use_ssl": redis_tls(s.result_backend, s.tls_ca,
                                                  sentinel_tls=s.sentinel_tls)}
    return {name: options for name, options in entries.items() if options is not None}


def queue_for_host(host: str) -> str:
    """The queue a host's worker consumes: ``dormant.<host>``."""
    return f"dormant.{host}"


def _convert(raw: str, kind: Any, name: str) -> Any:
    if kind is bool or kind == "bool":
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ConfigurationError(f"{name}={raw!r} is not a boolean (use true/false)")
    for candidate, cast in (("int", int), ("float", float)):
        if kind in (candidate, cast):
            try:
                return cast(raw)
            except ValueError:
                raise ConfigurationError(f"{name}={raw!r} is not a valid {candidate}") from None
    return raw


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from an environment mapping; reject unknown ``DORMANT_*`` names."""
    environ = os.environ if environ is None else environ
    known = {PREFIX + f.name.upper(): f for f in fields(Settings)}
    unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values = {
        f.name: _convert(environ[name], f.type, name)
        for name, f in known.items()
        if name in environ
    }
    return Settings(**values)


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: ``least`` (excluded when ``open``) to ``most``."""

    least: float = 0.0
    most: float = math.inf
    open: bool = False  # True: the value must be greater than ``least``

    def holds(self, value: float) -> bool:
        above = value > self.least if self.open else value >= self.least
        return math.isfinite(value) and above and value <= self.most

    def __str__(self) -> str:
        if self.most == math.inf:
            return f"greater than {self.least:g}" if self.open else f"{self.least:g} or more"
        if self.open:
            return f"greater than {self.least:g} and at most {self.most:g}"
        return f"from {self.least:g} to {self.most:g}"


_POSITIVE = Range(open=True)
_FRACTION = Range(0.0, 1.0)
# Every numeric setting is a finite number, 0 or more, unless listed here. Checked when the
# settings are built, so a wrong value stops the worker at start-up naming its variable
# instead of failing later (a quantile of 1.5 in the nightly run, a zero interval dividing).
RANGES: dict[str, Range] = {
    # Zero would make Redis refuse the expiry (SET PX 0) or redeliver every message at once.
    "lock_ttl": _POSITIVE, "result_ttl": _POSITIVE, "visibility_timeout": _POSITIVE,
    "reclaim_report_ttl": _POSITIVE, "host_claim_ttl": _POSITIVE,
    "libvirt_timeout": _POSITIVE, "libvirt_save_timeout": _POSITIVE,
    # Intervals: a beat slot, a timer period, a window length.
    "registry_interval": _POSITIVE, "deadline_check_interval": _POSITIVE,
    "orphan_sweep_interval": _POSITIVE,
    "sample_interval": _POSITIVE, "idle_window": _POSITIVE,
    "idle_min_samples": Range(1), "reclaim_host_cap": Range(1),
    "idle_cpu_quantile": Range(0.0, 1.0, open=True),
    "idle_net_quantile": Range(0.0, 1.0, open=True),
    "idle_disk_quantile": Range(0.0, 1.0, open=True),
    "idle_min_span_fraction": _FRACTION,
    # A reserve of the whole filesystem (or memory) would refuse every save (or restore).
    "save_reserve_fraction": Range(0.0, 0.9), "memory_reserve_fraction": Range(0.0, 0.9),
    "reclaim_hour": Range(0, 23), "reclaim_minute": Range(0, 59),
    "metrics_port": Range(0, 65535),
    "state_wait_timeout": _POSITIVE, "resend_after": _POSITIVE,
}
_LOG_LEVELS = {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}


def _variable(field_name: str) -> str:
    return PREFIX + field_name.upper()


def _check(s: Settings) -> None:
    """Every numeric setting within its range; the time zone and log level known."""
    for f in fields(s):
        value = getattr(s, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        allowed = RANGES.get(f.name, Range())
        if not allowed.holds(value):
            raise ConfigurationError(
                f"{_variable(f.name)}={value!r} is out of range: it must be {allowed}")
    try:
        ZoneInfo(s.reclaim_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"{_variable('reclaim_timezone')}={s.reclaim_timezone!r} is "
                                 "not a known time zone (e.g. UTC, Europe/Paris)") from None
    for name in ("broker_url", "result_backend", "state_url"):
        url = getattr(s, name)
        if url.startswith("sentinel://"):
            try:
                sentinel.parse(url)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{_variable(name)}: {exc}") from None
    if s.log_level.upper() not in _LOG_LEVELS:
        raise ConfigurationError(f"{_variable('log_level')}={s.log_level!r} is not one of "
                                 f"{', '.join(sorted(_LOG_LEVELS))}")


@cache
def get() -> Settings:
    """The process-wide settings, read once from the environment."""
    return load()
