"""A Redis blip in the middle of reclamation work is retried, not failed.

The worker's state store is a private redis-server of its own (the broker and results stay on
the harness's), stopped while ``dormant.sample`` runs and started again on the same port: the
task must be retried (its result says RETRY with StateStoreUnavailable) and then succeed,
with the samples really stored once Redis is back.
"""

from __future__ import annotations

import pytest

from tests.support.services import RedisServer, free_port, new_workdir, wait_until
from worker.reclaim import sampling

pytestmark = pytest.mark.integration


@pytest.fixture
def state_redis():  # type: ignore[no-untyped-def]
    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-state-"))
    server.start()
    yield server
    server.stop()


def test_a_state_store_blip_during_sample_is_retried_then_succeeds(
        state_redis, start_worker, client_app, host_name):  # type: ignore[no-untyped-def]
    start_worker(pool="threads", concurrency=2, env={
        "DORMANT_STATE_URL": state_redis.url(2),
        "DORMANT_LIBVIRT_URI": "test:///default",  # its demo domain: always one to sample
        "DORMANT_MAX_RETRIES": "20",  # room for the restart below, whatever the jitter
        "DORMANT_RETRY_BACKOFF": "1",
        "DORMANT_RETRY_BACKOFF_MAX": "2",
    })
    state_redis.stop()
    result = client_app.send_task("dormant.sample", queue=f"dormant.{host_name}")
    wait_until(lambda: result.state == "RETRY", timeout=60, interval=0.1,
               message="dormant.sample retried while the state store is down")
    assert "StateStoreUnavailable" in repr(result.info)

    state_redis.start()
    answer = result.get(timeout=60)
    assert answer["host"] == host_name and answer["stored"] >= 1
    stored = sampling.sampled(state_redis.client(2), host_name, since=0)
    assert len(stored) == answer["stored"]
