"""Sampling real KVM guests through libvirtd into a real Redis, then deciding from the samples:
a spinning guest is not idle, a halted one is, and a paused one is sampled as paused. And what
a day of samples costs a real redis-server."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path

import libvirt
import pytest

from tests.support.services import wait_until
from worker.hypervisor import Hypervisor
from worker.reclaim import sampling
from worker.reclaim.activity import Sample
from worker.reclaim.idle import IdlePolicy, decide
from worker.store import keys

pytestmark = pytest.mark.integration

PACE = 0.25  # seconds between samples (the beat's 300 s, shortened)


@pytest.mark.slow
def test_sampled_busy_guest_is_not_idle_and_idle_guest_is(guests, redis_clean, host_name):  # type: ignore[no-untyped-def]
    quiet = guests.create("idle")
    client = redis_clean.client(2)
    hv = Hypervisor("qemu:///system")
    try:
        # The idle guest spends its first seconds in the BIOS (CPU, disk reads, and quiet waits
        # in between): it has settled into hlt when three intervals in a row show it under 1 %
        # CPU with no disk reads. Decide only from samples taken after that.
        readings: list[tuple[float, int, int]] = []

        def quiet_settled() -> float | None:
            readings.append((time.monotonic(), quiet.domain.getCPUStats(True)[0]["cpu_time"],
                             quiet.domain.blockStats("hda")[1]))
            last = readings[-4:]
            if len(last) < 4 or last[0][2] != last[-1][2]:
                return None
            quiet_ = all((c1 - c0) / ((t1 - t0) * 1e9) < 0.01
                         for (t0, c0, _), (t1, c1, _) in itertools.pairwise(last))
            return time.time() if quiet_ else None

        settled = wait_until(quiet_settled, timeout=60, interval=PACE,
                             message="idle guest settles into hlt")
        busy = guests.create("busy")  # only now: it burns a core of a 2-core machine

        def sampled_enough() -> bool:
            now = time.time()
            stored = sampling.take(hv, client, host_name, window=600, now=now)
            assert stored >= 2  # every domain of the host, ours included
            return now - settled >= 8 * PACE and len(
                sampling.load(client, [quiet.uuid], since=settled)[quiet.uuid]) >= 8

        wait_until(sampled_enough, timeout=60, interval=PACE, message="8 samples after settling")
        now = time.time()
        loaded = sampling.load(client, [busy.uuid, quiet.uuid], since=settled, host=host_name)
        assert all(all(rows.running()) and rows.has_cpu_time() for rows in loaded.values())
        # A generous max gap: on a crowded machine one getAllDomainStats can wait seconds for
        # libvirtd (other tests' managed saves); gaps are the unit tests' business.
        policy = IdlePolicy(window=now - settled, min_samples=6, max_gap=120.0,
                            min_span_fraction=0.5)

        busy_decision = decide(busy.uuid, loaded[busy.uuid], policy, now=now)
        assert not busy_decision.idle, busy_decision.reason
        assert busy_decision.reason.startswith("not idle: CPU < 3% per vCPU")
        # A spinning vCPU uses a whole core when it gets one; on a crowded 2-core machine (other
        # busy guests) it still gets far more than the 3 % limit.
        assert busy_decision.numbers["cpu_percent_max"] > 3 * policy.cpu_percent

        quiet_decision = decide(quiet.uuid, loaded[quiet.uuid], policy, now=now)
        assert quiet_decision.idle, quiet_decision.reason
        assert quiet_decision.numbers["cpu_percent_at_quantile"] < 3
        assert quiet_decision.numbers["intervals"] >= 6

        assert set(sampling.sampled(client, host_name, since=settled)) >= {busy.uuid, quiet.uuid}
        first = sampling.first_seen(client, [busy.uuid, quiet.uuid])
        assert all(t is not None and t <= settled + 60 for t in first.values())

        # A paused guest is sampled as paused: neither activity nor evidence of idleness.
        quiet.domain.suspend()
        paused = {u: s for u, _n, s in sampling.collect(hv, now=time.time())}[quiet.uuid]
        assert paused.state == "paused"
    finally:
        hv.close()


@pytest.mark.slow
def test_a_guest_held_by_a_save_does_not_hold_the_hosts_sample(  # type: ignore[no-untyped-def]
        guests, start_worker, client_app, redis_clean, host_name):
    """One guest's QEMU is stopped with a managed save under way (the save holds its job):
    ``dormant.sample`` still answers at once, the other guests are sampled running, the held
    one busy (a gap, not an idle interval). A stats call that waits for jobs, made beside it,
    is still stuck: the job really is held."""
    start_worker(pool="threads", concurrency=2)
    held, *others = (guests.create("idle") for _ in range(3))
    qemu = int(Path(f"/run/libvirt/qemu/{held.name}.pid").read_text())
    outcomes: dict[str, object] = {}

    def save() -> None:
        conn = libvirt.open("qemu:///system")
        try:
            conn.lookupByUUIDString(held.uuid).managedSave(0)
            outcomes["save"] = "saved"
        except libvirt.libvirtError as exc:
            outcomes["save"] = exc.get_error_message()
        finally:
            conn.close()

    def waiting_stats() -> None:
        conn = libvirt.open("qemu:///system")
        try:
            domain = conn.lookupByUUIDString(held.uuid)
            conn.domainListGetStats([domain], libvirt.VIR_DOMAIN_STATS_BLOCK, 0)
            outcomes["waiting stats"] = time.monotonic()
        except libvirt.libvirtError as exc:
            outcomes["waiting stats"] = exc.get_error_message()
        finally:
            conn.close()

    saver = threading.Thread(target=save, daemon=True)
    waiter = threading.Thread(target=waiting_stats, daemon=True)
    os.kill(qemu, signal.SIGSTOP)
    try:
        saver.start()
        wait_until(lambda: held.domain.controlInfo()[0] == libvirt.VIR_DOMAIN_CONTROL_JOB,
                   timeout=30, message="the save holds the guest's job")
        waiter.start()
        started = time.monotonic()
        answer = client_app.send_task("dormant.sample",
                                      queue=f"dormant.{host_name}").get(timeout=30)
        took = time.monotonic() - started
        assert "waiting stats" not in outcomes  # a call without NOWAIT is still stuck
    finally:
        os.kill(qemu, signal.SIGCONT)
        saver.join(90)
        waiter.join(90)
    assert took < 10, f"dormant.sample took {took:.1f} s beside a held save"
    at = answer["at"]
    rows = sampling.load(redis_clean.client(2), [held.uuid, *(g.uuid for g in others)],
                         since=at - 1, host=host_name)  # times are kept to the millisecond
    for guest in others:  # sampled at that moment, running
        assert [round(t, 1) for t in rows[guest.uuid].times] == [round(at, 1)]
        assert list(rows[guest.uuid].running()) == [True]
    # the held one is stored as not running (busy): a gap in the evidence, never an idle interval
    assert list(rows[held.uuid].running()) == [False]


def test_a_guest_day_fits_in_one_and_a_half_kib_of_redis(redis_clean):  # type: ignore[no-untyped-def]
    """288 five-minute samples of 100 guests through the storage path, measured by Redis
    (MEMORY USAGE): each guest's record plus its share of its host's sample times."""
    client = redis_clean.client(2)
    t0 = round(time.time()) - 86400 + 1  # whole seconds: times are kept to the millisecond
    guests = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(100)]
    day = [(u, u, Sample(t0 + 300 * k, "running", 10**9 * k + i, 1, 1000 * k, 500 * k,
                         100 * k, 0)) for k in range(288) for i, u in enumerate(guests)]
    assert sampling.store(client, "kvm-a", day, window=86400, now=t0 + 300 * 287) == 28800
    ticks = client.memory_usage(keys.activity_times("kvm-a")) / len(guests)
    per_guest_day = [client.memory_usage(keys.activity(u)) + ticks for u in guests]
    assert max(per_guest_day) <= 1536, per_guest_day
    loaded = sampling.load(client, guests, since=t0, host="kvm-a")
    assert all(len(a) == 288 for a in loaded.values())
