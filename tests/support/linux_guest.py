"""Real Linux guests for tests and benchmarks, built from Debian packages only.

The kernel is ``/boot/vmlinuz-*`` (``linux-image-amd64``); the userland is the static busybox of
``busybox-static`` in a tiny initramfs written here, at test time, and cached per machine under
``$LINUX_GUEST_CACHE`` (default ``/var/cache/dormant`` when writable, else ``~/.cache/dormant``),
keyed by its inputs so a changed busybox or init script builds a new one.

The guest boots directly (``<kernel>``/``<initrd>``), has no disk, no network and no balloon,
and writes to a serial console file. Its ``/init`` reads ``dormant.*`` options from the kernel
command line, fills ``fill_mib`` of RAM with incompressible data, then idles or spins, and prints

    DORMANT BOOT <boot id> ...           once, at boot
    DORMANT HB <boot id> <n>             every second (n counts up from 0)
    DORMANT FILLED <boot id> <md5>       once, the checksum of the filled memory
    DORMANT SUM <boot id> <token> <md5>  when the host asks (:meth:`LinuxGuest.checksum`)

The fill is a 16 MiB block from /dev/urandom written over and over (urandom alone is ~10x
slower under TCG): no compressor libvirt offers finds the repeats (their windows are at most
8 MiB) and QEMU skips only zero pages, so every filled MiB is written on save.
``LINUX_GUEST_TYPE=kvm|qemu`` overrides the KVM probe.

so a test can tell that a restored guest is the same boot (same boot id, counters continue) with
the same memory (same checksum). KVM is used where this kernel boots under it, TCG otherwise:
on a nested-PVM host a stock kernel never leaves its decompressor under KVM. The answer is
probed once per machine and cached.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import libvirt

from tests.support.guests import NAME_PREFIX, kvm_usable, remove_domain

PACKAGES = ("linux-image-amd64", "busybox-static")
BUSYBOX = Path("/bin/busybox")
T = TypeVar("T")
KVM_PROBE_SECONDS = 20.0  # a kernel that boots under KVM prints its first line in ~2 s

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
FILL=0; MODE=idle
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    dormant.fill=*) FILL=${arg#*=} ;;
    dormant.mode=*) MODE=${arg#*=} ;;
  esac
done
BOOT=$(cat /proc/sys/kernel/random/boot_id)
echo "DORMANT BOOT $BOOT fill=$FILL mode=$MODE"
# The heartbeat waits with the shell's own "read -t 1" on a FIFO nobody writes: no sleep
# process forked every second, which costs an idle guest under TCG a visible share of CPU.
mkfifo /tick
( exec 4<>/tick; n=0; while :; do echo "DORMANT HB $BOOT $n"; n=$((n+1)); read -t 1 x <&4; done ) &
mkdir -p /fill
mount -t tmpfs -o size=$((FILL+1))m tmpfs /fill
: > /fill/data
T0=$(cut -d' ' -f1 /proc/uptime)
if [ "$FILL" -gt 0 ]; then
  SEED=$FILL; [ "$SEED" -gt 16 ] && SEED=16
  dd if=/dev/urandom of=/seed bs=1M count=$SEED 2>/dev/null
  i=0; while [ $i -lt $FILL ]; do
    dd if=/seed of=/fill/data bs=1M seek=$i count=$((FILL-i)) conv=notrunc 2>/dev/null
    i=$((i+SEED))
  done
  rm -f /seed
fi
T1=$(cut -d' ' -f1 /proc/uptime)
SUM=$(md5sum /fill/data | cut -d' ' -f1)
echo "DORMANT FILLED $BOOT $SUM $T0 $T1 $(cut -d' ' -f1 /proc/uptime)"
[ "$MODE" = spin ] && ( while :; do :; done ) &
# Checksums on request only (a periodic one would make an idle guest busy): the host writes
# "sum <token>" to the second serial port.
exec 3<>/dev/ttyS1
stty -echo <&3 2>/dev/null
while :; do
  if read -r cmd token <&3; then
    [ "$cmd" = sum ] && echo "DORMANT SUM $BOOT $token $(md5sum /fill/data | cut -d' ' -f1)"
  else
    sleep 1
  fi
done
"""


class Unavailable(RuntimeError):
    """The kernel or busybox is missing and cannot be installed here."""


# -- inputs ---------------------------------------------------------------------------------
def _installed(package: str) -> bool:
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                            capture_output=True, text=True, check=False).stdout
    return "install ok installed" in status


def ensure_packages() -> None:
    """Install the kernel and busybox packages when missing (as root), saying so."""
    missing = [p for p in PACKAGES if not _installed(p)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"real Linux guests need the Debian packages {' '.join(missing)}: "
                          f"apt-get install -y {' '.join(missing)} (or run scripts/setup.sh)")
    print(f"[linux_guest] installing {' '.join(missing)} for the real-guest tests", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", *missing]):
        subprocess.run(command, env=env, check=True, capture_output=True)


def kernel() -> Path:
    """The newest Debian kernel in /boot."""
    ensure_packages()
    found = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not found:
        raise Unavailable("no /boot/vmlinuz-* although linux-image-amd64 is installed")
    return found[-1]


def _version_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"[.-]", name)]


def cache_dir() -> Path:
    configured = os.environ.get("LINUX_GUEST_CACHE")
    candidates = [Path(configured)] if configured else [
        Path("/var/cache/dormant"), Path.home() / ".cache" / "dormant"]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    return Path(tempfile.mkdtemp(prefix="dormant-cache-"))


def _newc(name: str, mode: int, data: bytes = b"", *, ino: int, rdev: tuple[int, int] = (0, 0),
          nlink: int = 1) -> bytes:
    """One entry of a "newc" cpio archive (the format the kernel unpacks), mtime 0."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
    header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    pad = b"\0" * (-(len(header) + len(encoded)) % 4)
    return header + encoded + pad + data + b"\0" * (-len(data) % 4)


def build_initramfs(busybox: bytes, init: str = INIT) -> bytes:
    """A reproducible gzip newc initramfs: busybox, /init and a /dev/console node."""
    entries = [("bin", 0o40755, b""), ("dev", 0o40755, b""), ("proc", 0o40755, b""),
               ("sys", 0o40755, b""), ("bin/busybox", 0o100755, busybox),
               ("init", 0o100755, init.encode())]
    archive = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        archive.write(_newc(name, mode, data, ino=ino, nlink=2 if mode & 0o40000 else 1))
    archive.write(_newc("dev/console", 0o20600, ino=len(entries) + 1, rdev=(5, 1)))
    archive.write(_newc("TRAILER!!!", 0, ino=0))
    return gzip.compress(archive.getvalue(), mtime=0)


def initramfs() -> Path:
    """The cached initramfs for this machine's busybox and this init script."""
    ensure_packages()
    busybox = BUSYBOX.read_bytes()
    key = hashlib.sha256(busybox + INIT.encode()).hexdigest()[:16]
    path = cache_dir() / f"initramfs-{key}.cpio.gz"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(build_initramfs(busybox))
        tmp.chmod(0o644)
        tmp.replace(path)
    return path


# -- the domain -----------------------------------------------------------------------------
def memory_for(fill_mib: int) -> int:
    """Guest RAM: the filled tmpfs plus room for the kernel and busybox."""
    return max(160, fill_mib + 160)


def domain_xml(name: str, *, domain_type: str, console: Path, fill_mib: int = 0,
               mode: str = "idle", memory_mib: int | None = None, metadata: str = "") -> str:
    if mode not in {"idle", "spin"}:
        raise ValueError(f"mode must be idle or spin, not {mode!r}")
    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    cmdline = (f"console=ttyS0 quiet loglevel=1 panic=-1 dormant.fill={int(fill_mib)} "
               f"dormant.mode={mode}")
    control = console.with_suffix(".sock")
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib or memory_for(fill_mib)}</memory>
  <vcpu>1</vcpu>
  <metadata>{metadata}</metadata>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel()}</kernel>
    <initrd>{initramfs()}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{control}'/><target port='1'/></serial>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""


LINE = re.compile(r"^DORMANT (BOOT|HB|FILLED|SUM) (\S+)(?: (\S+))?(?: (\S+))?", re.M)


@dataclass
class Console:
    """What the guest printed so far, parsed."""

    boots: list[str] = field(default_factory=list)
    heartbeats: list[tuple[str, int]] = field(default_factory=list)
    filled: list[tuple[str, str]] = field(default_factory=list)
    sums: list[tuple[str, str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Console:
        out = cls()
        for kind, boot, a, b in LINE.findall(text):
            if kind == "BOOT":
                out.boots.append(boot)
            elif kind == "HB" and a.isdigit():
                out.heartbeats.append((boot, int(a)))
            elif kind == "FILLED" and len(a) == 32:
                out.filled.append((boot, a))
            elif kind == "SUM" and len(b) == 32:
                out.sums.append((boot, a, b))
        return out

    @property
    def last_heartbeat(self) -> int:
        return self.heartbeats[-1][1] if self.heartbeats else -1


@dataclass
class LinuxGuest:
    name: str
    uuid: str
    factory: LinuxGuestFactory | None
    console_path: Path
    fill_mib: int
    mode: str

    @property
    def domain(self) -> libvirt.virDomain:
        """A fresh handle on a live connection: the shared libvirtd may restart meanwhile."""
        assert self.factory is not None
        return self.factory.lookup(self.uuid)

    def console(self) -> Console:
        try:
            return Console.parse(self.console_path.read_text(errors="replace"))
        except FileNotFoundError:
            return Console()

    def wait_filled(self, timeout: float = 180) -> tuple[str, str]:
        """(boot id, checksum) once the memory is filled."""
        return _wait(lambda: (c := self.console()).filled and c.filled[0], timeout,
                     f"{self.name} filled {self.fill_mib} MiB", self)

    def wait_heartbeat_after(self, n: int, timeout: float = 60) -> tuple[str, int]:
        return _wait(lambda: next((h for h in self.console().heartbeats if h[1] > n), None),
                     timeout, f"{self.name} heartbeat after {n}", self)

    def checksum(self, timeout: float = 180) -> tuple[str, str]:
        """Ask the guest for the checksum of its filled memory now: (boot id, md5)."""
        token = uuid.uuid4().hex[:12]
        control = self.console_path.with_suffix(".sock")

        def connected() -> socket.socket | None:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(control))
            except OSError:  # QEMU not (yet) listening: restarting after a restore
                sock.close()
                return None
            return sock

        # The connection stays open until the answer: QEMU drops what a client sends just
        # before it hangs up.
        with _wait(connected, 60, f"{self.name} control socket", self) as sock:
            sock.sendall(f"sum {token}\n".encode())
            boot, _, md5 = _wait(
                lambda: next((s for s in self.console().sums if s[1] == token), None),
                timeout, f"{self.name} checksum {token}", self)
        return boot, md5


def _wait(predicate, timeout: float, message: str, guest: LinuxGuest):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            tail = guest.console_path.read_text(errors="replace")[-2000:] \
                if guest.console_path.exists() else "(no console file)"
            raise TimeoutError(f"{message} not seen within {timeout:g}s; console:\n{tail}")
        time.sleep(0.2)


# -- KVM or TCG -----------------------------------------------------------------------------
def _probe_key() -> str:
    qemu = Path(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")
    parts = [str(kernel()), str(kernel().stat().st_size), os.uname().release,
             str(qemu.stat().st_size) if qemu.exists() else ""]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def domain_type(conn: libvirt.virConnect) -> str:
    """``kvm`` where this kernel boots under KVM here, else ``qemu`` (TCG); probed once per
    machine (a guest booted under KVM for up to KVM_PROBE_SECONDS) and cached."""
    override = os.environ.get("LINUX_GUEST_TYPE")
    if override in {"kvm", "qemu"}:
        return override
    if not kvm_usable():
        return "qemu"
    record = cache_dir() / f"kvm-probe-{_probe_key()}.json"
    if record.exists():
        return json.loads(record.read_text())["type"]
    workdir = Path(tempfile.mkdtemp(prefix="dormant-kvm-probe-"))
    name = f"{NAME_PREFIX}kvm-probe-{uuid.uuid4().hex[:8]}-p{os.getpid()}"
    console = workdir / "console.log"
    try:
        domain = conn.createXML(domain_xml(name, domain_type="kvm", console=console), 0)
        probe = LinuxGuest(name, domain.UUIDString(), None, console, 0, "idle")
        try:
            probe.wait_heartbeat_after(-1, timeout=KVM_PROBE_SECONDS)
            answer = "kvm"
        except TimeoutError:
            answer = "qemu"
    except libvirt.libvirtError:
        answer = "qemu"
    finally:
        remove_domain(conn, name)
        shutil.rmtree(workdir, ignore_errors=True)
    record.write_text(json.dumps({"type": answer, "kernel": str(kernel()), "at": time.time()}))
    return answer


def _open(uri: str, timeout: float = 60) -> libvirt.virConnect:
    """A new connection, waiting out a restart of the shared libvirtd by another session."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


class LinuxGuestFactory:
    """Creates persistent Linux guests on ``conn``; :meth:`cleanup` removes every one."""

    def __init__(self, conn: libvirt.virConnect, workdir: Path | None = None) -> None:
        self.conn = conn
        self.uri = conn.getURI()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dormant-linux-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.domain_type = domain_type(conn)
        self.created: list[LinuxGuest] = []

    def create(self, *, fill_mib: int = 0, mode: str = "idle", name: str | None = None,
               metadata: str = "", start: bool = True) -> LinuxGuest:
        name = name or f"{NAME_PREFIX}linux-{mode}-{uuid.uuid4().hex[:8]}-p{os.getpid()}"
        console = self.workdir / f"{name}.console"
        xml = domain_xml(name, domain_type=self.domain_type, console=console,
                         fill_mib=fill_mib, mode=mode, metadata=metadata)
        domain = self._retried(lambda conn: conn.defineXML(xml))
        guest = LinuxGuest(name, domain.UUIDString(), self, console, fill_mib, mode)
        self.created.append(guest)
        if start:
            self._retried(lambda conn: conn.lookupByUUIDString(guest.uuid).create())
        return guest

    def _retried(self, call: Callable[[libvirt.virConnect], T]) -> T:
        """``call`` on the factory's connection; once more on a new one if the connection broke
        (other sessions restart the shared libvirtd on purpose)."""
        try:
            return call(self.conn)
        except libvirt.libvirtError as exc:
            if exc.get_error_domain() not in (libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC):
                raise
        self.conn = _open(self.uri)
        return call(self.conn)

    def lookup(self, uuid_: str) -> libvirt.virDomain:
        return self._retried(lambda conn: conn.lookupByUUIDString(uuid_))

    def cleanup(self) -> None:
        """Remove every guest, on a fresh connection (a shared libvirtd may have restarted)."""
        conn = _open(self.uri)
        try:
            for guest in self.created:
                remove_domain(conn, guest.name)
        finally:
            conn.close()
        self.created.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
