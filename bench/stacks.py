"""Summarise the py-spy profiles written by ``bench.transitions --profile DIR``.

Each block's raw file holds collapsed stacks (``frame;frame;... count``) of the worker while
it held the GIL. For every pattern this prints the share of samples whose stack matches it,
for the no-op and the transition blocks, and the samples per task — what the worker spends
its CPU on, and what a transition adds.

Run: ``.venv/bin/python -m bench.stacks DIR [--tasks N] [PATTERN ...]``
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

DEFAULT_PATTERNS = {
    "task body + Celery trace": r"trace_task \(celery",
    "dormant runner (all of it)": r"runner\.py",
    "  store: begin (idempotency + lock)": r"begin \(worker/store",
    "  store: intent": r"record_intent \(worker/store",
    "  store: finish (record + journal + unlock)": r"finish \(worker/store",
    "  hypervisor (libvirt calls)": r"worker/hypervisor\.py",
    "  metrics": r"worker/metrics\.py",
    "  dormant log line": r"runner\.py:\d+\);Logger\.",
    "Celery: store result (+STARTED)": r"store_result|mark_as_done",
    "Celery: result repr for log/event": r"saferepr",
    "Celery: receive + dispatch": r"on_task_received|strategy",
    "Celery: events": r"send_event|EventDispatcher",
    "logging (all)": r"logging/__init__",
}


def load(paths: list[Path]) -> Counter[str]:
    stacks: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if count.isdigit():  # --nonblocking sampling can tear a stack: skip those lines
                stacks[stack] += int(count)
    return stacks


def share(stacks: Counter[str], pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(n for stack, n in stacks.items() if regex.search(stack))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--tasks", type=int, default=0,
                        help="tasks per kind in the profiled run: prints samples per 1000 tasks")
    parser.add_argument("patterns", nargs="*", help="regexes over the collapsed stack")
    opts = parser.parse_args(argv)
    patterns = {p: p for p in opts.patterns} or DEFAULT_PATTERNS
    kinds = {kind: load(sorted(opts.dir.glob(f"{kind}-*.txt"))) for kind in ("noop", "trans")}
    totals = {kind: sum(stacks.values()) for kind, stacks in kinds.items()}
    unit = "samples/1000 tasks" if opts.tasks else "samples"
    print(f"{'':45s} {'no-op':>16s} {'transition':>16s}   ({unit}, share of all)")
    rows = {"all samples": r""} | patterns
    for label, pattern in rows.items():
        cells = []
        for kind, stacks in kinds.items():
            n = share(stacks, pattern)
            scaled = n * 1000 / opts.tasks if opts.tasks else n
            pct = 100 * n / totals[kind] if totals[kind] else 0.0
            cells.append(f"{scaled:8.0f} {pct:5.1f}%")
        print(f"{label:45s} {cells[0]:>16s} {cells[1]:>16s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
