"""Senders that resend (worker/api/resend.py, worker/fleet/outbox.py, tasks/timers.py): the
schedule, which copy's answer counts, and the outbox a worker keeps of what it sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tasks import timers
from tests.unit.conftest import FakeStateRedis
from worker.api import resend
from worker.api.resend import Outgoing
from worker.core.errors import InstanceBusy, InvalidTransition, WorkerTimeout
from worker.fleet import outbox
from worker.reclaim import run_store
from worker.store import keys


@dataclass
class Copy:
    """What resend reads of an AsyncResult: its id, state and result."""

    id: str
    state: str = "PENDING"
    result: Any = None


def _outgoing(send: Any, copies: list[Copy], last_sent: float = 0.0) -> Outgoing:
    return Outgoing(send=send, copies=cast(Any, copies), last_sent=last_sent)


def test_the_schedule_doubles_up_to_ten_times_the_first_wait() -> None:
    assert [resend.delay(30, n) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    assert resend.delay(30, 0) == 30


@pytest.mark.parametrize(("states", "expected"), [
    ([("PENDING", None), ("STARTED", None)], None),
    ([("PENDING", None), ("SUCCESS", {"outcome": "duplicate"})], 1),
    ([("FAILURE", InvalidTransition("no")), ("PENDING", None)], 0),  # a refusal answers
    ([("FAILURE", InstanceBusy("busy")), ("RETRY", None)], None),  # another copy is under way
    ([("FAILURE", InstanceBusy("busy")), ("FAILURE", InstanceBusy("busy"))], 0),
    ([("FAILURE", InstanceBusy("busy")), ("SUCCESS", {"outcome": "changed"})], 1),
])
def test_the_first_success_answers_and_a_transient_failure_waits_for_the_others(
        states: list[tuple[str, Any]], expected: int | None) -> None:
    copies = [Copy(f"t{i}", state, result) for i, (state, result) in enumerate(states)]
    found: Any = _outgoing(lambda: Copy("new"), copies).answer()
    assert found is (None if expected is None else copies[expected])


@dataclass
class Clock:
    now: float = 0.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_an_unanswered_request_is_sent_again_on_the_schedule_until_a_copy_answers() -> None:
    clock = Clock()
    sent: list[float] = []
    copies = [Copy("first")]

    def send() -> Copy:
        sent.append(clock.now)
        copy = Copy(f"copy-{len(sent)}")
        if len(sent) == 2:
            copy.state, copy.result = "SUCCESS", {"outcome": "changed"}
        return copy

    outgoing = _outgoing(send, copies)
    answer = resend.wait(outgoing, 100, resend_after=10, what="pause vm1", clock=clock,
                         sleep=clock.sleep)
    assert answer.id == "copy-2"
    assert [round(t) for t in sent] == [10, 30]  # after 10 s, then 20 s more


def test_no_answer_at_all_is_a_worker_timeout_naming_the_copies() -> None:
    clock = Clock()
    outgoing = _outgoing(lambda: Copy("again"), [Copy("first")])
    with pytest.raises(WorkerTimeout, match=r"within 25s \(sent 3 time"):
        resend.wait(outgoing, 25, resend_after=5, what="x", clock=clock, sleep=clock.sleep)


def test_a_send_that_fails_is_tried_again_a_second_later() -> None:
    clock = Clock()
    attempts: list[float] = []

    def send() -> Copy:
        attempts.append(clock.now)
        if len(attempts) < 3:
            raise ConnectionError("broker failing over")
        return Copy("ok", "SUCCESS", {})

    outgoing = _outgoing(send, [Copy("first")])
    assert resend.wait(outgoing, 60, resend_after=10, what="x", clock=clock,
                       sleep=clock.sleep).id == "ok"
    assert attempts[0] >= 10 and 0.9 <= attempts[1] - attempts[0] <= 1.6


# -- the outbox --------------------------------------------------------------------------------
def _entry(**kw: Any) -> outbox.Entry:
    return outbox.Entry(**{"task_id": "t1", "task": "dormant.pause", "queue": "dormant.kvm1",
                           "args": ["vm"], "instance": "u1", "request_id": "r1", **kw})


def test_due_entries_are_claimed_once_and_come_back_if_their_claimer_vanished(
        fake_redis: FakeStateRedis) -> None:
    outbox.keep(fake_redis, _entry(), check_at=100)
    outbox.keep(fake_redis, _entry(task_id="t2"), check_at=1000)
    assert outbox.due(fake_redis, 50) == []
    assert [e.task_id for e in outbox.due(fake_redis, 150)] == ["t1"]
    assert outbox.due(fake_redis, 150) == []  # claimed: nobody else gets it meanwhile
    assert [e.task_id for e in outbox.due(fake_redis, 150 + outbox.LEASE)] == ["t1"]


def test_an_entry_is_answered_by_its_recorded_request_or_its_finished_run_entry(
        fake_redis: FakeStateRedis) -> None:
    entry = _entry()
    assert not outbox.answered(fake_redis, entry)
    fake_redis.set(keys.request("r1"), '{"status": "pending", "state_before": "running"}')
    assert not outbox.answered(fake_redis, entry)
    fake_redis.set(keys.request("r1"), '{"status": "failed"}')
    assert outbox.answered(fake_redis, entry)
    item = _entry(request_id="", run="run-1")
    run_store.create(fake_redis, "run-1", {"run_id": "run-1"},
                     [{"instance": "u1", "outcome": "pending"}], queue=["u1"], ttl=60)
    assert not outbox.answered(fake_redis, item)
    run_store.record(fake_redis, "run-1", "u1", {"outcome": "suspended"}, suspended=True, ttl=60)
    assert outbox.answered(fake_redis, item)
    assert not outbox.under_way(fake_redis, entry)
    fake_redis.set(keys.lock("u1"), "7:token")
    assert outbox.under_way(fake_redis, entry)


class App:
    """Records what the outbox sends (Celery's send_task, by name)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], dict[str, Any], str, str]] = []

    def send_task(self, name: str, *, args: list[Any], kwargs: dict[str, Any], queue: str,
                  task_id: str) -> None:
        self.sent.append((name, args, kwargs, queue, task_id))


def test_the_timer_resends_the_unanswered_and_drops_the_answered(
        fake_redis: FakeStateRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timers, "context", lambda: SimpleNamespace(
        store=SimpleNamespace(redis=fake_redis)))
    monkeypatch.setattr(timers, "settings", lambda: SimpleNamespace(resend_after=10.0))
    app = App()
    lost = _entry(kwargs={"request_id": "r1"})
    done = _entry(task_id="t2", request_id="r2", instance="u2")
    busy = _entry(task_id="t3", request_id="r3", instance="u3")
    for entry in (lost, done, busy):
        outbox.keep(fake_redis, entry, check_at=10)
    fake_redis.set(keys.request("r2"), '{"status": "done"}')
    fake_redis.set(keys.lock("u3"), "3:token")

    assert timers.resend_unanswered(app, now=10) == 1  # type: ignore[arg-type]
    assert app.sent == [("dormant.pause", ["vm"], {"request_id": "r1"}, "dormant.kvm1", "t1")]
    assert fake_redis.hget(keys.OUTBOX_ENTRIES, "t2") is None  # answered: forgotten
    schedule = dict(cast(Any, fake_redis.zrange(keys.OUTBOX, 0, -1, withscores=True)))
    assert schedule == {"t1": 30.0, "t3": 20.0}  # copy 2 waits 20 s; the busy one 10 s more

    fake_redis.set(keys.request("r1"), '{"status": "done"}')
    assert timers.resend_unanswered(app, now=30) == 0  # type: ignore[arg-type]
    assert fake_redis.hget(keys.OUTBOX_ENTRIES, "t1") is None
