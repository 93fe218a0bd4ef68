"""The grace notice: one JSON POST to a configured webhook when an idle instance is marked.

At most once per mark: the caller sends only when it created the mark (``SET NX``), and a
failed POST is reported, never repeated (a notice that may have arrived is not sent twice).
The URL may carry a token, so it is never logged or put in a report.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger("dormant.notify")
TIMEOUT = 5.0  # seconds; a slow receiver must not hold up the nightly run


def post(url: str, payload: dict[str, Any], *, timeout: float = TIMEOUT) -> str:
    """POST ``payload`` as JSON; return ``sent (HTTP n)`` or ``failed: why`` (never raises)."""
    if not url:
        return "skipped: no webhook configured (DORMANT_NOTIFY_WEBHOOK)"
    body = json.dumps(payload, sort_keys=True).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "User-Agent": "dormant"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return f"sent (HTTP {response.status})"
    except urllib.error.HTTPError as exc:
        outcome = f"failed: HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        outcome = f"failed: {type(exc).__name__}: {reason}"
    log.warning("grace notice for %s %s", payload.get("instance"), outcome)
    return outcome


def mark_notice(*, instance: str, name: str, host: str, run_id: str, reason: str,
                suspend_after: float) -> dict[str, Any]:
    """The notice's JSON body."""
    return {"event": "dormant.idle_marked", "instance": instance, "name": name, "host": host,
            "run_id": run_id, "reason": reason, "suspend_after": suspend_after}
