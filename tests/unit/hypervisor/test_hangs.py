"""Deadlines on libvirt calls, on the in-process test driver with a call made to hang.

A call held back by an Event stands in for a stuck domain: the task gives up at its deadline
with HypervisorBusy, the connection is retired, the guest stays locked until the held call
returns, and both steps are journaled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt
import pytest

from tests.support.services import wait_until
from tests.unit.conftest import TEST_URI, DomainFactory
from worker.core import metrics as metrics_mod
from worker.core.errors import HypervisorBusy, HypervisorUnavailable
from worker.hypervisor import Hypervisor, calls_in_flight
from worker.store import keys
from worker.transition.context import Context, Request
from worker.transition.guards import Store
from worker.transition.runner import run
from worker.transition.table import Action

T = TypeVar("T")


class Stuck(Hypervisor):
    """The test driver, except that calls whose description starts with a prefix hang."""

    def __init__(self, uri: str = TEST_URI, **kw: Any) -> None:
        super().__init__(uri, **kw)
        self.hang: dict[str, threading.Event] = {}

    def call(self, what: str, fn: Callable[[], T], **kwargs: Any) -> T:
        for prefix, gate in self.hang.items():
            if what.startswith(prefix):
                def held(fn: Callable[[], T] = fn, gate: threading.Event = gate) -> T:
                    gate.wait(30)
                    return fn()
                return super().call(what, held, **kwargs)
        return super().call(what, fn, **kwargs)


@pytest.fixture
def stuck() -> Iterator[Stuck]:
    hv = Stuck(timeout=0.3)
    yield hv
    for gate in hv.hang.values():
        gate.set()
    hv.close()


def test_a_call_past_its_deadline_is_abandoned_and_a_fresh_connection_serves_the_next(
        stuck: Stuck, make_domain: DomainFactory) -> None:
    dom = make_domain()
    gate = stuck.hang["pause "] = threading.Event()
    guest = stuck.guest(dom.UUIDString())
    first = stuck.line()
    with pytest.raises(HypervisorBusy) as caught:
        guest.pause()
    assert f"pause {dom.name()}: no answer from libvirt after 0.3s" in str(caught.value)
    assert calls_in_flight()[0] == 1 and calls_in_flight()[1] >= 0.3
    assert first.retired and stuck.line() is not first  # never reused
    # Other calls go on at once on a fresh connection, and the old handle is refused.
    assert stuck.observe(dom.UUIDString())[1].state == "running"
    with pytest.raises(HypervisorBusy, match="connection was retired"):
        guest.observe()
    gate.set()
    caught.value.outstanding.result(5)  # type: ignore[attr-defined]  # the abandoned call completes in its own time
    wait_until(lambda: calls_in_flight()[0] == 0, timeout=5)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED


def test_saves_get_a_deadline_scaled_by_memory() -> None:
    hv = Hypervisor(TEST_URI, timeout=5, save_timeout=100, save_seconds_per_gib=30)
    assert hv.save_deadline(0) == 100
    assert hv.save_deadline(4 * 2**30) == 220


def test_a_connect_that_hangs_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    hv = Hypervisor(TEST_URI, timeout=0.2)
    real_open = libvirt.open
    monkeypatch.setattr(libvirt, "open", lambda uri: (gate.wait(10), real_open(uri))[1])
    try:
        with pytest.raises(HypervisorUnavailable, match=r"no answer from libvirt after 0\.2s"):
            hv.ping()
    finally:
        gate.set()
        monkeypatch.undo()
    assert hv.ping() > 0


def test_the_guest_stays_locked_until_the_abandoned_call_returns(
        stuck: Stuck, store: Store, make_domain: DomainFactory) -> None:
    ctx = Context(hypervisor=stuck, store=store, host="hv1", lock_wait=0.2, verify_timeout=2)
    dom = make_domain()
    uuid = dom.UUIDString()
    gate = stuck.hang["pause "] = threading.Event()
    with pytest.raises(HypervisorBusy, match=f"pause {dom.name()}"):
        run(ctx, Request(action=Action.PAUSE, instance=uuid, request_id="r1", task_id="t",
                         final_attempt=False))
    [abandoned] = store.journal(uuid)
    assert abandoned["outcome"] == "retrying" and abandoned["error_type"] == "HypervisorBusy"
    assert abandoned["lock"] == "kept until the abandoned call returns"
    assert store.redis.get(keys.lock(uuid))  # still locked: the call may yet complete
    before = metrics_mod.LIBVIRT_ABANDONED._value.get()
    assert before >= 1
    # A retry meanwhile finds the guest busy instead of racing the outstanding call.
    with pytest.raises(Exception, match="locked by another transition"):
        run(ctx, Request(action=Action.PAUSE, instance=uuid, request_id="r1", task_id="t",
                         attempt=2, final_attempt=False))
    gate.set()
    wait_until(lambda: store.redis.get(keys.lock(uuid)) is None, timeout=5,
               message="lock released after the abandoned call returned")
    released = store.journal(uuid)[-1]
    assert released["outcome"] == "released" and released["call_returned"] == "returned"
    # The retry now finds the work done by the abandoned call: changed, no second pause.
    stuck.hang.clear()
    result = run(ctx, Request(action=Action.PAUSE, instance=uuid, request_id="r1",
                              task_id="t", attempt=3))
    assert result["outcome"] == "changed" and result["steps"] == []


def test_dormant_health_fails_when_libvirtd_does_not_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from worker.cli import main

    ok = CliRunner().invoke(main, ["health", "--json"])
    assert ok.exit_code == 0, ok.output
    assert '"ok": true' in ok.output

    def hung(self: Hypervisor) -> int:
        raise HypervisorUnavailable("hypervisor unavailable: connect to test:///default: "
                                    "no answer from libvirt after 5s")

    monkeypatch.setattr(Hypervisor, "ping", hung)
    bad = CliRunner().invoke(main, ["health"])
    assert bad.exit_code == 3
    assert "libvirtd: hypervisor unavailable" in bad.output
