"""Room on real hosts: a save directory that is too small or fills during a save, a host short
of memory for a restore (issue 19).

Real parts: libvirtd and its guests, a real worker, a real Redis, and for the disk a small
loop-mounted ext4 that the test's guests' save images land on (tests/support/save_dir.py:
each routed guest's image path in libvirt's directory is a link there, so other sessions'
saves on this machine are untouched). Every outcome is read back from libvirt and from the
filesystem, not from dormant.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.journal import journal, real_state, saving
from tests.support.services import wait_until

pytestmark = pytest.mark.integration

MiB = 2**20


def _room_env(directory: Path, **extra: str) -> dict[str, str]:
    return {"DORMANT_SAVE_DIR": str(directory), "DORMANT_SAVE_RESERVE_FRACTION": "0.1",
            "DORMANT_SAVE_RESERVE_MIB": "4", **extra}


def _send(app: Any, host: str, task: str, instance: str, **kwargs: Any) -> Any:
    return app.send_task(task, args=[instance], kwargs={"request_id": uuid.uuid4().hex,
                                                        **kwargs}, queue=f"dormant.{host}")


def _refused(result: Any, timeout: float = 120) -> BaseException:
    with pytest.raises(Exception) as info:
        result.get(timeout=timeout)
    return info.value


def test_a_save_that_would_not_fit_is_refused_and_the_filesystem_stays_usable(
        guests, save_directory, start_worker, client_app, redis_clean, host_name):  # type: ignore[no-untyped-def]
    """64 MiB of ext4: a 32 MiB guest fits with the reserve, a 64 MiB one does not and is
    refused untouched; a guest writing its disk on the same filesystem never runs short."""
    directory = save_directory(64)
    start_worker(pool="threads", concurrency=4, env=_room_env(directory.path))
    bystander = guests.create("writer", disk_dir=directory.path, disk_mib=16)
    small = guests.create("idle", memory_mib=32)
    big = guests.create("idle", memory_mib=64)
    directory.route(small.name)
    directory.route(big.name)

    done = _send(client_app, host_name, "dormant.suspend", small.uuid).get(timeout=120)
    assert done["outcome"] == "changed" and real_state(small.domain) == "suspended"
    assert directory.image_of(small.name).stat().st_size > 0  # the image is on our filesystem

    free = directory.free()
    error = _refused(_send(client_app, host_name, "dormant.suspend", big.uuid))
    assert type(error).__name__ == "SaveDirectoryFull"
    assert f"in {directory.path}: " in str(error) and "64 MiB needed (its memory)" in str(error)
    assert real_state(big.domain) == "running"  # untouched
    assert not directory.image_of(big.name).exists() and not big.domain.hasManagedSaveImage()
    [entry] = [e for e in journal(redis_clean, big.uuid) if e["outcome"] != "external"]
    assert entry["outcome"] == "failed" and entry["error_type"] == "SaveDirectoryFull"
    details = entry["details"]
    assert details["where"] == str(directory.path) and details["needed_bytes"] == 64 * MiB
    assert abs(details["free_bytes"] - free) < 4 * MiB  # what statvfs said, give or take
    assert details["reserve_bytes"] == max(int(details["total_bytes"] * 0.1), 4 * MiB)

    # The bystander kept writing to the same filesystem all along and was never paused.
    before = bystander.domain.blockStats("hda")[3]
    wait_until(lambda: bystander.domain.blockStats("hda")[3] > before, timeout=30,
               message="the bystander still writes")
    assert real_state(bystander.domain) == "running"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_save_that_fills_the_directory_anyway_leaves_the_guest_running_and_no_image(
        linux_guests, save_directory, start_worker, client_app, redis_clean, host_name):  # type: ignore[no-untyped-def]
    """Someone else takes the space while a real 96 MiB-filled Linux guest is being saved: the
    write fails with ENOSPC. The guest runs on (same boot, same memory), no image is left
    -- not even a stale file that was there before the save, which libvirt would have kept --
    and the error says the save directory is full, with the figures."""
    directory = save_directory(384)
    start_worker(pool="threads", concurrency=4, env=_room_env(directory.path))
    guest = linux_guests.create(fill_mib=96)
    boot, filled = guest.wait_filled()
    image = directory.route(guest.name)
    image.write_bytes(b"stale" * 1000)  # left by an earlier crash: libvirt will not delete it

    result = _send(client_app, host_name, "dormant.suspend", guest.uuid)
    wait_until(lambda: saving(guest.domain), timeout=120, interval=0.01,
               message="the save under way")
    qemu = int(Path(f"/run/libvirt/qemu/{guest.name}.pid").read_text())
    os.kill(qemu, signal.SIGSTOP)  # hold the save while someone else fills the filesystem
    try:
        directory.fill(leave=8 * MiB)
    finally:
        os.kill(qemu, signal.SIGCONT)
    error = _refused(result)
    assert type(error).__name__ == "SaveDirectoryFull"
    assert str(error).startswith("the save failed: save directory full")

    assert real_state(guest.domain) == "running"
    assert not guest.domain.hasManagedSaveImage()
    assert not Path(f"/var/lib/libvirt/qemu/save/{guest.name}.save").is_symlink()  # gone
    [entry] = [e for e in journal(redis_clean, guest.uuid) if e["outcome"] == "failed"]
    assert entry["details"]["settled"] == ["partial image removed"]
    assert entry["details"]["state_after"] == "running"
    last = guest.console().last_heartbeat
    assert guest.wait_heartbeat_after(last)[0] == boot  # the same boot, still alive
    assert guest.checksum() == (boot, filled)  # and the same memory


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def test_a_restore_wave_starts_what_fits_in_memory_and_refuses_the_rest(
        guests, start_worker, client_app, redis_clean, host_name):  # type: ignore[no-untyped-def]
    """The reserve is set so that ~2 GiB of the host's available memory is left for guests:
    a 32 MiB guest is restored, an 8 GiB one (its memory never touched: a tiny image) is
    refused with the figures and stays suspended. A direct resume is refused the same way."""
    token = uuid.uuid4().hex[:6]
    prefix = f"dormant-test-{token}-"
    reserve_mib = (_mem_available() - 2048 * MiB) // MiB
    start_worker(pool="threads", concurrency=4, env={
        "DORMANT_MEMORY_RESERVE_FRACTION": "0", "DORMANT_MEMORY_RESERVE_MIB": str(reserve_mib),
        "DORMANT_RECLAIM_SCOPE": prefix + "*"})
    small = guests.create("idle", name=f"{prefix}small-p{os.getpid()}", memory_mib=32)
    big = guests.create("idle", name=f"{prefix}big-p{os.getpid()}", memory_mib=8192)
    drained = client_app.send_task("dormant.drain", queue=f"dormant.{host_name}").get(timeout=60)
    rid = drained["run_id"]

    from worker.reclaim import run_store

    state = redis_clean.client(2)

    def finished(run: str) -> dict[str, Any] | None:
        report = run_store.load(state, run)
        return report if report and report["status"] == "done" else None

    wait_until(lambda: finished(rid), timeout=120, message="the drain finished")
    assert {real_state(g.domain) for g in (small, big)} == {"suspended"}

    restored = client_app.send_task("dormant.restore", args=[rid],
                                    queue=f"dormant.{host_name}").get(timeout=60)
    report = wait_until(lambda: finished(restored["run_id"]), timeout=120,
                        message="the restore finished")
    entries = {e["instance"]: e for e in report["entries"]}
    assert entries[small.uuid]["outcome"] == "resumed"
    refused = entries[big.uuid]
    assert refused["outcome"] == "failed" and refused["error_type"] == "HostMemoryShort"
    assert "not enough memory to resume" in refused["error"]
    assert refused["details"]["needed_bytes"] == 8192 * MiB
    assert refused["details"]["free_bytes"] < 8192 * MiB + refused["details"]["reserve_bytes"]
    assert real_state(small.domain) == "running"
    assert real_state(big.domain) == "suspended"  # never started into swap

    error = _refused(_send(client_app, host_name, "dormant.resume", big.uuid))
    assert type(error).__name__ == "HostMemoryShort"
    assert real_state(big.domain) == "suspended"
