"""Redis failover in the fault suite (issue 18): the master SIGKILLed under real load.

Each scenario starts its own replicated Redis (tests/support/sentinel.py: a master, a replica,
three ``redis-sentinel`` processes; ``down-after-milliseconds 5000`` as docs/operations.md
recommends), one ``celery -A tasks worker`` whose broker, results and state all sit behind the
sentinels, with the settings a replicated deployment uses (``DORMANT_STATE_WAIT_REPLICAS=1``,
everything else default), and tiny KVM guests. Requests are sent and awaited with dormant's
own client (``worker.api.client.Client``), which resends what goes unanswered.

What the guests themselves say is the measure (:class:`GuestWatch`): every fence a transition
claimed, read from their libvirt metadata, and every real state change, from libvirt's
lifecycle events. "Executed twice" counts requests whose claims were followed by a real
change more than once; "monotonic" means every guest's claims, in the order they were made,
carry strictly increasing fences. Registered in bench/faults.py (``--only failover-...``).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from tests.support.sentinel import SentinelGroup, pid_of, sentinel_env
from tests.support.services import WorkerProcess, new_workdir, unique, wait_until
from worker.api.client import Client
from worker.core import settings
from worker.core.errors import DormantError, WorkerTimeout
from worker.store import keys
from worker.transition import fencing

URI = "qemu:///system"
Outcome = tuple[str, int, bool, str]  # scenario, runs, ok, figures (bench/faults.py's Row)
BACK_WITHIN = 30.0  # seconds from the kill to a transition succeeding again: the target


# -- what the guests say -----------------------------------------------------------------------
_loop_started = threading.Lock()
_loop: list[threading.Thread] = []
_EFFECTS = {  # lifecycle (event, detail) pairs that are a transition's real effect
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED),
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED),
}


def _event_loop() -> None:
    with _loop_started:
        if not _loop:
            libvirt.virEventRegisterDefaultImpl()

            def run() -> None:
                while True:
                    libvirt.virEventRunDefaultImpl()

            _loop.append(threading.Thread(target=run, name="faults-events", daemon=True))
            _loop[0].start()


@dataclass
class Verdict:
    claims: int
    monotonic: bool
    reused: int  # fences claimed by two requests at one guest
    twice: int  # requests whose claims were followed by a real change more than once
    missed: int  # polls that found history already rotated past what was seen (0 expected)
    doubled: list[str] = field(default_factory=list)  # those requests, with their claims


@dataclass
class GuestWatch:
    """Fence claims polled from the guests' metadata, real changes from lifecycle events."""

    uuids: list[str]
    claims: dict[str, dict[tuple[int, str], fencing.Claim]] = field(default_factory=dict)
    effects: dict[str, list[float]] = field(default_factory=dict)
    missed: int = 0

    def __post_init__(self) -> None:
        _event_loop()
        self.claims = {u: {} for u in self.uuids}
        self.effects = {u: [] for u in self.uuids}
        self._stop = threading.Event()
        self._dirty: set[str] = set()
        self._wake = threading.Event()
        self._events = libvirt.open(URI)
        self._callbacks = [
            self._events.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None),
            self._events.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata, None)]
        self._poller = threading.Thread(target=self._poll, name="faults-fences", daemon=True)
        self._poller.start()

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        uuid_ = dom.UUIDString()
        if uuid_ in self.effects and (event, detail) in _EFFECTS:
            self.effects[uuid_].append(time.time())

    def _on_metadata(self, _conn: Any, dom: Any, _kind: int, uri: str, _opaque: Any) -> None:
        """A claim was just written: read that guest next (never call libvirt from here)."""
        uuid_ = dom.UUIDString()
        if uuid_ in self.claims and uri == fencing.NAMESPACE:
            self._dirty.add(uuid_)
            self._wake.set()

    def _poll(self) -> None:
        """Read each guest whose element changed as soon as libvirt says so, and all of them
        twice a second in case an event was missed."""
        conn = libvirt.open(URI)
        domains = {u: conn.lookupByUUIDString(u) for u in self.uuids}
        sweep = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            changed, self._dirty = self._dirty, set()
            if time.monotonic() >= sweep:
                changed, sweep = set(domains), time.monotonic() + 0.5
            for uuid_ in changed:
                self._read(uuid_, domains[uuid_])
        conn.close()

    def _read(self, uuid_: str, dom: Any) -> None:
        marks = []
        for flags in (libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG):
            try:
                marks.append(fencing.parse(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                                        fencing.NAMESPACE, flags)))
            except libvirt.libvirtError:
                continue
        seen = self.claims[uuid_]
        for mark in marks:
            if (len(mark.claims) == fencing.HISTORY and seen
                    and min(c.value for c in mark.claims) > max(v for v, _r in seen) + 1):
                self.missed += 1
            for claim in mark.claims:
                seen[(claim.value, claim.request)] = claim

    def verdict(self) -> Verdict:
        self._stop.set()
        self._poller.join(5)
        for uuid_ in self.uuids:  # a last read of everything, through a fresh connection
            conn = libvirt.open(URI)
            self._read(uuid_, conn.lookupByUUIDString(uuid_))
            conn.close()
        try:
            for callback in self._callbacks:
                self._events.domainEventDeregisterAny(callback)
            self._events.close()
        except libvirt.libvirtError:
            pass
        monotonic, reused, twice, total = True, 0, 0, 0
        doubled: list[str] = []
        for uuid_ in self.uuids:
            claims = sorted(self.claims[uuid_].values(), key=lambda c: c.at)
            total += len(claims)
            values = [c.value for c in claims]
            monotonic &= all(a < b for a, b in itertools.pairwise(values))
            reused += sum(n - 1 for n in Counter(values).values() if n > 1)
            acted: Counter[str] = Counter()
            for i, claim in enumerate(claims):  # a claim acted if a change followed it
                until = claims[i + 1].at if i + 1 < len(claims) else float("inf")
                if any(claim.at <= t < until for t in self.effects[uuid_]):
                    acted[claim.request] += 1
            twice += sum(1 for n in acted.values() if n > 1)
            doubled += [f"{r} at fences {[c.value for c in claims if c.request == r]}"
                        for r, n in acted.items() if n > 1]
        return Verdict(claims=total, monotonic=monotonic, reused=reused, twice=twice,
                       missed=self.missed, doubled=doubled)


# -- one replicated stack ----------------------------------------------------------------------
@dataclass
class Stack:
    """A sentinel group, one worker behind it and dormant's client."""

    group: SentinelGroup
    worker: WorkerProcess
    client: Client
    host: str

    @property
    def queue(self) -> str:
        return f"dormant.{self.host}"

    def state(self) -> Any:
        return self.group.client(2)

    def send(self, task: str, args: list[Any], request_id: str) -> Any:
        """Send like a caller would during a failover: again until the broker takes it."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.client.send(task, args=args, kwargs={"request_id": request_id},
                                        queue=self.queue)
            except Exception:  # kombu's or redis-py's outage, whichever
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.worker.stop()
        self.client.close()
        self.group.stop()


def _stack(suite: Any, *, wait_replicas: int = 1, concurrency: int = 8,
           faultpoints: Path | None = None) -> Stack:
    group = SentinelGroup().start()
    host = unique("faults-fo-")
    extra = {"DORMANT_STATE_WAIT_REPLICAS": str(wait_replicas)}
    if faultpoints is not None:
        extra["FAULTPOINT_DIR"] = str(faultpoints)
    env = sentinel_env(group, host, **extra)
    name = unique("f")
    worker = WorkerProcess(name=name, env=env, log_path=suite.workdir / f"{name}.log",
                           args=["-P", "threads", "-c", str(concurrency)])
    worker.start()
    client = Client.from_settings(settings.load(env))
    wait_until(lambda: worker.alive() and client.app.control.ping(
        destination=[worker.nodename], timeout=0.5), timeout=90, interval=0.3,
        message=f"{worker.nodename} answers ping")
    return Stack(group=group, worker=worker, client=client, host=host)


@dataclass
class Waited:
    """The answers to the requests of a load, awaited with the client's resends."""

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    by_copy: int = 0  # answered by a copy the client sent again

    def back_after(self, killed_at: float) -> float | None:
        """Seconds from the kill (epoch) to the first transition that finished after it."""
        after = [a["finished_at"] - killed_at for a in list(self.answers.values())
                 if a["outcome"] != "duplicate" and a["finished_at"] > killed_at]
        return min(after) if after else None


class Load:
    """One chain of ``ensure`` requests per guest (paused, running, paused...), each sent
    when the one before it is answered, as a caller with one request per instance at a time
    does; the chains run side by side. Waiting is the client's, with its resends."""

    def __init__(self, stack: Stack, fleet: list[Any], per_guest: int, tag: str) -> None:
        self.stack, self.tag, self.per_guest = stack, tag, per_guest
        self.waited = Waited()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._chain, args=(g, n), daemon=True)
                         for n, g in enumerate(fleet)]
        for thread in self._threads:
            thread.start()

    def _chain(self, guest: Any, n: int) -> None:
        for k in range(self.per_guest):
            rid = f"{self.tag}-{n}-{k}-{uuid.uuid4().hex[:6]}"
            result = self.stack.send("dormant.ensure", [guest.uuid, ("paused", "running")[k % 2]],
                                     rid)
            try:
                answer = self.stack.client.wait(result, 300, what=rid)
            except WorkerTimeout:
                with self._lock:
                    self.waited.lost.append(rid)
                continue
            except DormantError as exc:
                with self._lock:
                    self.waited.failed[rid] = type(exc).__name__
                continue
            with self._lock:
                self.waited.answers[rid] = answer
                self.waited.by_copy += answer.get("task_id") != result.id

    def done(self) -> int:
        with self._lock:
            return len(self.waited.answers) + len(self.waited.failed) + len(self.waited.lost)

    def join(self, timeout: float) -> Waited:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self.waited


def _fences(v: Verdict) -> str:
    return (f"fences {'monotonic' if v.monotonic else '**NOT monotonic**'} at every guest "
            f"({v.claims} claims read from libvirt metadata, {v.reused} reused"
            + (f", {v.missed} polls missed history" if v.missed else "") + ")"
            + (f"; executed twice: {'; '.join(v.doubled)}" if v.doubled else ""))


# -- scenarios ---------------------------------------------------------------------------------
def mid_run(suite: Any, count: int) -> Outcome:
    """The master SIGKILLed half-way through ``count`` transitions; never brought back."""
    stack = _stack(suite)
    try:
        fleet = [suite.new_guest("idle") for _ in range(10)]
        watch = GuestWatch([g.uuid for g in fleet])
        load = Load(stack, fleet, count // len(fleet), "fo")
        wait_until(lambda: load.done() >= count // 2, timeout=180, interval=0.02,
                   message="half the transitions answered")
        old, killed = stack.group.kill_master()
        killed_at = time.time()
        stack.group.wait_failover(old)
        promoted = time.monotonic() - killed
        waited = load.join(timeout=600)
        verdict = watch.verdict()
        alive = stack.worker.alive()
    finally:
        stack.close()
    back = waited.back_after(killed_at)
    ok = (len(waited.answers) == count and not waited.failed and verdict.twice == 0
          and verdict.reused == 0 and verdict.monotonic and alive and back is not None
          and back < BACK_WITHIN)
    return ("Redis master SIGKILLed mid-run (Sentinel failover, WAIT 1)", count, ok,
            f"{len(waited.answers)}/{count} results, {len(waited.lost)} lost, "
            f"{verdict.twice} executed twice, {len(waited.failed)} failed"
            f"{' ' + str(dict(Counter(waited.failed.values()))) if waited.failed else ''}; "
            f"{waited.by_copy} answered by a resent copy; {_fences(verdict)}; replica promoted "
            f"{promoted:.1f} s after the kill, transitions succeeding again "
            f"{back if back is None else round(back, 1)} s after it; worker "
            f"{'alive' if alive else '**died**'}")


@dataclass
class FaultPoint:
    """One armed pause point of worker/core/faultpoints.py: a transition waits there."""

    where: Path
    point: str
    instance: str

    def __post_init__(self) -> None:
        self._armed.touch()

    @property
    def _armed(self) -> Path:
        return self.where / f"{self.point}.{self.instance.lower()}"

    def reached(self) -> bool:
        return self._armed.with_name(self._armed.name + ".reached").exists()

    def release(self) -> None:
        self._armed.with_name(self._armed.name + ".go").touch()


def fenced(suite: Any) -> Outcome:
    """The master SIGKILLed between a transition's fence INCR and its libvirt call (a fault
    point holds the transition there), with WAIT 1: the fence survives on the replica."""
    points = new_workdir("dormant-faultpoints-")
    stack = _stack(suite, concurrency=4, faultpoints=points)
    try:
        guest = suite.new_guest("idle")
        watch = GuestWatch([guest.uuid])
        point = FaultPoint(points, "fenced", guest.uuid)
        sent = stack.send("dormant.pause", [guest.uuid], "fenced-1")
        wait_until(point.reached, timeout=60, message="the pause holds its fence")
        held = int(str(stack.state().get(keys.lock(guest.uuid))).split(":")[0])
        _old, killed = stack.group.kill_master()
        point.release()
        answer = stack.client.wait(sent, 180, what="fenced-1")
        took = time.monotonic() - killed
        verdict = watch.verdict()
        fences = sorted(c.value for c in watch.claims[guest.uuid].values())
    finally:
        stack.close()
    ok = (answer["outcome"] in {"changed", "duplicate"} and answer["fence"] > held
          and verdict.monotonic and verdict.twice == 0 and verdict.reused == 0)
    return ("Redis master SIGKILLed between a fence INCR and the libvirt call (WAIT 1)", 1, ok,
            f"the pause held fence {held} when the master died; answered "
            f"{answer['outcome']} {took:.1f} s after the kill with fence {answer['fence']} "
            f"(the promoted replica had {held}: no reuse); claims at the guest {fences}; "
            f"{_fences(verdict)}; executed {'once' if verdict.twice == 0 else 'TWICE'}")


def fenced_unreplicated(suite: Any) -> Outcome:
    """The same kill with WAIT off and the replica frozen, so the fence is really lost: the
    promoted replica hands it out again, and the guest refuses it."""
    points = new_workdir("dormant-faultpoints-")
    stack = _stack(suite, wait_replicas=0, concurrency=4, faultpoints=points)
    try:
        guest = suite.new_guest("idle")
        watch = GuestWatch([guest.uuid])
        replica = next(s for p, s in stack.group.servers.items()
                       if p != stack.group.master().port)
        point = FaultPoint(points, "claimed", guest.uuid)
        frozen = pid_of(replica)
        os.kill(frozen, signal.SIGSTOP)
        try:
            _fill_replication_buffers(stack.group.master().client(15))
            first = stack.send("dormant.pause", [guest.uuid], "unreplicated-a")
            wait_until(point.reached, timeout=60, message="A claimed its fence at the guest")
            held = fencing.parse(guest.domain.metadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, fencing.NAMESPACE,
                libvirt.VIR_DOMAIN_AFFECT_LIVE)).value
            old, _killed = stack.group.kill_master()
        finally:
            os.kill(frozen, signal.SIGCONT)
        stack.group.wait_failover(old)
        counter = stack.state().get(keys.fence(guest.uuid))
        second = stack.send("dormant.pause", [guest.uuid], "unreplicated-b")
        handed = wait_until(lambda: stack.state().get(keys.lock(guest.uuid)), timeout=60,
                            message="B holds the guest's lock on the promoted replica")
        point.release()
        answers = {rid: stack.client.wait(r, 180, what=rid)
                   for rid, r in (("A", first), ("B", second))}
        stale = [e for e in _journal(stack, guest.uuid)
                 if e.get("outcome") == "stale" and e.get("guest_fence") is not None]
        verdict = watch.verdict()
        fences = sorted(c.value for c in watch.claims[guest.uuid].values())
    finally:
        stack.close()
    refused = [(e["request_id"], e["fence"], e["guest_fence"]) for e in stale]
    ok = (bool(refused) and verdict.monotonic and verdict.reused == 0 and verdict.twice == 0
          and {a["outcome"] for a in answers.values()} <= {"changed", "already"}
          and sum(a["outcome"] == "changed" for a in answers.values()) == 1)
    return ("the same kill with WAIT off and the replica frozen (the fence really lost)", 1, ok,
            f"A claimed fence {held} at the guest; the promoted replica's counter was "
            f"{counter or 0}, so B was handed {str(handed).split(':')[0]}; the guest refused it "
            f"(journaled "
            f"StaleLock {refused}); answers A {answers['A']['outcome']}, B "
            f"{answers['B']['outcome']}; claims at the guest {fences}; {_fences(verdict)}; "
            f"executed {'once' if verdict.twice == 0 else 'TWICE'}")


def _fill_replication_buffers(junk: Any, megabytes: int = 64) -> None:
    """Fill the kernel's socket buffers towards a frozen replica (a few MiB on loopback), so
    that what the master writes next stays in its own output buffer and dies with it: the
    write is really lost, as it is when a master dies before its replica read it."""
    with junk.pipeline(transaction=False) as pipe:
        for n in range(megabytes):
            pipe.set(f"junk:{n}", os.urandom(1 << 20))
        pipe.execute()


def _journal(stack: Stack, instance: str) -> list[dict[str, Any]]:
    return [json.loads(f["entry"]) for _id, f in stack.state().xrange(keys.journal(instance))]


def old_master_returns(suite: Any, per_guest: int) -> Outcome:
    """Kill the master under load; the old master comes back (as a replica) under load; then
    the new master is killed under load and the returned one takes over again."""
    stack = _stack(suite)
    fleet_size = 6
    try:
        fleet = [suite.new_guest("idle") for _ in range(fleet_size)]
        watch = GuestWatch([g.uuid for g in fleet])
        waited = Waited()

        def phase(tag: str, during: Callable[[Load], None]) -> None:
            load = Load(stack, fleet, per_guest, tag)
            during(load)
            got = load.join(timeout=600)
            waited.answers.update(got.answers)
            waited.failed.update(got.failed)
            waited.lost += got.lost
            waited.by_copy += got.by_copy

        def kill_at_half(load: Load) -> None:
            wait_until(lambda: load.done() >= fleet_size * per_guest // 2, timeout=180,
                       interval=0.02, message="half the phase answered")
            killed.append((*stack.group.kill_master(), time.time()))
            stack.group.wait_failover(killed[-1][0])

        def bring_back(_load: Load) -> None:
            returning = time.monotonic()
            stack.group.bring_back(killed[0][0])  # starts as a master with old data
            rejoined.append(time.monotonic() - returning)

        killed: list[tuple[Any, float, float]] = []
        rejoined: list[float] = []
        phase("ret1", kill_at_half)
        phase("ret2", bring_back)
        phase("ret3", kill_at_half)
        verdict = watch.verdict()
        alive = stack.worker.alive()
        promoted = stack.group.master()
    finally:
        stack.close()
    back = waited.back_after(killed[-1][2])
    total = 3 * fleet_size * per_guest
    ok = (len(waited.answers) == total and not waited.failed and verdict.twice == 0
          and verdict.reused == 0 and verdict.monotonic and alive
          and promoted.port == killed[0][0].port and back is not None and back < BACK_WITHIN)
    return ("the old master comes back as a replica, then takes over again", total, ok,
            f"{len(waited.answers)}/{total} results, {len(waited.lost)} lost, "
            f"{verdict.twice} executed twice, {len(waited.failed)} failed; the old master "
            f"rejoined as a synchronised replica {rejoined[0]:.1f} s after its restart, under "
            f"load; killing the new master promoted it again, transitions succeeding again "
            f"{back if back is None else round(back, 1)} s after that kill; {_fences(verdict)}; "
            f"worker {'alive' if alive else '**died**'}")
