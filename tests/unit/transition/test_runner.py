"""runner.run on libvirt's in-process test driver and a fakeredis Store.

The guests are real test-driver domains whose state really changes; every state is checked
through a separate libvirt connection, not through dormant.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import pytest

from tests.unit.conftest import DomainFactory
from worker.core.errors import (
    HypervisorBusy,
    HypervisorRefused,
    InstanceBusy,
    InvalidInput,
    InvalidTransition,
    StaleLock,
    UnknownInstance,
)
from worker.hypervisor import Hypervisor
from worker.store import keys
from worker.transition.context import Context, Request
from worker.transition.guards import Held, Store
from worker.transition.runner import run
from worker.transition.table import Action

T = TypeVar("T")
NOW = 1_000_000.0


def _ctx(hypervisor: Hypervisor, store: Store, **kw: Any) -> Context:
    return Context(hypervisor=hypervisor, store=store, host="hv1", lock_wait=0.2,
                   verify_timeout=2.0, clock=lambda: NOW, **kw)


def _state(domain: libvirt.virDomain) -> tuple[int, int]:
    state, reason = domain.state()
    return state, reason


@pytest.fixture
def ctx(hypervisor: Hypervisor, store: Store) -> Context:
    return _ctx(hypervisor, store)


def test_pause_changes_the_guest_and_records_everything(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    dom = make_domain()
    result = run(ctx, Request(action=Action.PAUSE, instance=dom.UUIDString().upper(),
                              request_id="req-1", task_id="task-1"))
    assert _state(dom) == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
    assert result["instance"] == dom.UUIDString()
    assert result["name"] == dom.name()
    assert result["host"] == "hv1"
    assert result["action"] == "pause"
    assert result["target"] == "paused"
    assert result["outcome"] == "changed"
    assert result["state_before"] == "running" and result["reason_before"] == ""
    assert result["state_after"] == "paused" and result["reason_after"] == "user"
    assert result["request_id"] == "req-1"
    assert result["task_id"] == "task-1"
    assert result["attempts"] == 1
    assert result["steps"] == ["pause"]
    # Journal, idempotency record, registry; the lock is released.
    journal = store.journal(dom.UUIDString())
    assert [(e["outcome"], e["request_id"]) for e in journal] == [("changed", "req-1")]
    assert journal[0]["state_after"] == "paused"
    assert store.journal() == journal
    fingerprint = f"pause|{dom.UUIDString()}||"
    assert store.request("req-1") == {**result, "status": "done", "fingerprint": fingerprint}
    assert store.redis.get(keys.where(dom.UUIDString())) == "hv1"
    assert store.redis.get(keys.lock(dom.UUIDString())) is None


def test_repeat_is_already_and_same_request_is_duplicate(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    dom = make_domain()
    first = run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="a",
                             task_id="t1"))
    assert first["outcome"] == "changed" and first["instance"] == dom.UUIDString()
    again = run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="b",
                             task_id="t2"))
    assert again["outcome"] == "already"
    assert again["state_before"] == again["state_after"] == "paused"
    assert again["reason_before"] == again["reason_after"] == "user"
    assert again["steps"] == []
    for instance in (dom.name(), dom.UUIDString()):
        dup = run(ctx, Request(action=Action.PAUSE, instance=instance, request_id="a",
                               task_id="t3"))
        assert dup["outcome"] == "duplicate"
        assert dup["original_task_id"] == "t1" and dup["task_id"] == "t3"
        assert dup["state_before"] == "running" and dup["instance"] == dom.UUIDString()
    # A duplicate writes nothing new.
    assert [e["outcome"] for e in store.journal(dom.UUIDString())] == ["changed", "already"]
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_PAUSED


def test_the_task_id_is_the_request_id_when_none_is_given(
        ctx: Context, make_domain: DomainFactory) -> None:
    dom = make_domain()
    result = run(ctx, Request(action=Action.SUSPEND, instance=dom.name(), task_id="tid-9"))
    assert result["request_id"] == "tid-9" and result["outcome"] == "changed"
    dup = run(ctx, Request(action=Action.SUSPEND, instance=dom.name(), task_id="tid-9"))
    assert dup["outcome"] == "duplicate"


def test_suspend_and_resume_round_trip(ctx: Context, make_domain: DomainFactory) -> None:
    dom = make_domain()
    run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="p"))
    suspended = run(ctx, Request(action=Action.SUSPEND, instance=dom.name(), request_id="s"))
    assert (suspended["state_before"], suspended["state_after"]) == ("paused", "suspended")
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage()
    resumed = run(ctx, Request(action=Action.RESUME, instance=dom.name(), request_id="r"))
    assert (resumed["state_before"], resumed["state_after"]) == ("suspended", "running")
    assert resumed["steps"] == ["restore"]
    # Saved while paused, restored running (SAVE_RUNNING), image consumed.
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING and not dom.hasManagedSaveImage()


def test_ensure_finds_the_path(ctx: Context, make_domain: DomainFactory) -> None:
    dom = make_domain()
    out = run(ctx, Request(action=Action.ENSURE, instance=dom.name(), target="suspended",
                           request_id="e1"))
    assert (out["outcome"], out["steps"], out["target"]) == ("changed", ["save"], "suspended")
    assert dom.hasManagedSaveImage()
    out = run(ctx, Request(action=Action.ENSURE, instance=dom.name(), target="running",
                           request_id="e2"))
    assert (out["outcome"], out["steps"]) == ("changed", ["restore"])
    out = run(ctx, Request(action=Action.ENSURE, instance=dom.name(), target="running",
                           request_id="e3"))
    assert out["outcome"] == "already"
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING


def test_a_permanent_libvirt_error_fails_at_once_and_releases(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    """The test driver has no VIR_DOMAIN_START_PAUSED: a real libvirt refusal, not retried."""
    dom = make_domain()
    dom.managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)
    with pytest.raises(HypervisorRefused, match="libvirt error 8"):
        run(ctx, Request(action=Action.ENSURE, instance=dom.name(), target="paused",
                         request_id="e", final_attempt=False))
    entry = store.journal(dom.UUIDString())[-1]
    assert (entry["outcome"], entry["error_class"]) == ("failed", "permanent")
    assert entry["state_before"] == "suspended"
    assert store.request("e")["status"] == "failed"
    assert store.redis.get(keys.lock(dom.UUIDString())) is None
    assert dom.hasManagedSaveImage()


@pytest.mark.parametrize(
    ("request_kw", "match"),
    [
        ({"instance": "a/b"}, "malformed instance"),
        ({"instance": ""}, "instance must be"),
        ({"instance": None}, "instance must be"),
        ({"instance": "web", "request_id": "x" * 129}, "request_id"),
        ({"instance": "web", "max_seconds": -1}, "max_seconds"),
    ],
)
def test_bad_input_is_rejected_and_journaled(ctx: Context, store: Store,
                                             request_kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        run(ctx, Request(action=Action.PAUSE, task_id="t", **request_kw))
    [entry] = store.journal()
    assert entry["outcome"] == "rejected" and entry["error_type"] == "InvalidInput"
    assert match in entry["error"] and entry["action"] == "pause"


def test_max_seconds_only_for_pause_and_ensure_needs_a_target(ctx: Context,
                                                              store: Store) -> None:
    with pytest.raises(InvalidInput, match="only applies to pause"):
        run(ctx, Request(action=Action.SUSPEND, instance="web", max_seconds=5, task_id="t"))
    with pytest.raises(InvalidInput, match="unknown target"):
        run(ctx, Request(action=Action.ENSURE, instance="web", target="off", task_id="t"))
    with pytest.raises(InvalidInput, match="request_id"):
        run(ctx, Request(action=Action.PAUSE, instance="web"))
    assert [e["outcome"] for e in store.journal()] == ["rejected"] * 3


def test_unknown_instance_by_uuid(ctx: Context, store: Store) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(UnknownInstance, match=missing):
        run(ctx, Request(action=Action.SUSPEND, instance=missing, request_id="u1"))
    [entry] = store.journal()  # the fleet journal only: no journal for a guest that is not
    assert (entry["outcome"], entry["error_type"]) == ("failed", "UnknownInstance")
    assert not store.redis.exists(keys.journal(missing), keys.where(missing))
    assert store.redis.get(keys.lock(missing)) is None
    assert store.request("u1")["status"] == "failed"


def test_unknown_instance_by_name(ctx: Context, store: Store) -> None:
    with pytest.raises(UnknownInstance, match="no-such-guest"):
        run(ctx, Request(action=Action.RESUME, instance="no-such-guest", request_id="u2"))
    [entry] = store.journal()
    assert (entry["outcome"], entry["error_type"]) == ("failed", "UnknownInstance")
    assert not store.redis.exists(keys.journal("no-such-guest"))
    # A name that never resolved binds the request id to nothing.
    assert "fingerprint" not in store.request("u2")


def test_invalid_transition_is_journaled_and_leaves_the_guest(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    dom = make_domain(start=False)
    with pytest.raises(InvalidTransition, match="shut off"):
        run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="i1",
                         final_attempt=False))
    [entry] = store.journal(dom.UUIDString())
    assert entry["outcome"] == "failed" and entry["error_type"] == "InvalidTransition"
    assert entry["state_before"] == "shutoff" and entry["name"] == dom.name()
    assert store.redis.get(keys.lock(dom.UUIDString())) is None
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_SHUTOFF


def test_an_earlier_interrupted_attempt_makes_already_changed(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    """A worker recorded its intent, paused the guest and died before recording the result."""
    dom = make_domain()
    earlier = store.acquire("crash-1", dom.UUIDString(), wait=0)
    assert isinstance(earlier, Held)
    store.record_intent(earlier, "crash-1", {"state_before": "running", "task_id": "t1"})
    dom.suspend()
    store.redis.delete(keys.lock(dom.UUIDString()))  # its lock lapsed with the worker
    result = run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="crash-1",
                              task_id="t1", attempt=2))
    assert result["outcome"] == "changed"
    assert (result["state_before"], result["state_after"]) == ("running", "paused")
    assert result["fence"] == earlier.fence + 1 and result["attempts"] == 2
    assert store.request("crash-1")["status"] == "done"


def test_an_earlier_refusal_does_not_make_already_changed(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    """Only a recorded intent (a libvirt call that may have run) counts as an earlier change."""
    dom = make_domain(start=False)
    with pytest.raises(InvalidTransition):
        run(ctx, Request(action=Action.RESUME, instance=dom.name(), request_id="again"))
    dom.create()  # an operator starts it by hand; the caller re-sends the same request
    result = run(ctx, Request(action=Action.RESUME, instance=dom.name(), request_id="again"))
    assert result["outcome"] == "already" and result["state_before"] == "running"


class FlakyHypervisor(Hypervisor):
    """The real test driver, except that chosen calls first fail with a given libvirt error."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.failures: dict[str, list[int]] = {}  # call prefix -> error codes to raise in turn
        self.before_call: dict[str, Callable[[], None]] = {}

    def call(self, what: str, fn: Callable[[], T], **kwargs: Any) -> T:
        for prefix, hook in self.before_call.items():
            if what.startswith(prefix):
                hook()
        for prefix, codes in self.failures.items():
            if what.startswith(prefix) and codes:
                code = codes.pop(0)

                def fail(code: int = code) -> T:
                    exc = libvirt.libvirtError("injected")
                    exc.err = (code, libvirt.VIR_FROM_QEMU, "injected failure", 2, "", None,
                               None, 0, 0)
                    raise exc

                return super().call(what, fail, **kwargs)
        return super().call(what, fn, **kwargs)


@pytest.fixture
def flaky() -> FlakyHypervisor:
    hv = FlakyHypervisor("test:///default")
    yield hv
    hv.close()


def test_transient_error_journals_retrying_releases_and_the_retry_succeeds(
        flaky: FlakyHypervisor, store: Store, make_domain: DomainFactory) -> None:
    ctx = _ctx(flaky, store)
    dom = make_domain()
    flaky.failures["pause "] = [libvirt.VIR_ERR_OPERATION_TIMEOUT]
    with pytest.raises(HypervisorBusy, match="libvirt error 68"):
        run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="flaky",
                         task_id="t", final_attempt=False))
    [entry] = store.journal(dom.UUIDString())
    assert (entry["outcome"], entry["error_class"]) == ("retrying", "transient")
    assert store.redis.get(keys.lock(dom.UUIDString())) is None
    assert store.request("flaky")["status"] == "pending"  # the intent survives for the retry
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING
    result = run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="flaky",
                              task_id="t", attempt=2, final_attempt=False))
    assert (result["outcome"], result["attempts"]) == ("changed", 2)
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_PAUSED
    assert [e["outcome"] for e in store.journal(dom.UUIDString())] == ["retrying", "changed"]


def test_transient_error_on_the_final_attempt_fails(
        flaky: FlakyHypervisor, store: Store, make_domain: DomainFactory) -> None:
    ctx = _ctx(flaky, store)
    dom = make_domain()
    flaky.failures["suspend "] = [libvirt.VIR_ERR_OPERATION_TIMEOUT]
    with pytest.raises(HypervisorBusy):
        run(ctx, Request(action=Action.SUSPEND, instance=dom.UUIDString(), request_id="last",
                         final_attempt=True))
    [entry] = store.journal(dom.UUIDString())
    assert (entry["outcome"], entry["error_class"]) == ("failed", "transient")
    assert store.request("last")["status"] == "failed"
    assert store.redis.get(keys.lock(dom.UUIDString())) is None


def test_a_busy_instance_is_retried_without_touching_the_holder(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    dom = make_domain()
    holder = store.acquire("other", dom.UUIDString(), wait=0)
    assert isinstance(holder, Held)
    with pytest.raises(InstanceBusy):
        run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="waiting",
                         final_attempt=False))
    assert store.redis.get(keys.lock(dom.UUIDString())) == holder.value
    assert store.journal(dom.UUIDString())[-1]["outcome"] == "retrying"
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING


def test_a_holder_that_lost_its_lock_records_nothing(
        flaky: FlakyHypervisor, store: Store, make_domain: DomainFactory) -> None:
    """The lock lapses during the libvirt call and a newer transition takes the instance."""
    ctx = _ctx(flaky, store)
    dom = make_domain()
    newer: list[Held] = []

    def steal() -> None:
        store.redis.delete(keys.lock(dom.UUIDString()))
        got = Store(store.redis, lock_ttl=30, result_ttl=60).acquire("newer", dom.UUIDString(),
                                                                      wait=0)
        assert isinstance(got, Held)
        newer.append(got)

    flaky.before_call["pause "] = steal
    with pytest.raises(StaleLock):
        run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="stale"))
    assert store.redis.get(keys.lock(dom.UUIDString())) == newer[0].value
    assert (store.request("stale") or {}).get("status") != "done"
    assert "stale" in [e["outcome"] for e in store.journal(dom.UUIDString())]


def test_a_holder_that_lost_its_lock_stops_waiting_for_a_state_it_will_not_see(
        flaky: FlakyHypervisor, store: Store, make_domain: DomainFactory) -> None:
    """The newer holder unpauses the guest at once: the old one fails fast, not at the deadline."""
    ctx = dataclasses.replace(_ctx(flaky, store), verify_timeout=30.0)
    dom = make_domain()

    paused: list[bool] = []

    def steal_and_unpause() -> None:  # the first state read after the pause call
        if paused and len(paused) == 1:
            paused.append(True)
            store.redis.delete(keys.lock(dom.UUIDString()))
            assert isinstance(store.acquire("newer", dom.UUIDString(), wait=0), Held)
            dom.resume()

    flaky.before_call["pause "] = lambda: paused.append(True)
    flaky.before_call["read state of"] = steal_and_unpause
    started = time.monotonic()
    with pytest.raises(StaleLock, match="newer transition owns it"):
        run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="slow-stale"))
    assert time.monotonic() - started < 5  # far below the 30 s verify timeout
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING
    assert (store.request("slow-stale") or {}).get("status") != "done"


def test_max_seconds_sets_the_deadline_and_a_change_clears_it(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    dom = make_domain()
    uuid_ = dom.UUIDString()
    result = run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="bk",
                              max_seconds=60))
    assert result["outcome"] == "changed" and result["unpause_at"] == NOW + 60
    assert store.redis.zscore(keys.DEADLINES, uuid_) == NOW + 60
    assert store.claim_due_deadlines(NOW + 59) == []
    run(ctx, Request(action=Action.UNPAUSE, instance=dom.name(), request_id="early"))
    assert store.redis.zscore(keys.DEADLINES, uuid_) is None
    assert store.claim_due_deadlines(NOW + 3600) == []


def test_a_deadline_comes_due_once(ctx: Context, store: Store,
                                   make_domain: DomainFactory) -> None:
    dom = make_domain()
    run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="bk2",
                     max_seconds=30))
    [claimed] = store.claim_due_deadlines(NOW + 30)
    assert claimed == {"instance": dom.UUIDString(), "at": str(NOW + 30),
                       "request_id": "bk2", "host": "hv1"}
    assert store.claim_due_deadlines(NOW + 31) == []


def test_a_lock_lost_before_the_libvirt_call_is_journaled_and_the_request_waits_its_turn(
        flaky: FlakyHypervisor, store: Store, make_domain: DomainFactory) -> None:
    """Nothing was done, so the request is not failed: it waits for the newer holder (which
    here never lets go: InstanceBusy, retried by Celery) and takes a fresh lock."""
    ctx = _ctx(flaky, store)
    dom = make_domain()
    newer: list[Held] = []

    def steal() -> None:
        if not newer:
            store.redis.delete(keys.lock(dom.UUIDString()))
            got = Store(store.redis, lock_ttl=30, result_ttl=60).acquire(
                "newer", dom.UUIDString(), wait=0)
            assert isinstance(got, Held)
            newer.append(got)

    flaky.before_call["read state of"] = steal
    with pytest.raises(InstanceBusy):
        run(ctx, Request(action=Action.SUSPEND, instance=dom.name(), request_id="lost"))
    assert _state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING  # no libvirt call without the lock
    assert store.redis.get(keys.lock(dom.UUIDString())) == newer[0].value
    stale, busy = store.journal(dom.UUIDString())
    assert (stale["outcome"], stale["error_type"]) == ("stale", "StaleLock")
    assert "nothing was done" in stale["error"] and busy["error_type"] == "InstanceBusy"
    assert store.request("lost")["status"] != "done"


def test_an_unexpected_error_still_releases_the_lock(
        flaky: FlakyHypervisor, store: Store, make_domain: DomainFactory) -> None:
    """A bug or a foreign exception must not leave a lock that the keeper renews forever."""
    ctx = _ctx(flaky, store)
    dom = make_domain()

    def explode() -> None:
        raise RuntimeError("not a libvirt error")

    flaky.before_call["pause "] = explode
    with pytest.raises(RuntimeError):
        run(ctx, Request(action=Action.PAUSE, instance=dom.name(), request_id="boom"))
    assert store.redis.get(keys.lock(dom.UUIDString())) is None
    entry = store.journal(dom.UUIDString())[-1]
    assert entry["outcome"] == "failed" and entry["error_type"] == "RuntimeError"
