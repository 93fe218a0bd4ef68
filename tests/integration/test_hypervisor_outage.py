"""libvirtd stopped while transitions are queued: they retry with backoff and finish once it is
back; past the retry budget they fail with a clear "hypervisor unavailable" error.

libvirtd is really stopped (running QEMU guests survive it) and always started again.
"""

from __future__ import annotations

import pytest

from tests.support.journal import journal, libvirtd_stopped, real_state, revive
from tests.support.services import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PATIENT = {"DORMANT_RETRY_BACKOFF": "1", "DORMANT_RETRY_BACKOFF_MAX": "2",
           "DORMANT_MAX_RETRIES": "30"}
IMPATIENT = {"DORMANT_RETRY_BACKOFF": "1", "DORMANT_RETRY_BACKOFF_MAX": "1",
             "DORMANT_MAX_RETRIES": "2"}


def _retries(redis_server, uuid: str) -> list[dict]:
    return [e for e in journal(redis_server, uuid) if e["outcome"] == "retrying"]


def test_transitions_survive_a_libvirtd_outage_or_fail_clearly_past_the_budget(
        start_worker, client_app, host_name, guests, libvirt_conn, redis_clean):
    patient_host, impatient_host = host_name, f"{host_name}-b"
    start_worker(pool="prefork", concurrency=2, env=PATIENT)
    start_worker(pool="threads", concurrency=2, env=IMPATIENT, host=impatient_host)
    waits, fails = guests.create("idle"), guests.create("idle")
    # Warm up: both workers hold a libvirt connection that the outage will break.
    for host in (patient_host, impatient_host):
        for _ in range(2):
            client_app.send_task("dormant.status", args=[waits.uuid],
                                 queue=f"dormant.{host}").get(timeout=30)

    try:
        with libvirtd_stopped():
            patient = client_app.send_task("dormant.pause", args=[waits.uuid],
                                           kwargs={"request_id": "outage-wait"},
                                           queue=f"dormant.{patient_host}")
            impatient = client_app.send_task("dormant.pause", args=[fails.uuid],
                                             kwargs={"request_id": "outage-fail"},
                                             queue=f"dormant.{impatient_host}")
            wait_until(impatient.ready, timeout=25, message="impatient transition gives up")
            wait_until(lambda: len(_retries(redis_clean, waits.uuid)) >= 3, timeout=25,
                       message="patient transition retries with backoff")
            assert not patient.ready()
    finally:
        revive(libvirt_conn)

    result = patient.get(timeout=60)
    assert result["outcome"] == "changed" and result["attempts"] >= 4, result
    with pytest.raises(Exception) as caught:
        impatient.get(timeout=5)
    assert type(caught.value).__name__ == "HypervisorUnavailable"
    assert "hypervisor unavailable" in str(caught.value)

    # The real guests: the patient one paused once libvirtd was back, the other untouched.
    assert real_state(libvirt_conn.lookupByUUIDString(waits.uuid)) == "paused(user)"
    assert real_state(libvirt_conn.lookupByUUIDString(fails.uuid)) == "running"

    waited = journal(redis_clean, waits.uuid)
    assert [e["outcome"] for e in waited][-1] == "changed"
    retries = _retries(redis_clean, waits.uuid)
    assert all(e["error_type"] == "HypervisorUnavailable" for e in retries)
    assert [e["attempts"] for e in waited] == list(range(1, len(waited) + 1))
    # Backoff: attempts are spread out, not a hot loop (backoff 1 s, cap 2 s, full jitter).
    span = waited[-1]["received_at"] - waited[0]["started_at"]
    assert span >= 1.0, span

    failed = journal(redis_clean, fails.uuid)
    assert [e["outcome"] for e in failed] == ["retrying", "retrying", "failed"]
    assert [e["attempts"] for e in failed] == [1, 2, 3]
    assert failed[-1]["error_type"] == "HypervisorUnavailable"
    assert failed[-1]["error_class"] == "transient"
