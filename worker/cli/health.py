"""``dormant health``: the worker's health check (the one docker compose runs).

Healthy means both: libvirtd answers a call within its deadline on a fresh connection (a hung
libvirtd makes this fail even while the worker itself still answers pings), and, with
``--node``, the worker answers a broadcast ping. Exit 0 healthy, 3 not, with the first failed
check's error type (``HypervisorUnavailable``, ``HypervisorBusy``, ``BrokerUnavailable``,
``NoWorker``) and every failed check in its one line; a bad setting or option is exit 2, like
every command.

``dormant queues``: how many messages wait in (and are held from) each dormant queue, on
either broker -- the "every queue is empty" check of a drain or an upgrade.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import click

from worker.cli.common import (
    EXIT_UNAVAILABLE,
    SECONDS,
    emit,
    fail,
    handles_errors,
    json_option,
    main,
)

MAX_DEFAULT_TIMEOUT = 10.0  # seconds: the default deadline is DORMANT_LIBVIRT_TIMEOUT, at most this


def _libvirt(uri: str, timeout: float) -> dict[str, Any]:
    from worker.core.errors import ConfigurationError, DormantError
    from worker.hypervisor import Hypervisor

    hv = Hypervisor(uri, timeout=timeout)
    started = time.monotonic()
    try:
        version = hv.ping()
    except ConfigurationError:
        raise  # exit 2, like every command
    except DormantError as exc:
        return {"check": "libvirtd", "ok": False, "detail": str(exc),
                "error_type": type(exc).__name__}
    finally:
        hv.close()
    return {"check": "libvirtd", "ok": True,
            "detail": f"{uri} answered in {time.monotonic() - started:.3f}s "
                      f"(libvirt {version // 1_000_000}.{version // 1000 % 1000})"}


def _worker(node: str, timeout: float) -> dict[str, Any]:
    from tasks.celery_app import app

    try:
        replies = app.control.ping(destination=[node], timeout=timeout)
    except Exception as exc:  # the broker is down: unhealthy, say why
        return {"check": f"worker {node}", "ok": False, "detail": f"broker: {exc}",
                "error_type": "BrokerUnavailable"}
    if not replies:
        return {"check": f"worker {node}", "ok": False,
                "detail": f"no ping answer within {timeout:g}s", "error_type": "NoWorker"}
    return {"check": f"worker {node}", "ok": True, "detail": "answers ping"}


@main.command()
@click.option("--node", default=None, help="Also ping this worker node (e.g. dormant@kvm1).")
@click.option("--timeout", type=SECONDS, default=None,
              help="Seconds each check may take (more than 0) [DORMANT_LIBVIRT_TIMEOUT, at "
                   "most 10].")
@json_option
@handles_errors
def health(node: str | None, timeout: float | None, as_json: bool) -> None:
    """Exit 0 when libvirtd (and the worker NODE) answer in time, else 3."""
    from worker.core import settings

    s = settings.get()
    limit = timeout if timeout is not None else min(s.libvirt_timeout, MAX_DEFAULT_TIMEOUT)
    checks = [_libvirt(s.libvirt_uri, limit)]
    if node:
        checks.append(_worker(node, limit))
    emit(checks, as_json=as_json, columns=("check", "ok", "detail"))
    bad = [c for c in checks if not c["ok"]]
    if bad:
        fail("; ".join(f"{c['check']}: {c['detail']}" for c in bad), EXIT_UNAVAILABLE,
             bad[0]["error_type"])


@main.command()
@click.option("--host", "hosts", multiple=True,
              help="Only this host's queue (repeatable) [every live host, and control].")
@json_option
@handles_errors
def queues(hosts: tuple[str, ...], as_json: bool) -> None:
    """Messages ready and in flight in dormant's queues (Redis or RabbitMQ), and on
    RabbitMQ the countdowns (retries) it holds."""
    from worker.api.client import Client
    from worker.core.settings import CONTROL_QUEUE, queue_for_host
    from worker.fleet import broker

    with Client.from_settings() as client:
        names = [queue_for_host(h) for h in hosts] if hosts else \
            [CONTROL_QUEUE, *(queue_for_host(h) for h in client.hosts())]
        kind = broker.for_url(client.settings.broker_url)
        with client.app.connection_for_read() as connection:
            depths = [kind.depth(connection, name) for name in names]
            delayed = kind.delayed(connection)
    rows = [asdict(d) for d in [*depths, *([delayed] if delayed is not None else [])]]
    for row in rows:
        row["empty"] = row["ready"] == 0 and not row["unacked"]
    emit(rows, as_json=as_json, columns=("queue", "ready", "unacked", "consumers", "empty"))
