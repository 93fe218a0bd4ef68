"""The ``dormant`` command line. Each submodule adds one group of commands to :data:`main`."""

from __future__ import annotations

from worker.cli import health as _health  # noqa: F401
from worker.cli import reclaim as _reclaim  # noqa: F401

# Importing the command modules registers their commands on `main`.
from worker.cli import transitions as _transitions  # noqa: F401
from worker.cli import usage as _usage  # noqa: F401
from worker.cli.common import main

__all__ = ["main"]
