"""What every ``dormant`` command shares: the root group, output (table or ``--json``),
exit codes, and the Celery client used to reach workers.

Exit codes: 0 done; 1 the action failed or was refused (reason on stderr); 2 bad usage or
input; 3 infrastructure unavailable (broker, state store, no worker answered in time).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
TABLE_WIDTH_UNBOUNDED = 1000  # columns when stdout is not a terminal

F = TypeVar("F", bound=Callable[..., Any])
stderr = Console(stderr=True, highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """dormant: pause, suspend and resume KVM guests through Celery workers."""


def json_option(fn: F) -> F:
    """Add ``--json``: print one JSON document on stdout instead of a table."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout instead of a table.")(fn)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``error: message`` on stderr (one unwrapped line, no markup) and exit."""
    warn_error(message)
    sys.exit(code)


def warn_error(message: str) -> None:
    """``error: message`` on stderr without ending the command (one of several results)."""
    warn(f"[red]error:[/red] {escape(message)}")


def warn(markup: str) -> None:
    """A line on stderr that is never wrapped, so scripts can grep it."""
    stderr.print(markup, soft_wrap=True)


def emit(data: Any, *, as_json: bool, columns: Sequence[str] | None = None,
         title: str | None = None) -> None:
    """Print ``data`` (a dict or a list of dicts) as JSON or as a table of ``columns``."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    rows: Iterable[dict[str, Any]] = data if isinstance(data, list) else [data]
    rows = list(rows)
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")  # never hide part of a UUID behind "…"
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    # A pipe or file has no width: print the table as wide as it needs, never squeezed.
    width = None if sys.stdout.isatty() else TABLE_WIDTH_UNBOUNDED
    Console(highlight=False, width=width).print(table)


def handles_errors(fn: F) -> F:
    """Turn dormant's and Celery's errors into a message on stderr and a meaningful exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeout

        from worker.errors import (
            ConfigurationError,
            InvalidInput,
            PermanentError,
            TransientError,
        )

        unavailable = (CeleryTimeout, OperationalError, RedisConnectionError, RedisTimeout,
                       TransientError)
        try:
            return fn(*args, **kwargs)
        except (InvalidInput, ConfigurationError) as exc:
            fail(str(exc), EXIT_USAGE)
        except unavailable as exc:
            fail(f"{type(exc).__name__}: {exc}", EXIT_UNAVAILABLE)
        except PermanentError as exc:
            fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
        except RuntimeError as exc:
            # Celery's result consumer gives up on a dead backend with a bare RuntimeError
            # whose cause is the connection error.
            if isinstance(exc.__cause__, (*unavailable, OSError)):
                fail(f"result backend unavailable: {exc.__cause__}", EXIT_UNAVAILABLE)
            raise
        except Exception as exc:  # a task error re-raised by Celery under its own class name
            # Celery rebuilds an error class it cannot import in celery.exceptions.
            if type(exc).__module__ in {"celery.backends.base", "celery.exceptions",
                                        "worker.errors"}:
                fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
            raise

    return wrapper  # type: ignore[return-value]
