"""Logging: one line per transition step that matters, plain or JSON.

Transition code logs with ``extra={"dormant": {...}}``; the JSON formatter lifts those fields
to the top level so a log pipeline can index instance, request id, task id, host and attempt.
URLs are never logged with their passwords (see :func:`redact_url`).
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "dormant", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "dormant", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure(logger: logging.Logger, *, json_lines: bool, level: str) -> None:
    """Point every handler of ``logger`` (Celery's root logger) at dormant's formatter."""
    formatter: logging.Formatter = (
        JsonFormatter() if json_lines
        else PlainFormatter("[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s")
    )
    for handler in logger.handlers:
        handler.setFormatter(formatter)
    logging.getLogger("dormant").setLevel(level.upper())


def redact_url(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://:***@host``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
