"""scripts/qemu-conf.sh (run by services.sh before it starts libvirtd) never weakens a libvirt
installation configured before it, while a fresh machine needs no extra step.

Each case runs the real script against a temporary copy (SERVICES_QEMU_CONF); the machine's
own /etc/libvirt/qemu.conf is never read or written.
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


def run(conf: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items()
                   if k not in {"CI", "SERVICES_FRESH_LIBVIRT", "SERVICES_QEMU_CONF"}}
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
def test_ci_or_a_libvirt_installed_in_this_run_is_configured(configured: Path,
                                                             env: dict[str, str]) -> None:
    proc = run(configured, **env)
    assert proc.returncode == 0, proc.stderr
    lines = configured.read_text().splitlines()
    assert all(line in lines for line in OURS)
    assert 'user = "libvirt-qemu"' not in lines
    assert "max_files = 32768" in lines  # the rest is kept


def test_a_fresh_machine_needs_no_extra_step(tmp_path: Path) -> None:
    conf = tmp_path / "libvirt" / "qemu.conf"  # Debian 12's driver package ships none
    proc = run(conf)
    assert proc.returncode == 0, proc.stderr
    assert conf.read_text().splitlines() == OURS
    again = run(conf)  # re-running set-up changes nothing and stops nothing
    assert again.returncode == 0 and conf.read_text().splitlines() == OURS


def test_a_conf_that_already_has_the_settings_is_not_rewritten(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# mine\nuser="root"\ngroup = "root"\nsecurity_driver  =  "none"\n')
    before = conf.read_text()
    proc = run(conf)
    assert proc.returncode == 0 and conf.read_text() == before
