"""Per-interval rates in one byte each, with the idle thresholds exactly on a code boundary.

The idle rule (:mod:`worker.reclaim.idle`) asks of every interval only "was this rate strictly
under its threshold?", and prints, besides those fractions, each metric's value at its quantile
and the highest CPU. So a rate is stored as a *code*: 0 for exactly zero, else a log-spaced
bucket of ``rate / threshold`` whose bounds include 1.0 -- every code below ``limit_code`` is a
rate under the threshold and every other code is at or above it. Verdicts, fractions and the
reasons that print them are therefore exactly what the raw counters give; only the printed
values at the quantile (and the CPU maximum) become the bucket's geometric middle, within the
``relative_error`` of each grid (a few per cent; see :data:`GRIDS`).

The thresholds a code was made for travel with it (:class:`Thresholds`, in each instance's
record): after ``DORMANT_IDLE_*`` thresholds change, rows stored before are compared through
their representative values -- approximately -- until they leave the window.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.reclaim.idle import IdlePolicy

# The CPU column also says why an interval is no evidence (worker/reclaim/activity.py);
# its rate codes stop below these.
NOT_RUNNING = 253  # this sample's guest was not running (paused, suspended, shut off, busy...)
NO_CPU = 254  # no cpu.time at one end of the interval (libvirt's test driver)
RESET = 255  # a counter went backwards: a restart or a restore, not negative usage
SPECIAL = NOT_RUNNING  # codes >= this are not rates


@dataclass(frozen=True)
class Grid:
    """Codes 1..``top`` are buckets of ``rate / threshold`` growing by ``step``; code
    ``limit_code`` starts at exactly 1.0 (the threshold). Code 0 is a rate of exactly 0.
    Ratios below the lowest bucket land in code 1, above the highest in ``top``."""

    top: int
    limit_code: int
    step: float

    @property
    def relative_error(self) -> float:
        """Worst relative error of a representative value inside the grid's range."""
        return math.sqrt(self.step) - 1

    @property
    def span(self) -> tuple[float, float]:
        """The ratios (rate / threshold) the buckets cover without clamping."""
        return self.step ** (1 - self.limit_code), self.step ** (self.top - self.limit_code)

    def code(self, rate: float, limit: float) -> int:
        """The code of ``rate`` (>= 0) for threshold ``limit``; under it <=> code < limit_code.

        The strict comparison decides the side of the boundary, the logarithm only the bucket
        within that side, so float rounding in ``log`` can never move a rate across it.
        """
        return _code(rate, limit, *self._constants(limit))

    def _constants(self, limit: float) -> tuple[float, float, int, int]:
        return (math.log(limit) if limit > 0 else 0.0, 1 / math.log(self.step),
                self.limit_code, self.top)


def _code(rate: float, limit: float, log_limit: float, per_step: float, limit_code: int,
          top: int) -> int:
    """:meth:`Grid.code` with its logarithms worked out beforehand (the hot path)."""
    if rate < limit:
        if rate <= 0:
            return 0
        bucket = limit_code + math.floor((math.log(rate) - log_limit) * per_step)
        return 1 if bucket < 1 else limit_code - 1 if bucket >= limit_code else bucket
    if limit <= 0:  # nothing is under a zero threshold
        return limit_code
    bucket = limit_code + math.floor((math.log(rate) - log_limit) * per_step)
    return top if bucket > top else limit_code if bucket < limit_code else bucket


# One byte per metric, except disk (7 bits: its high bit marks a row with an explicit time).
# Steps chosen so the range covers idle guests (far under) to saturated ones (far over).
CPU_GRID = Grid(top=SPECIAL - 1, limit_code=181, step=10 ** (7 / 251))  # 1e-5 .. 1e2: +-3.3 %
NET_GRID = Grid(top=255, limit_code=129, step=10 ** (12 / 254))  # 1e-6 .. 1e6: +-5.6 %
DISK_GRID = Grid(top=127, limit_code=65, step=10 ** (8 / 126))  # 1e-4 .. 1e4: +-7.6 %
GRIDS = {"cpu": CPU_GRID, "rx": NET_GRID, "tx": NET_GRID, "disk": DISK_GRID}


@cache
def representatives(grid: Grid, limit: float) -> tuple[float, ...]:
    """The value each code stands for: its bucket's geometric middle (0.0 for code 0).

    Under-codes stand for a value strictly under ``limit`` and the others for one at or
    above it, so counting representatives under ``limit`` counts exactly the codes under it.
    """
    values = [0.0]
    for c in range(1, grid.top + 1):
        value = limit * grid.step ** (c - grid.limit_code + 0.5) if limit > 0 else 0.0
        if c < grid.limit_code and value >= limit:
            value = math.nextafter(limit, 0.0)
        elif c >= grid.limit_code and value < limit:
            value = limit
        values.append(value)
    return tuple(values)


_PACKED = struct.Struct("<4f")
_ONE = struct.Struct("<f")


def same_limit(a: float, b: float) -> bool:
    """Whether two thresholds are the same as stored (float32): codes made for one are exact
    for the other."""
    return _ONE.pack(a) == _ONE.pack(b)


@dataclass(frozen=True)
class Thresholds:
    """The four limits a row's codes are relative to (the idle policy's, when stored)."""

    cpu_percent: float = 3.0
    rx_bps: float = 2000.0
    tx_bps: float = 1000.0
    disk_bps: float = 20000.0

    SIZE = _PACKED.size

    @classmethod
    def of(cls, policy: IdlePolicy) -> Thresholds:
        return cls(policy.cpu_percent, policy.net_rx_bps, policy.net_tx_bps, policy.disk_bps)

    def pack(self) -> bytes:
        """16 bytes (float32: enough to tell thresholds apart and to rebuild the values)."""
        return _PACKED.pack(self.cpu_percent, self.rx_bps, self.tx_bps, self.disk_bps)

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Thresholds:
        return cls(*_PACKED.unpack_from(data, offset))

    def same_as(self, other: Thresholds) -> bool:
        """Equal as stored (float32): rows made for one are exact for the other."""
        return self.pack() == other.pack()


class Coder:
    """The four codes of an interval for one set of thresholds, logarithms worked out once:
    what storing a sample costs (a few microseconds)."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        th = thresholds
        self._cpu = (th.cpu_percent, *CPU_GRID._constants(th.cpu_percent))
        self._rx = (th.rx_bps, *NET_GRID._constants(th.rx_bps))
        self._tx = (th.tx_bps, *NET_GRID._constants(th.tx_bps))
        self._disk = (th.disk_bps, *DISK_GRID._constants(th.disk_bps))

    def codes(self, cpu: float, rx: float, tx: float, disk: float) -> tuple[int, int, int, int]:
        """(cpu, rx, tx, disk) codes of these rates (CPU in % per vCPU, the others in B/s)."""
        return (_code(cpu, *self._cpu), _code(rx, *self._rx), _code(tx, *self._tx),
                _code(disk, *self._disk))


@cache
def coder(thresholds: Thresholds) -> Coder:
    return Coder(thresholds)
