"""A small real filesystem standing in for libvirt's save directory, for one test's guests only.

libvirtd writes a guest's managed-save image to ``/var/lib/libvirt/qemu/save/<name>.save``
and libvirt 9.0 has no setting for that directory. Mounting a small filesystem over the whole
directory would hide every other session's images on this shared machine while it is
mounted (and theirs would land in ours, to vanish at the unmount). Instead:

* a loop-mounted ext4 of a few hundred MiB (no blocks reserved for root: what ``statvfs``
  says is free is what a writer gets) at a private mount point;
* for each of the test's guests, and only those, its image path in the real directory is a
  symlink to a file on that filesystem (:meth:`SaveDirectory.route`). libvirtd writes, reads
  and deletes the image through it as it would in the directory itself, and a full
  filesystem fails its write with ENOSPC, exactly as a full save directory does;
* the worker under test gets ``DORMANT_SAVE_DIR`` = the mount point, so the room it reads is
  that filesystem's.

Where libvirt deletes an image (after a restore, or after a failed save of a file it
created) it removes the symlink: a background sweep then deletes the file the link pointed
to within ~0.1 s, which is when a real deletion would have freed the space.

Everything is undone by :meth:`close` (the fixture calls it even when a test fails): the
routed guests removed (undefining one whose image is gone would fail), links removed, the
filesystem unmounted, the image file deleted. Needs root (CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import libvirt

from tests.support.guests import remove_domain

LIBVIRT_SAVE_DIR = Path("/var/lib/libvirt/qemu/save")
PREFIX = "dormant-savedir-"
MiB = 2**20


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class SaveDirectory:
    """``size_mib`` of ext4, mounted until :meth:`close`."""

    def __init__(self, size_mib: int) -> None:
        self.size_mib = size_mib
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}p{os.getpid()}-"))
        self.image = self.workdir / "fs.img"
        self.path = self.workdir / "save"  # the mount point: DORMANT_SAVE_DIR
        self.links: dict[str, Path] = {}  # guest name -> its image path in libvirt's directory
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.mounted = False

    def open(self) -> SaveDirectory:
        self.path.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(self.size_mib * MiB)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(self.image))
        _run("mount", "-o", "loop", str(self.image), str(self.path))
        self.mounted = True
        os.chmod(self.path, 0o755)
        self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                         name="save-dir-sweeper")
        self._sweeper.start()
        return self

    def route(self, name: str) -> Path:
        """Send guest ``name``'s managed-save image to this filesystem; its path there."""
        link = LIBVIRT_SAVE_DIR / f"{name}.save"
        target = self.path / f"{name}.save"
        if link.is_symlink() or link.exists():
            raise RuntimeError(f"{link} exists already")
        link.symlink_to(target)
        self.links[name] = link
        return target

    def image_of(self, name: str) -> Path:
        return self.path / f"{name}.save"

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, *, leave: int, name: str = "filler") -> Path:
        """Someone else takes the space: a file that leaves at most ``leave`` bytes free
        (allocated at once with fallocate, then topped up 4 KiB at a time)."""
        filler = self.path / name
        first = self.free() - leave - MiB  # ext4 needs a little for the file's own extents
        if first > 0:
            _run("fallocate", "-l", str(first), str(filler))
        with open(filler, "ab") as f:
            while self.free() > leave:
                try:
                    f.write(b"\xff" * 4096)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:  # ENOSPC: nothing left to take
                    break
        return filler

    def sweep(self) -> None:
        """Delete the files whose link libvirt has removed (see the module docstring)."""
        for name, link in list(self.links.items()):
            target = self.image_of(name)
            if not link.is_symlink() and target.exists():
                target.unlink(missing_ok=True)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError):
                self.sweep()

    def close(self, conn: libvirt.virConnect) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(5)
        for name in self.links:
            remove_domain(conn, name)
        for link in self.links.values():
            if link.is_symlink():
                link.unlink(missing_ok=True)
        if self.mounted:
            for attempt in (["umount", str(self.path)], ["umount", "-l", str(self.path)]):
                if subprocess.run(attempt, capture_output=True, check=False).returncode == 0:
                    break
            self.mounted = False
        shutil.rmtree(self.workdir, ignore_errors=True)


def remove_leftovers() -> None:
    """Unmount and delete the save directories of earlier sessions that died (by pid)."""
    for link in LIBVIRT_SAVE_DIR.glob("*.save"):
        if link.is_symlink() and _dead(Path(os.readlink(link)).parent.parent):
            link.unlink(missing_ok=True)
    for workdir in Path(tempfile.gettempdir()).glob(f"{PREFIX}p*-*"):
        if not _dead(workdir):
            continue
        mount = workdir / "save"
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _dead(workdir: Path) -> bool:
    """Whether ``workdir`` is a save directory of a process that no longer runs."""
    if not workdir.name.startswith(f"{PREFIX}p"):
        return False
    pid = workdir.name[len(PREFIX) + 1:].split("-", 1)[0]
    return pid.isdigit() and not Path(f"/proc/{pid}").exists()
