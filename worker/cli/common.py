"""What every ``dormant`` command shares: the root group, output (table or ``--json``),
the one error grammar and exit codes, and the client used to reach workers.

Every error is one line on stderr, ``error: <ErrorType>: <message>``, and the exit code is
the same for every command (docs/cli.md):

* 0 done;
* 1 tried and failed, or refused (``InvalidTransition``, ``HypervisorRefused``, ...);
* 2 bad input: a malformed argument, an unknown instance, host or run id (``InvalidInput``,
  ``UnknownInstance``, ``ConfigurationError``), checked before anything is queued;
* 3 unavailable or timed out (broker, state store, libvirtd, no worker answered in time).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import wraps
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.core.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DormantError,
    InvalidInput,
    PermanentError,
    TransientError,
    UnknownInstance,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
TABLE_WIDTH_UNBOUNDED = 1000  # columns when stdout is not a terminal
BAD_INPUT = (InvalidInput, UnknownInstance, ConfigurationError)

F = TypeVar("F", bound=Callable[..., Any])
stderr = Console(stderr=True, highlight=False)


def _version() -> str:
    try:
        return version("dormant")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class DormantGroup(click.Group):
    """click's own usage errors follow the same grammar: ``error: InvalidInput: ...``, 2, on
    one line (click spreads some over several, e.g. a missing choice lists each on its own).

    Log records of the libraries the command uses (dormant's own, Celery's) never reach
    stderr, which carries only the command's error lines and progress: whatever they report
    comes back as the command's error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        root = logging.getLogger()
        if not root.handlers:
            root.addHandler(logging.NullHandler())
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            fail_with("Aborted", "interrupted", EXIT_FAILED)
        except click.ClickException as exc:
            fail_with("InvalidInput", " ".join(exc.format_message().split()), EXIT_USAGE)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(cls=DormantGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", "-V", prog_name="dormant",
                      message="%(prog)s %(version)s")
def main() -> None:
    """dormant: pause, suspend and resume KVM guests through Celery workers."""


class Seconds(click.ParamType):
    """A number of seconds more than 0 (``--timeout``); refused with the value as typed
    (``got 0``, not the ``0.0`` it parses to)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        from worker.core.validation import given, quote

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"must be a number of seconds, got {quote(value)}", param, ctx)
        if not number > 0:  # also refuses NaN
            self.fail(f"must be more than 0 seconds, got {given(value)}", param, ctx)
        if number == math.inf:
            self.fail(f"must be a finite number of seconds, got {given(value)}", param, ctx)
        return number


SECONDS = Seconds()


def json_option(fn: F) -> F:
    """Add ``--json``: print one JSON document on stdout instead of a table."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout instead of a table.")(fn)


def fail(message: str, code: int, error_type: str) -> NoReturn:
    """Print ``error: <ErrorType>: message`` on stderr (one unwrapped line) and exit; the
    type is one of those docs/cli.md lists for the code."""
    fail_with(error_type, message, code)


def fail_with(error_type: str, message: str, code: int) -> NoReturn:
    warn_error(f"{error_type}: {message}")
    sys.exit(code)


def fail_error(exc: BaseException) -> NoReturn:
    """Exit with the code and line for an error (see the module docstring)."""
    code, error_type, message = classify(exc)
    fail_with(error_type, message, code)


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(exit code, error type, message) for ``exc``; raises it again when it is a bug."""
    if isinstance(exc, BAD_INPUT):
        return EXIT_USAGE, type(exc).__name__, str(exc)
    if isinstance(exc, TransientError):
        return EXIT_UNAVAILABLE, type(exc).__name__, str(exc)
    if isinstance(exc, PermanentError | DormantError):
        return EXIT_FAILED, type(exc).__name__, str(exc)
    unavailable = _unavailable(exc)
    if unavailable is not None:
        return EXIT_UNAVAILABLE, type(unavailable).__name__, str(unavailable)
    raise exc


def _unavailable(exc: BaseException) -> DormantError | None:
    """Broker, backend or state store errors from kombu, redis-py or Celery, translated."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout

    if isinstance(exc, OperationalError | RedisConnectionError | RedisTimeout | OSError):
        return BrokerUnavailable(f"broker or state store unavailable: {exc}")
    # Celery's result consumer gives up on a dead backend with a bare RuntimeError whose
    # cause is the connection error.
    if (isinstance(exc, RuntimeError) and exc.__cause__ is not None
            and _unavailable(exc.__cause__) is not None):
        return BrokerUnavailable(f"result backend unavailable: {exc.__cause__}")
    return None


def warn_error(message: str) -> None:
    """``error: message`` on stderr without ending the command (one of several results)."""
    warn(f"[red]error:[/red] {escape(message)}")


def note(message: str) -> None:
    """``note: message`` on stderr: what a command waits for, or did besides its result."""
    warn(f"note: {escape(message)}")


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
    """Turn every error into its ``error: <ErrorType>: <message>`` line and exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            fail_error(exc)

    return wrapper  # type: ignore[return-value]
