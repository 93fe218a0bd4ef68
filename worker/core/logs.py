"""Logging: one line per transition step that matters, plain or JSON.

Transition code logs with ``extra={"dormant": {...}}``; the JSON formatter lifts those fields
to the top level so a log pipeline can index instance, request id, task id, host and attempt.
Both formatters mask the password of any ``scheme://user:password@`` URL in the final line
(messages, fields and tracebacks), so a broker URL cannot leak through a library's error text.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PLAIN_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@\s/]+)@", re.I)


def redact(text: str) -> str:
    """Mask URL passwords anywhere in ``text``: ``redis://:s3cret@h`` -> ``redis://:***@h``."""
    if "@" not in text:  # the common case costs one scan
        return text
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the ``dormant`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        fields = getattr(record, "dormant", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                doc.setdefault(key, redact(value) if isinstance(value, str) else value)
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


class PlainFormatter(logging.Formatter):
    """Celery's usual line with the ``dormant`` fields appended as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "dormant", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return redact(line)


def formatter(*, json_lines: bool) -> logging.Formatter:
    return JsonFormatter() if json_lines else PlainFormatter(PLAIN_FORMAT)


def configure(logger: logging.Logger, *, json_lines: bool, level: str) -> None:
    """Point every handler of ``logger`` (a logger Celery just set up) at dormant's formatter."""
    chosen = formatter(json_lines=json_lines)
    for handler in logger.handlers:
        handler.setFormatter(chosen)
    logging.getLogger("dormant").setLevel(level.upper())


def redact_url(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://:***@host``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
