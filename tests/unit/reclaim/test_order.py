"""Maintenance-day order as pure functions: priorities from metadata, waves, room to start."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.reclaim.order import bounds, metadata_priority, room, waves

NS = 'xmlns:dormant="https://dormant.dev/xmlns/1"'


@pytest.mark.parametrize(("xml", "expected"), [
    (None, 0), ("", 0),
    (f'<dormant:policy {NS} exempt="true"/>', 0),
    (f'<dormant:policy {NS} priority="10"/>', 10),
    (f'<dormant:policy {NS} priority=" -5 "/>', -5),
    (f'<dormant:policy {NS} priority=""/>', 0),
])
def test_priority_from_metadata(xml, expected) -> None:
    assert metadata_priority(xml) == expected


@pytest.mark.parametrize(("xml", "why"), [
    ("<dormant:policy", "unreadable"),
    (f'<dormant:policy {NS} priority="high"/>', "not an integer"),
    (f'<dormant:policy {NS} priority="1e3"/>', "not an integer"),
    (f'<dormant:policy {NS} priority="5000"/>', "out of range"),
])
def test_a_bad_priority_is_a_precise_error(xml, why) -> None:
    with pytest.raises(ValueError, match=why):
        metadata_priority(xml)


def test_restore_brings_the_highest_priority_back_first_and_drain_takes_it_down_last() -> None:
    prio = {"db1": 10, "db2": 10, "web1": 0, "cache": 5}
    order = ["web1", "db1", "cache", "db2", "batch"]  # batch: no priority = 0
    assert waves(prio, order, kind="restore") == [["db1", "db2"], ["cache"], ["web1", "batch"]]
    assert waves(prio, order, kind="drain") == [["web1", "batch"], ["cache"], ["db1", "db2"]]
    assert waves({}, order, kind="restore") == [order]
    assert waves(prio, [], kind="drain") == []
    with pytest.raises(ValueError):
        waves(prio, order, kind="reclaim")


def test_bounds_are_cumulative_wave_ends() -> None:
    assert bounds([2, 3, 1]) == [2, 5, 6]
    assert bounds([]) == []


@pytest.mark.parametrize(("done", "taken", "want", "expected"), [
    (0, 0, 8, 2),   # first wave of 2 under a cap of 8: only those 2 start
    (0, 2, 1, 0),   # a finisher of wave 1 may not start wave 2 while wave 1 runs
    (1, 2, 1, 0),   # one of wave 1 left running: still nothing of wave 2
    (2, 2, 8, 3),   # wave 1 finished: all of wave 2 (3) start
    (2, 2, 2, 2),   # ... or as many as the cap allows
    (3, 4, 1, 1),   # within wave 2 a finisher starts the next of wave 2
    (5, 5, 8, 1),   # last wave
    (6, 6, 8, 8),   # all finished: nothing left to bound
    (0, 0, 0, 0),
])
def test_room_keeps_waves_apart_and_fills_the_cap_within_one(done, taken, want, expected) -> None:
    assert room([2, 5, 6], done=done, taken=taken, want=want) == expected


def test_room_without_waves_is_the_cap() -> None:
    assert room([], done=0, taken=0, want=4) == 4


def test_a_run_queue_hands_out_one_wave_at_a_time(fake_redis) -> None:
    from worker.reclaim import run_store

    queue = ["db1", "db2", "web1", "web2", "web3"]
    run_store.create(fake_redis, "r1", {"run_id": "r1", "kind": "restore", "host": "h"},
                [{"instance": i} for i in queue], queue=queue, ttl=600, wave_ends=[2, 5])

    def taken(n: int) -> list[str]:
        taken = run_store.take(fake_redis, "r1", n)
        return [i.decode() if isinstance(i, bytes) else i for i in taken]

    def finish(i: str) -> int:
        return run_store.record(fake_redis, "r1", i, {"outcome": "resumed"}, suspended=False,
                           ttl=600)[1]

    assert taken(8) == ["db1", "db2"]  # the cap is 8, the first wave is 2
    assert finish("db1") == 1 and taken(1) == []  # a finisher of wave 1 starts nothing of 2
    done = finish("db2")
    assert run_store.wave_end(fake_redis, "r1", done)  # the last of wave 1 starts the next wave
    assert taken(2) == ["web1", "web2"]  # ... as far as the cap allows
    assert finish("web1") == 3 and not run_store.wave_end(fake_redis, "r1", 3)
    assert taken(1) == ["web3"] and taken(1) == []


def test_a_run_without_waves_takes_up_to_the_cap(fake_redis) -> None:
    from worker.reclaim import run_store

    run_store.create(fake_redis, "r2", {"run_id": "r2"}, [], queue=["a", "b", "c"], ttl=600)
    assert len(run_store.take(fake_redis, "r2", 2)) == 2
    assert len(run_store.take(fake_redis, "r2", 5)) == 1


@settings(max_examples=200, deadline=None)
@given(ends=st.lists(st.integers(1, 12), max_size=4).map(lambda e: sorted(set(e))),
       done=st.integers(0, 12), taken=st.integers(0, 12), want=st.integers(0, 10),
       queued=st.integers(0, 12))
def test_taking_from_a_run_in_redis_follows_room(ends: list[int], done: int, taken: int,
                                                 want: int, queued: int) -> None:
    """run_store.take (one Lua step, lua/run_take.lua) starts exactly what ``room`` allows."""
    import json

    import fakeredis

    from worker.reclaim import run_store
    from worker.store import keys

    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    client.hset(keys.run("r"), mapping={"done": done, "taken": taken,
                                        "waves": json.dumps(ends)})
    if queued:
        client.rpush(keys.run_queue("r"), *[f"g{i}" for i in range(queued)])
    allowed = room(ends, done=done, taken=taken, want=want)
    assert run_store.take(client, "r", want) == [f"g{i}" for i in range(min(allowed, queued))]
    assert int(client.hget(keys.run("r"), "taken") or 0) == taken + (allowed if want else 0)
