"""Input checks for everything a caller can send; each failure names what was wrong.

Each check takes the ``name`` to use in its message: the task argument (``max_seconds``) for
task callers, the flag (``--max-seconds``) for the CLI. A caller's value is quoted to at most
~80 characters.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from worker.core.errors import InvalidInput
from worker.core.states import Target

QUOTE_MAX = 80  # characters of a caller's value quoted back in an error message
MAX_REQUEST_ID = 128
MAX_PAUSE_SECONDS = 7 * 86400
# libvirt allows almost anything in a name; dormant accepts the portable subset so a name can
# never be confused with a UUID, a path or a URI.
# Used with fullmatch: ``$`` would also accept a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+:@-]{0,127}")
_REQUEST_ID = re.compile(rf"[A-Za-z0-9_.:@/+=-]{{1,{MAX_REQUEST_ID}}}")


def quote(value: Any, limit: int = QUOTE_MAX) -> str:
    """``repr(value)``, cut to ``limit`` characters so a huge argument is never echoed; a cut
    one says how long the value was (a string's own length, not its quoted form's)."""
    return _cut(repr(value), len(value) if isinstance(value, str) else None, limit)


def given(value: Any, limit: int = QUOTE_MAX) -> str:
    """A caller's text as typed (a number stays ``0``, not ``0.0``), cut like :func:`quote`."""
    if isinstance(value, str):
        return _cut(value, len(value), limit)
    return quote(value, limit)


def _cut(text: str, length: int | None, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) if length is None else length} characters)"


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def instance(value: Any, name: str = "instance") -> str:
    """A canonical (lower-case) UUID, or a domain name."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{name} must be a domain UUID or name, got {quote(value)}")
    if is_uuid(value):
        return value.lower()
    if _looks_like_broken_uuid(value) or not _NAME.fullmatch(value):
        raise InvalidInput(
            f"malformed {name} {quote(value)}: expected a UUID like "
            "'4dea22b3-1d52-d8f3-2516-782e98ab3fa0' or a domain name of 1-128 letters, digits "
            "and ._+:@-"
        )
    return value


def _looks_like_broken_uuid(value: str) -> bool:
    """A UUID typo, or a non-canonical spelling (no dashes, ``urn:uuid:``) that libvirt would
    read as a UUID while dormant looked it up as a name."""
    try:
        uuid.UUID(value)
        return True  # parses, but is_uuid said it is not canonical
    except ValueError:
        pass
    return bool(re.fullmatch(r"[0-9a-fA-F-]{30,40}", value)) and value.count("-") >= 3


def request_id(value: Any, name: str = "request_id") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value):
        raise InvalidInput(
            f"malformed {name} {quote(value)}: at most {MAX_REQUEST_ID} characters "
            "(at least 1) of letters, digits and ._:@/+=-"
        )
    return value


def target(value: Any, name: str = "target") -> Target:
    try:
        return Target(value)
    except ValueError:
        allowed = ", ".join(t.value for t in Target)
        raise InvalidInput(f"unknown {name} {quote(value)}: expected one of {allowed}") from None


def max_seconds(value: Any, name: str = "max_seconds") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be a number of seconds, got {quote(value)}")
    if not 0 < value <= MAX_PAUSE_SECONDS:  # also refuses NaN
        raise InvalidInput(_pause_range(name, quote(value)))
    return float(value)


def max_seconds_text(text: str | None, name: str = "--max-seconds") -> float | None:
    """A pause deadline typed on a command line: refused with the text as typed (``got 0``,
    not the ``0.0`` it parses to)."""
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        raise InvalidInput(f"{name} must be a number of seconds, got {quote(text)}") from None
    if not 0 < number <= MAX_PAUSE_SECONDS:
        raise InvalidInput(_pause_range(name, given(text)))
    return number


def _pause_range(name: str, shown: str) -> str:
    return (f"{name} must be more than 0 and at most {MAX_PAUSE_SECONDS} seconds (7 days), "
            f"got {shown}")
