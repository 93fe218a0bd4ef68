"""A real worker writes JSON lines when DORMANT_LOG_JSON=true and never logs the broker password.

The worker talks to its own password-protected redis-server (the harness's shared one has no
password) and logs at debug level, where libraries are most talkative about connections.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.support.services import RedisServer, free_port, new_workdir, wait_until

pytestmark = pytest.mark.integration

SECRET = "s3cret-broker-pw-7f1c"


@pytest.fixture
def locked_redis():
    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-redis-pw-"),
                         password=SECRET)
    try:
        server.start()
    except (FileNotFoundError, TimeoutError) as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


def test_worker_logs_json_lines_without_the_broker_password(locked_redis, start_worker,
                                                            host_name):
    env = {
        "DORMANT_BROKER_URL": locked_redis.url(0),
        "DORMANT_RESULT_BACKEND": locked_redis.url(1),
        "DORMANT_STATE_URL": locked_redis.url(2),
        "DORMANT_LIBVIRT_URI": "test:///default",
        "DORMANT_LOG_JSON": "true",
    }
    worker = start_worker(pool="threads", concurrency=2, env=env, args=["-l", "debug"],
                          wait=False)
    client = locked_redis.celery_client()
    try:
        def ready() -> bool:
            if not worker.alive():
                raise RuntimeError(f"worker exited:\n{worker.log()[-3000:]}")
            return bool(client.control.ping(destination=[worker.nodename], timeout=0.5))

        wait_until(ready, timeout=60, interval=0.2, message="worker ping")
        result = client.send_task("dormant.pause", args=["dormant-demo-db"],
                                  kwargs={"request_id": "log-1"},
                                  queue=f"dormant.{host_name}").get(timeout=30)
    finally:
        client.close()
    assert result["outcome"] == "changed"

    def transition_line() -> dict | None:
        for line in worker.log().splitlines():
            if line.startswith("{") and '"dormant.transition"' in line:
                return json.loads(line)
        return None

    doc = wait_until(transition_line, timeout=10, message="transition log line")
    assert doc["level"] == "info"
    assert doc["instance"] == result["instance"]
    assert doc["request_id"] == "log-1"
    assert doc["task_id"] == result["task_id"]
    assert doc["host"] == host_name
    assert doc["attempts"] == 1
    assert doc["outcome"] == "changed"

    # Celery's own records (task received/succeeded) go through the same JSON formatter, and
    # no record is left in Celery's plain "[2026-01-01 00:00:00,000: INFO/...]" format. The
    # "succeeded" record may be written just after the client got the result: wait for it.
    def loggers() -> set[str]:
        return {json.loads(line)["logger"] for line in worker.log().splitlines()
                if line.startswith("{")}

    wanted = {"celery.worker.strategy", "celery.app.trace", "dormant.transition"}
    wait_until(lambda: wanted <= loggers(), timeout=10, message=f"log records of {wanted}")
    log = worker.log()
    assert not re.search(r"^\[\d{4}-\d\d-\d\d ", log, re.M)
    assert SECRET not in log
