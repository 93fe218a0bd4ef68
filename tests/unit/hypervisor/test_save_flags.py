"""The save path's flags: O_DIRECT images by default, switchable, never on the test driver."""

from __future__ import annotations

import libvirt

from worker.core.settings import load
from worker.hypervisor import Hypervisor


def test_saves_and_restores_bypass_the_page_cache_by_default() -> None:
    hv = Hypervisor("qemu:///system")  # no connection is made
    assert hv.save_flags == libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE
    assert hv.restore_flags == libvirt.VIR_DOMAIN_START_BYPASS_CACHE
    assert load({}).save_bypass_cache is True


def test_the_setting_turns_it_off() -> None:
    assert load({"DORMANT_SAVE_BYPASS_CACHE": "false"}).save_bypass_cache is False
    hv = Hypervisor("qemu:///system", bypass_cache=False)
    assert hv.save_flags == 0 and hv.restore_flags == 0


def test_the_test_driver_gets_no_flag_it_would_reject() -> None:
    hv = Hypervisor("test:///default")
    assert hv.save_flags == 0 and hv.restore_flags == 0
    guest = hv.guest("test")
    guest.save_memory_to_disk()
    guest.restore()
    assert guest.observe().state.value == "running"
    hv.close()
