"""Every Lua script reads like a function: a header naming its KEYS and ARGV, and every
argument bound to a named local before the body uses it (no ``ARGV[n]`` in the logic)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

LUA = sorted((Path(__file__).parents[3] / "worker").rglob("*.lua"))
_INDEXED = re.compile(r"\b(KEYS|ARGV)\[\d+\]")


@pytest.mark.parametrize("path", LUA, ids=[p.name for p in LUA])
def test_arguments_are_named_once_at_the_top(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("-- "), "a header comment says what the script does"
    header = [ln for ln in lines if ln.startswith("--")]
    assert any("KEYS" in ln for ln in header) and any("ARGV" in ln for ln in header)
    code = [ln for ln in lines if ln.strip() and not ln.startswith("--")]
    binding = [ln for ln in code if _INDEXED.search(ln)]
    assert all(ln.startswith("local ") for ln in binding), binding
    assert code[: len(binding)] == binding, "arguments are bound before anything else"


def test_there_are_scripts() -> None:
    assert LUA
