"""``make fleet``'s verdict (bench/fleet_night.py ``check``): it fails a night that lost a
guest, suspended one twice, suspended a busy one or left an idle one running -- the CI run
(``make fleet FLEET_QUICK=1``) relies on it."""

from __future__ import annotations

import pytest

from bench.fleet_hosts import generate
from bench.fleet_night import check, percentiles
from bench.fleet_site.fleet_activity import SUSPENDED_KINDS

FLEET = generate(2, 100)


def perfect() -> tuple[dict[str, str], dict[str, int]]:
    real = {g.uuid: "suspended" if g.kind in SUSPENDED_KINDS else "running"
            for g in FLEET.guests}
    journaled = {g.uuid: 1 if g.kind in SUSPENDED_KINDS else 0 for g in FLEET.guests}
    return real, journaled


def test_a_perfect_night_passes() -> None:
    outcome = check(FLEET, *perfect())
    assert outcome["ok"] and outcome["problems"] == {}
    assert outcome["suspended"] == outcome["expected_suspended"] == 140
    assert outcome["kept"] == 60


def first(kind: str) -> str:
    return next(g.uuid for g in FLEET.guests if g.kind == kind)


@pytest.mark.parametrize(("break_it", "problem"), [
    (lambda real, j: real.pop(first("idle")), "lost (not in libvirt)"),
    (lambda real, j: j.__setitem__(first("reset"), 2), "suspended twice"),
    (lambda real, j: real.__setitem__(first("busy"), "suspended"), "busy but suspended"),
    (lambda real, j: j.__setitem__(first("late"), 1), "busy but suspended"),
    (lambda real, j: real.__setitem__(first("gap"), "running"), "idle but not suspended"),
    (lambda real, j: j.__setitem__(first("idle"), 0), "idle but not suspended"),
    (lambda real, j: real.__setitem__(first("adhoc"), "paused"), "ad-hoc guest not running"),
])
def test_every_kind_of_wrong_night_fails(break_it, problem: str) -> None:  # type: ignore[no-untyped-def]
    real, journaled = perfect()
    break_it(real, journaled)
    outcome = check(FLEET, real, journaled)
    assert not outcome["ok"]
    assert outcome["problems"] == {problem: 1}


def test_percentiles_of_latencies() -> None:
    p = percentiles([i / 1000 for i in range(1, 101)])
    assert (p["count"], p["p50_ms"], p["p99_ms"]) == (100, 50.5, 99.0)
    assert percentiles([]) == {"count": 0}
    assert percentiles([0.02])["p99_ms"] == 20.0
