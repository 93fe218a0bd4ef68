"""Safe defaults: a worker started without DORMANT_LIBVIRT_URI drives this host's real
libvirtd (qemu:///system), never libvirt's fake test driver, and says so at start."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_a_worker_without_a_libvirt_uri_sees_this_hosts_real_guests(
        start_worker, client_app, host_name, guests):
    worker = start_worker(pool="threads", concurrency=1, env={"DORMANT_LIBVIRT_URI": None})
    assert "DORMANT_LIBVIRT_URI" not in worker.env
    guest = guests.create("idle")
    status = client_app.send_task("dormant.status", args=[guest.uuid],
                                  queue=f"dormant.{host_name}").get(timeout=30)
    assert status["name"] == guest.name and status["state"] == "running"
    assert f"dormant: host {host_name} drives libvirt qemu:///system" in worker.log()
