"""Routing: a transition sent to ``dormant.control`` runs on the host serving the instance, found
in the registry that workers publish; the client helper sends straight to that host's queue."""

from __future__ import annotations

import pytest

from tests.support.journal import STATE_DB, journal, real_state
from tests.support.services import wait_until
from worker.api.client import Client
from worker.core.settings import Settings
from worker.store import keys

pytestmark = pytest.mark.integration


def test_control_queue_forwards_to_the_host_serving_the_instance(
        start_worker, client_app, host_name, guests, redis_clean):
    guest = guests.create("idle")  # before the workers start: they publish it at once
    router_host = f"{host_name}-router"
    # The KVM host consumes only its own queue; the router (a fake hypervisor) only control.
    kvm = start_worker(pool="threads", concurrency=2, args=["-Q", f"dormant.{host_name}"])
    router = start_worker(pool="prefork", concurrency=1, host=router_host,
                          env={"DORMANT_LIBVIRT_URI": "test:///default"},
                          args=["-Q", "dormant.control"])
    state = redis_clean.client(STATE_DB)
    wait_until(lambda: state.get(keys.where(guest.uuid)) == host_name, timeout=15,
               message="the KVM worker publishes the guest")
    assert state.get(keys.name(guest.name)) == guest.uuid

    by_uuid = client_app.send_task("dormant.pause", args=[guest.uuid], queue="dormant.control")
    result = by_uuid.get(timeout=30)
    assert result["host"] == host_name and result["outcome"] == "changed"
    assert real_state(guest.domain) == "paused(user)"
    assert f"dormant.pause[{by_uuid.id}]" in router.log()  # the router took it first
    assert f"dormant.pause[{by_uuid.id}]" in kvm.log()  # and the KVM host ran it

    by_name = client_app.send_task("dormant.unpause", args=[guest.name], queue="dormant.control")
    result = by_name.get(timeout=30)
    assert result["host"] == host_name and result["instance"] == guest.uuid
    assert real_state(guest.domain) == "running"
    assert {e["host"] for e in journal(redis_clean, guest.uuid)} == {host_name}

    # An instance no host serves is answered by the control worker itself, clearly.
    with pytest.raises(Exception) as caught:
        client_app.send_task("dormant.pause", args=["nobody-serves-this"],
                             queue="dormant.control").get(timeout=30)
    assert type(caught.value).__name__ == "UnknownInstance"
    assert "nobody-serves-this" in str(caught.value)


def test_client_helper_finds_the_host_from_the_registry(
        start_worker, host_name, guests, redis_clean):
    guest = guests.create("idle")
    start_worker(pool="threads", concurrency=2, args=["-Q", f"dormant.{host_name}"])
    settings = Settings(broker_url=redis_clean.url(0), result_backend=redis_clean.url(1),
                        state_url=redis_clean.url(2), host="the-caller")
    with Client.from_settings(settings) as client:
        wait_until(lambda: client.locate(guest.name)[1] == host_name, timeout=15,
                   message="registry knows the guest")
        assert client.queue_for(guest.name) == f"dormant.{host_name}"
        result = client.wait(client.pause(guest.name, request_id="via-client"), timeout=30)
    assert result["host"] == host_name and result["request_id"] == "via-client"
    assert real_state(guest.domain) == "paused(user)"
