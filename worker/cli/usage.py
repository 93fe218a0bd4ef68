"""``dormant usage``: what dormant and Celery keep in Redis, family by family.

For the broker, the result backend and the state store (one scan when two share a database):
each family's keys, items (queue messages, unacknowledged deliveries, journal entries), memory
and what bounds it, then each server's own figures. Read-only; see worker/store/usage.py for
how large families are sampled. docs/operations.md "Sizing Redis" says what to expect.
"""

from __future__ import annotations

from typing import Any

import click

from worker.cli.common import emit, handles_errors, json_option, main, warn
from worker.store import usage as measuring


def _stores() -> list[tuple[str, str]]:
    """(store names, URL) per distinct database among the broker, results and state URLs."""
    from worker.core import settings

    s = settings.get()
    by_url: dict[str, list[str]] = {}
    for name, url in (("broker", s.broker_url), ("results", s.result_backend),
                      ("state", s.state_url)):
        by_url.setdefault(url, []).append(name)
    return [("+".join(names), url) for url, names in by_url.items()]


@main.command()
@click.option("--sample", type=click.IntRange(min=0), default=measuring.SAMPLE, show_default=True,
              help="Keys measured with MEMORY USAGE per family (0: every key).")
@json_option
@handles_errors
def usage(sample: int, as_json: bool) -> None:
    """Show memory and key count per family of keys (samples, journals, results, queues...)."""
    from worker.core import settings
    from worker.core.logs import redact_url
    from worker.store.connection import connect, translated

    s = settings.get()
    families: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    for names, url in _stores():
        client = connect(url, tls_ca=s.tls_ca)
        try:
            with translated():
                found = measuring.scan(client, names, sample=sample)
                servers.append({"store": names, "url": redact_url(url),
                                **measuring.server(client)})
        finally:
            client.close()
        families += [f.as_dict() for f in found]
    if as_json:
        emit({"families": families, "servers": servers}, as_json=True)
        return
    rows = [{**f, "memory": measuring.human(f["bytes"]) + ("~" if f["estimated"] else ""),
             "items": "" if f["items"] is None else f["items"]} for f in families]
    emit(rows, as_json=False,
         columns=("store", "family", "keys", "items", "memory", "bound"))
    for srv in servers:
        limit = measuring.human(srv["maxmemory"]) if srv["maxmemory"] else "no limit"
        warn(f"{srv['store']} ({srv['url']}): used {measuring.human(srv['used_memory'])}, "
             f"peak {measuring.human(srv['used_memory_peak'])}, maxmemory {limit} "
             f"({srv['maxmemory_policy']})")
