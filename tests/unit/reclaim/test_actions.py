"""Reclamation runs without Celery: libvirt's test driver, a fakeredis Store and the real
transition runner. Queued actions are collected instead of sent, then carried out one by one
the way ``dormant.run_item`` would, and the guests' states are read through libvirt directly.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import libvirt
import pytest

from tests.unit.conftest import DomainFactory
from worker.core.errors import HypervisorUnavailable, InvalidInput, SaveDirectoryFull, Unsavable
from worker.core.settings import Settings
from worker.core.states import State
from worker.hypervisor import Hypervisor
from worker.hypervisor.resources import Disk
from worker.reclaim import exemptions, killswitch, run_store, sampling, selection, unsavable
from worker.reclaim.actions import Reclaimer
from worker.reclaim.outcomes import Precheck, closing, outcome_of, run_status
from worker.store import keys
from worker.transition.context import Context, Request
from worker.transition.guards import Store
from worker.transition.room import Reserve, Room
from worker.transition.runner import run
from worker.transition.table import Action

MiB = 2**20
RUNNING, PAUSED, SHUTOFF = libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, \
    libvirt.VIR_DOMAIN_SHUTOFF


# -- pure pieces -------------------------------------------------------------------------------
@pytest.mark.parametrize(("queued", "dry", "disabled", "expected"), [
    (2, False, "", ("acting", "suspending 2")),
    (0, False, "", ("done", "nothing to suspend")),
    (0, True, "", ("dry_run", "dry run: nothing was changed")),
    (0, False, "kill switch on: x", ("disabled", "kill switch on: x")),
    (0, True, "kill switch on: x", ("dry_run", "kill switch on: x")),
])
def test_run_status(queued: int, dry: bool, disabled: str, expected: tuple[str, str]) -> None:
    assert run_status(queued=queued, dry=dry, disabled=disabled) == expected


@pytest.mark.parametrize(("action", "result", "expected"), [
    (Action.SUSPEND, {"outcome": "changed"}, ("suspended", True)),
    (Action.SUSPEND, {"outcome": "already"}, ("already suspended", False)),
    (Action.SUSPEND, {"outcome": "duplicate", "steps": ["save"]}, ("suspended", True)),
    (Action.SUSPEND, {"outcome": "duplicate", "steps": []}, ("already suspended", False)),
    (Action.RESUME, {"outcome": "changed"}, ("resumed", False)),
    (Action.RESUME, {"outcome": "already"}, ("already running", False)),
])
def test_outcome_names(action: Action, result: dict[str, Any],
                       expected: tuple[str, bool]) -> None:
    assert outcome_of(action, result) == expected


def test_closing_counts_finished_outcomes_only() -> None:
    entries: list[dict[str, Any]] = [
        {"outcome": "suspended", "finished": True}, {"outcome": "suspended", "finished": True},
        {"outcome": "skipped", "finished": True}, {"outcome": "pending"}]
    assert closing(entries, 3) == {"status": "done",
                                   "outcomes": {"suspended": 2, "skipped": 1},
                                   "reason": "3 action(s) finished: 1 skipped, 2 suspended"}


def test_precheck_records_the_skip_and_the_recheck_numbers() -> None:
    assert Precheck("running").recorded() == {}
    assert Precheck("running", recheck={"n": 1}).recorded() == {"recheck": {"n": 1}}
    assert Precheck("paused", "skipped: no").recorded() == {"reason": "skipped: no",
                                                            "state": "paused"}


# -- runs over the test driver -----------------------------------------------------------------
class Scene:
    """A reclaimer whose sent actions are kept in ``sent`` and carried out by :meth:`work`."""

    def __init__(self, hypervisor: Hypervisor, store: Store, **settings: Any) -> None:
        self.prefix = f"rcl-{uuid.uuid4().hex[:8]}"
        self.settings = Settings(host="hv1", reclaim_scope=f"{self.prefix}-*",
                                 reclaim_recheck_seconds=0, **settings)
        self.ctx = Context(hypervisor=hypervisor, store=store, host="hv1", lock_wait=0.2,
                           verify_timeout=2.0)
        self.sent: list[tuple[str, str]] = []
        self.reclaimer = Reclaimer(self.ctx, self.settings,
                                   lambda rid, inst: self.sent.append((rid, inst)),
                                   sleep=lambda _s: None)

    def transition(self, instance: str) -> Any:
        def call(action: Action, request_id: str) -> dict[str, Any]:
            return run(self.ctx, Request(action=action, instance=instance,
                                         request_id=request_id, task_id="t"))
        return call

    def work(self) -> list[dict[str, Any]]:
        """Carry out every sent action (and those they send) like the run_item task."""
        results = []
        while self.sent:
            rid, instance = self.sent.pop(0)
            results.append(self.reclaimer.run_item(rid, instance, final=True,
                                                   transition=self.transition(instance)))
        return results


@pytest.fixture
def scene(hypervisor: Hypervisor, store: Store) -> Scene:
    return Scene(hypervisor, store, reclaim_host_cap=1)


def test_drain_then_restore_round_trip_one_action_at_a_time(
        scene: Scene, make_domain: DomainFactory) -> None:
    a, b = make_domain(prefix=scene.prefix), make_domain(prefix=scene.prefix)
    idle = make_domain(prefix=scene.prefix)
    idle.suspend()
    make_domain(prefix="other")  # out of scope: never touched

    report = scene.reclaimer.drain("drain:t1", owner="task-1")
    assert report["status"] == "acting" and report["todo"] == 2
    assert len(scene.sent) == 1  # the host cap: the next is sent when this one finishes
    by_name = {e["name"]: e for e in report["entries"]}
    assert by_name[idle.name()]["verdict"] == "not_running"
    assert scene.work()[0]["outcome"] == "changed"
    assert {a.state()[0], b.state()[0]} == {SHUTOFF}
    assert a.hasManagedSaveImage() and b.hasManagedSaveImage()
    done = run_store.load(scene.ctx.store.redis, "drain:t1")
    assert done["status"] == "done" and done["outcomes"] == {"suspended": 2}
    assert done["manifest"] == sorted([a.UUIDString(), b.UUIDString()])

    restored = scene.reclaimer.restore("drain:t1", "restore:t1", owner="task-2")
    assert restored["kind"] == "restore" and restored["of_run"] == "drain:t1"
    scene.work()
    assert {a.state()[0], b.state()[0]} == {RUNNING}
    back = run_store.load(scene.ctx.store.redis, "restore:t1")
    assert back["status"] == "done" and back["outcomes"] == {"resumed": 2}


def test_a_second_trigger_of_a_run_is_a_duplicate(scene: Scene,
                                                  make_domain: DomainFactory) -> None:
    make_domain(prefix=scene.prefix)
    scene.reclaimer.drain("drain:t2", owner="task-1")
    again = scene.reclaimer.drain("drain:t2", owner="task-2")
    assert again["status"] == "duplicate" and again["report"]["run_id"] == "drain:t2"
    redelivered = scene.reclaimer.drain("drain:t2", owner="task-1")  # same task: its report
    assert redelivered["run_id"] == "drain:t2" and redelivered["kind"] == "drain"


def test_an_instance_gone_before_its_turn_is_skipped_and_closes_the_run(
        scene: Scene, make_domain: DomainFactory) -> None:
    gone = make_domain(prefix=scene.prefix)
    scene.reclaimer.drain("drain:t3", owner="task-1")
    gone.destroy()
    gone.undefine()
    [result] = scene.work()
    assert result["outcome"] == "skipped"
    assert result["reason"] == "skipped: the instance no longer exists"
    report = run_store.load(scene.ctx.store.redis, "drain:t3")
    assert report["status"] == "done" and report["outcomes"] == {"skipped": 1}
    assert report["manifest"] == []


def test_restore_skips_what_is_no_longer_suspended(scene: Scene,
                                                   make_domain: DomainFactory) -> None:
    dom = make_domain(prefix=scene.prefix)
    scene.reclaimer.drain("drain:t4", owner="task-1")
    scene.work()
    dom.create()  # started by someone else (from its managed-save image)
    scene.reclaimer.restore("drain:t4", "restore:t4", owner="task-2")
    [result] = scene.work()
    assert result["reason"] == "skipped: already running (resumed by someone else)"


def test_a_transient_failure_is_left_pending_until_the_final_attempt(
        scene: Scene, make_domain: DomainFactory) -> None:
    make_domain(prefix=scene.prefix)
    scene.reclaimer.drain("drain:t5", owner="task-1")
    [(rid, instance)] = scene.sent

    def down(_action: Action, _request_id: str) -> dict[str, Any]:
        raise HypervisorUnavailable("libvirtd went away")

    with pytest.raises(HypervisorUnavailable):
        scene.reclaimer.run_item(rid, instance, transition=down, final=False)
    assert run_store.load(scene.ctx.store.redis, rid)["done"] == 0  # retried, not recorded
    with pytest.raises(HypervisorUnavailable):
        scene.reclaimer.run_item(rid, instance, transition=down, final=True)
    report = run_store.load(scene.ctx.store.redis, rid)
    assert report["status"] == "done" and report["outcomes"] == {"failed": 1}
    assert report["entries"][0]["error_type"] == "HypervisorUnavailable"


def test_unknown_run_and_foreign_run_are_bad_input(scene: Scene) -> None:
    with pytest.raises(InvalidInput, match="unknown run"):
        scene.reclaimer.run_item("no:such", "u", transition=scene.transition("u"), final=True)
    with pytest.raises(InvalidInput, match="unknown run"):
        scene.reclaimer.restore("no:such")
    run_store.create(scene.ctx.store.redis, "elsewhere:1", {"run_id": "elsewhere:1",
                "kind": "drain", "host": "hv2"}, [], queue=[], ttl=60)
    with pytest.raises(InvalidInput, match="belongs to host hv2"):
        scene.reclaimer.restore("elsewhere:1")


def test_reclaim_with_the_kill_switch_on_suspends_nothing(
        scene: Scene, make_domain: DomainFactory) -> None:
    make_domain(prefix=scene.prefix)
    killswitch.turn(scene.ctx.store.redis, True, by="ops", now=0)
    report = scene.reclaimer.reclaim("hv1:2026-12-01", owner="task-1")
    assert report["status"] == "disabled" and "set by ops" in report["reason"]
    assert scene.sent == [] and report["todo"] == 0
    dry = scene.reclaimer.reclaim(dry_run=True)
    assert dry["status"] == "dry_run" and dry["dry_run"] and dry["run_id"].endswith(":dry")


def test_a_guest_read_busy_only_for_an_instant_is_judged_by_its_own_state(
        scene: Scene, make_domain: DomainFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another query held the guest as the run read it (its counters left out, so the reading
    says busy): no job holds it, libvirt says running, so it is not "not running"."""
    dom = make_domain(prefix=scene.prefix)
    real = sampling.collect

    def held(hv: Hypervisor, *, now: float, of: list[str] | None = None) -> list[Any]:
        return [(u, n, smp._replace(state=str(State.BUSY))) for u, n, smp in real(hv, now=now,
                                                                                 of=of)]

    monkeypatch.setattr(sampling, "collect", held)
    report = scene.reclaimer.reclaim(dry_run=True)
    [entry] = [e for e in report["entries"] if e["instance"] == dom.UUIDString()]
    assert entry["verdict"] != "not_running", entry


def test_reclaim_precheck_stops_at_an_exemption(scene: Scene,
                                                make_domain: DomainFactory) -> None:
    dom = make_domain(prefix=scene.prefix)
    exemptions.add(scene.ctx.store.redis, dom.UUIDString())
    check = scene.reclaimer.precheck("reclaim", dom.UUIDString())
    assert not check.go and check.skip == "not suspended: exempt by dormant exempt"
    assert check.recorded()["state"] == "running"
    dom.suspend()
    paused = scene.reclaimer.precheck("drain", dom.UUIDString())
    assert paused.skip == "skipped: no longer running (paused(user))"


# -- issue 22: run ids per request, cancelling, a second restore -----------------------------------
def test_a_run_sent_without_an_id_is_named_by_its_task(scene: Scene,
                                                       make_domain: DomainFactory) -> None:
    """Two requests are two runs (two task ids), and a redelivered message (the same task id)
    is still its own run, whatever the clock says."""
    make_domain(prefix=scene.prefix)
    first = scene.reclaimer.drain(owner="task-a")
    second = scene.reclaimer.drain(owner="task-b")
    assert (first["run_id"], second["run_id"]) == ("drain:hv1:task-a", "drain:hv1:task-b")
    assert second["status"] == "acting"  # not the first run's report
    again = scene.reclaimer.drain(owner="task-a")  # a redelivery of the first
    assert again["run_id"] == "drain:hv1:task-a" and again.get("status") != "duplicate"
    assert scene.reclaimer.reclaim(owner="task-c")["run_id"] == "hv1:task-c"
    restore = scene.reclaimer.restore("drain:hv1:task-a", owner="task-d")
    assert restore["run_id"] == "restore:task-d:drain:hv1:task-a"


def test_a_run_cancelled_before_its_task_starts_does_nothing(
        scene: Scene, make_domain: DomainFactory) -> None:
    dom = make_domain(prefix=scene.prefix)
    run_store.cancel(scene.ctx.store.redis, "drain:c1", by="ops", at=0, ttl=60)
    report = scene.reclaimer.drain("drain:c1", owner="task-1")
    assert report["status"] == "cancelled"
    assert report["reason"].startswith("cancelled by ops at 19700101T000000Z")
    assert [e["outcome"] for e in report["entries"]] == ["cancelled"]
    assert scene.sent == [] and report["todo"] == 0
    assert dom.state()[0] == RUNNING
    run_store.cancel(scene.ctx.store.redis, "hv1:c2", by="ops", at=0, ttl=60)
    reclaim = scene.reclaimer.reclaim("hv1:c2", owner="task-2")
    assert reclaim["status"] == "cancelled" and scene.sent == []


def test_a_run_cancelled_under_way_starts_nothing_more_and_closes(
        scene: Scene, make_domain: DomainFactory) -> None:
    """Cap 1: the first suspend is under way when the run is cancelled; it finishes, the
    second never starts, and the run closes as cancelled."""
    a, b = make_domain(prefix=scene.prefix), make_domain(prefix=scene.prefix)
    scene.reclaimer.drain("drain:c3", owner="task-1")
    [(rid, first)] = scene.sent
    scene.sent.clear()
    save = scene.transition(first)

    def cancelled_during_the_save(action: Action, request_id: str) -> dict[str, Any]:
        run_store.cancel(scene.ctx.store.redis, rid, by="ops", at=0, ttl=60)
        return save(action, request_id)

    scene.reclaimer.run_item(rid, first, final=True, transition=cancelled_during_the_save)
    results = scene.work()  # what it sent next
    assert [r["outcome"] for r in results] == ["cancelled"]
    report = run_store.load(scene.ctx.store.redis, rid)
    assert report["status"] == "cancelled" and report["done"] == report["todo"] == 2
    assert report["outcomes"] == {"suspended": 1, "cancelled": 1}
    assert report["cancelled"]["by"] == "ops"
    states = {d.UUIDString(): d.state()[0] for d in (a, b)}
    assert sorted(states.values()) == sorted([SHUTOFF, RUNNING])
    assert states[first] == SHUTOFF


def test_a_second_restore_names_the_restore_that_brought_the_guests_back(
        scene: Scene, make_domain: DomainFactory) -> None:
    dom = make_domain(prefix=scene.prefix)
    scene.reclaimer.drain("drain:r1", owner="task-1")
    scene.work()
    scene.reclaimer.restore("drain:r1", "restore:first", owner="task-2")
    scene.work()
    assert dom.state()[0] == RUNNING
    scene.reclaimer.restore("drain:r1", "restore:second", owner="task-3")
    [again] = scene.work()
    assert again["reason"] == ("skipped: already running (restored by restore:first, an "
                               "earlier restore of drain:r1)")
    # Once someone else has changed the guest since, the earlier restore is not named.
    scene.transition(dom.UUIDString())(Action.SUSPEND, "by-hand-suspend")
    scene.transition(dom.UUIDString())(Action.RESUME, "by-hand-resume")
    scene.reclaimer.restore("drain:r1", "restore:third", owner="task-4")
    [third] = scene.work()
    assert third["reason"] == "skipped: already running (resumed by someone else)"


# -- room and unsavable guests -------------------------------------------------------------------
def _priority(domain: libvirt.virDomain, priority: int) -> None:
    domain.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, f'<policy priority="{priority}"/>',
                       "dormant", selection.NAMESPACE, 0)


def test_a_full_save_directory_stops_a_drain_and_what_is_queued_is_skipped(
        hypervisor: Hypervisor, store: Store, make_domain: DomainFactory) -> None:
    """500 MiB free, 100 MiB kept free: the 64 MiB guests fit, the 512 MiB one does not."""
    scene = Scene(hypervisor, store, reclaim_host_cap=1)
    scene.ctx = dataclasses.replace(scene.ctx, room=Room(
        store.redis, hypervisor, "hv1", save_dir="/save",
        disk_reserve=Reserve(0.10, 0), memory_reserve=Reserve(0.0, 0),
        read_disk=lambda _d: Disk("/save", total=1000 * MiB, free=500 * MiB),
        read_memory=lambda _hv: None))
    scene.reclaimer.ctx = scene.ctx
    small = make_domain(prefix=scene.prefix)
    _priority(small, -20)  # a drain takes the lowest priority first: this one, then big
    big = make_domain(prefix=scene.prefix, memory_mib=512)
    _priority(big, -10)
    rest = [make_domain(prefix=scene.prefix) for _ in range(2)]

    scene.reclaimer.drain("drain:full", owner="task-1")
    with pytest.raises(SaveDirectoryFull):
        scene.work()  # small is suspended, then big is refused and the run stops
    assert scene.sent == []  # nothing more was started
    report = run_store.load(store.redis, "drain:full")
    entries = {e["instance"]: e for e in report["entries"]}
    assert entries[small.UUIDString()]["outcome"] == "suspended"
    failed = entries[big.UUIDString()]
    assert failed["outcome"] == "failed" and failed["error_type"] == "SaveDirectoryFull"
    assert failed["details"]["needed_bytes"] == 512 * MiB
    assert failed["details"]["free_bytes"] == 500 * MiB
    for d in rest:
        assert entries[d.UUIDString()]["outcome"] == "skipped"
        assert entries[d.UUIDString()]["reason"] == "not started: save directory full"
        assert d.state()[0] == RUNNING
    assert big.state()[0] == RUNNING and not big.hasManagedSaveImage()
    assert report["status"] == "done" and report["manifest"] == [small.UUIDString()]
    assert report["stopped"]["reason"] == "save directory full"
    assert report["stopped"]["free_bytes"] == 500 * MiB
    assert report["reason"].endswith("; stopped: save directory full")


def test_a_guest_libvirt_cannot_save_is_remembered_until_its_definition_changes(
        scene: Scene, make_domain: DomainFactory) -> None:
    dom = make_domain(prefix=scene.prefix)
    client, hv = scene.ctx.store.redis, scene.ctx.hypervisor
    why = "Requested operation is not valid: cannot migrate domain: ... 'ivshmem'"

    def refused(action: Action, request_id: str) -> dict[str, Any]:
        raise Unsavable(f"libvirt cannot save it: {why}", reason=why)

    scene.reclaimer.drain("drain:unsavable", owner="task-1")
    [(rid, instance)] = scene.sent
    with pytest.raises(Unsavable):
        scene.reclaimer.run_item(rid, instance, final=True, transition=refused)
    assert unsavable.reasons(client, hv, [dom.UUIDString()]) == {dom.UUIDString(): why}
    assert unsavable.reasons(client, hv, [dom.UUIDString()]) == {dom.UUIDString(): why}

    # The definition changes (here: its memory; in life, the device removed): judged again.
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(
        "<memory unit='KiB'>65536</memory>", "<memory unit='KiB'>131072</memory>")
    dom.connect().defineXML(xml)
    assert unsavable.reasons(client, hv, [dom.UUIDString()]) == {}
    assert client.get(keys.unsavable(dom.UUIDString())) is None


def test_the_definition_digest_ignores_dormant_metadata(
        hypervisor: Hypervisor, make_domain: DomainFactory) -> None:
    dom = make_domain()
    before = hypervisor.guest(dom.UUIDString()).definition_digest()
    _priority(dom, 5)
    assert hypervisor.guest(dom.UUIDString()).definition_digest() == before
