"""scripts/qemu-conf.sh (run by services.sh before it starts libvirtd) never weakens a libvirt
installation configured before it, while a fresh machine needs no extra step.

Each case runs the real script against a temporary copy (SERVICES_QEMU_CONF); the machine's
own /etc/libvirt/qemu.conf is never read or written. What the machine can give guests is
staged too: a mount table (SERVICES_MOUNTINFO) and an ``unshare`` on PATH that succeeds or
fails, as on a host or in an unprivileged container.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.services import ROOT

SCRIPT = ROOT / "scripts" / "qemu-conf.sh"
OURS = ['user = "root"', 'group = "root"', 'security_driver = "none"']
CONFIGURED = ('# a hypervisor host set up by its administrator\n'
              'user = "libvirt-qemu"\ngroup = "kvm"\nsecurity_driver = "apparmor"\n'
              'max_files = 32768\n')


REMEMBER = "remember_owner = 0"  # written with OURS everywhere
CONTAINER_ONLY = ["cgroup_controllers = [ ]", "namespaces = [ ]"]
# /proc/self/mountinfo lines: a host's cgroup v1 mounts, and an unprivileged container's (ro).
HOST_CGROUPS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n")
CONTAINER_CGROUPS = (
    "83 82 0:47 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755\n"
    "84 83 0:29 /docker/b7ba / /sys/fs/cgroup/cpu ro,nosuid,nodev,noexec,relatime shared:9"
    " - cgroup cgroup rw,cpu\n"
    "85 83 0:30 /docker/b7ba /sys/fs/cgroup/pids ro,nosuid,nodev,noexec,relatime - cgroup"
    " cgroup rw,pids\n")


def machine(tmp_path: Path, *, container: bool) -> dict[str, str]:
    """The environment of a host (cgroups writable, mount namespaces allowed) or of an
    unprivileged container (neither)."""
    mountinfo = tmp_path / ("container" if container else "host") / "mountinfo"
    mountinfo.parent.mkdir()
    mountinfo.write_text(CONTAINER_CGROUPS if container else HOST_CGROUPS)
    unshare = mountinfo.parent / "unshare"
    unshare.write_text(f"#!/bin/sh\nexit {1 if container else 0}\n")
    unshare.chmod(0o755)
    return {"SERVICES_MOUNTINFO": str(mountinfo),
            "PATH": f"{unshare.parent}{os.pathsep}{os.environ['PATH']}"}


def run(conf: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items()
                   if k not in {"CI", "SERVICES_FRESH_LIBVIRT", "SERVICES_QEMU_CONF",
                                "SERVICES_MOUNTINFO"}}
    environment.update(SERVICES_QEMU_CONF=str(conf), **env)
    return subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    conf = tmp_path / "qemu.conf"
    conf.write_text(CONFIGURED)
    os.utime(conf, (1_000_000_000, 1_000_000_000))
    return conf


def test_a_conf_configured_before_is_left_untouched_outside_ci(configured: Path) -> None:
    proc = run(configured)
    assert proc.returncode == 1
    assert configured.read_text() == CONFIGURED
    assert configured.stat().st_mtime == 1_000_000_000
    for line in OURS:  # says exactly what is needed
        assert line in proc.stderr
    assert "left untouched" in proc.stderr


@pytest.mark.parametrize("env", [{"CI": "true"}, {"SERVICES_FRESH_LIBVIRT": "1"}])
def test_ci_or_a_libvirt_installed_in_this_run_is_configured(configured: Path, tmp_path: Path,
                                                             env: dict[str, str]) -> None:
    proc = run(configured, **env, **machine(tmp_path, container=False))
    assert proc.returncode == 0, proc.stderr
    lines = configured.read_text().splitlines()
    assert all(line in lines for line in [*OURS, REMEMBER])
    assert 'user = "libvirt-qemu"' not in lines
    assert "max_files = 32768" in lines  # the rest is kept
    assert not set(CONTAINER_ONLY) & set(lines)


def test_a_fresh_machine_needs_no_extra_step(tmp_path: Path) -> None:
    conf = tmp_path / "libvirt" / "qemu.conf"  # Debian 12's driver package ships none
    host = machine(tmp_path, container=False)
    proc = run(conf, **host)
    assert proc.returncode == 0, proc.stderr
    # A host keeps guest cgroups and QEMU's private /dev: only the owner memory goes.
    assert conf.read_text().splitlines() == [*OURS, REMEMBER]
    again = run(conf, **host)  # re-running set-up changes nothing and stops nothing
    assert again.returncode == 0 and conf.read_text().splitlines() == [*OURS, REMEMBER]


def test_a_fresh_unprivileged_container_gets_what_keeps_guests_startable(
        tmp_path: Path) -> None:
    """No CAP_SYS_ADMIN (no mount namespace) and read-only cgroups: libvirt is told not to use
    what it could not have (each of these stopped a guest's start in such a container)."""
    conf = tmp_path / "qemu.conf"
    container = machine(tmp_path, container=True)
    proc = run(conf, **container)
    assert proc.returncode == 0, proc.stderr
    assert conf.read_text().splitlines() == [*OURS, REMEMBER, *CONTAINER_ONLY]
    again = run(conf, **container)
    assert again.returncode == 0
    assert conf.read_text().splitlines() == [*OURS, REMEMBER, *CONTAINER_ONLY]


def test_the_extras_replace_a_value_the_package_file_sets(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text("#remember_owner = 1\nremember_owner = 1\ncgroup_controllers = [ \"cpu\" ]\n")
    proc = run(conf, CI="true", **machine(tmp_path, container=True))
    assert proc.returncode == 0, proc.stderr
    lines = conf.read_text().splitlines()
    assert lines[:3] == ["#remember_owner = 1", REMEMBER, CONTAINER_ONLY[0]]
    assert lines.count(REMEMBER) == 1 and lines.count(CONTAINER_ONLY[0]) == 1


def test_a_conf_that_already_has_the_settings_is_not_rewritten(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# mine\nuser="root"\ngroup = "root"\nsecurity_driver  =  "none"\n')
    before = conf.read_text()
    # Not even for the extras, in a container: they go only with a write that happens anyway.
    proc = run(conf, **machine(tmp_path, container=True))
    assert proc.returncode == 0 and conf.read_text() == before
