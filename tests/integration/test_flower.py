"""Operators watch transitions in Flower: a real Flower process, a real worker, real events.

Flower only records events while it runs, so it starts first; the test then waits until a
ping task shows up in Flower (its event receiver is live) before sending transitions.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import ROOT, free_port, stop_process, wait_until
from tests.support.services import test_env as dormant_environment

pytestmark = [pytest.mark.integration, pytest.mark.both_brokers]

USER, PASSWORD = "ops", "flower-test-secret"


class Flower:
    def __init__(self, port: int, env: dict[str, str], log_path: Path) -> None:
        self.port, self.log_path = port, log_path
        command = [sys.executable, "-m", "celery", "-A", "tasks", "flower",
                   f"--port={port}", "--address=127.0.0.1"]
        self.log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, *, auth: tuple[str, str] | None = (USER, PASSWORD),
            post: dict[str, Any] | None = None) -> Any:
        """(status, body): JSON decoded when it is JSON. With ``post``, a JSON POST."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=None if post is None else json.dumps(post).encode(),
            headers={} if post is None else {"Content-Type": "application/json"})
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status, body = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        with suppress(ValueError):
            return status, json.loads(body)
        return status, body

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"flower exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            return self.get("/healthcheck", auth=None) == (200, "OK")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process)
        self.log_file.close()


@pytest.fixture
def flower(redis_clean, broker_url, host_name, tmp_path) -> Iterator[Flower]:
    env = dormant_environment(redis_clean, host_name, DORMANT_LIBVIRT_URI="test:///default",
                              DORMANT_BROKER_URL=broker_url,
                              FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    server = Flower(free_port(), env, tmp_path / "flower.log")
    try:
        wait_until(server.healthy, timeout=30, interval=0.2, message="flower /healthcheck")
        yield server
    finally:
        server.stop()


def _seen_by_flower(flower: Flower, task_id: str, state: str) -> dict[str, Any] | None:
    status, info = flower.get(f"/api/task/info/{task_id}")
    if status == 200 and isinstance(info, dict) and info.get("state") == state:
        return info
    return None


def test_flower_shows_transitions_with_credentials_and_refuses_without(
        flower, start_worker, client_app, host_name, redis_clean, broker_url):
    start_worker(pool="threads", concurrency=4,
                 env={"DORMANT_LIBVIRT_URI": "test:///default"})
    # A second host whose libvirtd is unreachable: its transitions are retried, then fail.
    down_host = f"{host_name}-down"
    start_worker(pool="threads", concurrency=2, host=down_host,
                 env={"DORMANT_LIBVIRT_URI": "qemu+unix:///system?socket=/nonexistent/sock",
                      "DORMANT_MAX_RETRIES": "1", "DORMANT_RETRY_BACKOFF": "1"})
    queue = f"dormant.{host_name}"

    def flower_receives_events() -> bool:
        ping = client_app.send_task("dormant.ping", queue=queue)
        ping.get(timeout=10)
        return _poll(lambda: _seen_by_flower(flower, ping.id, "SUCCESS"), seconds=2) is not None

    wait_until(flower_receives_events, timeout=45, interval=0.1,
               message="flower receives task events")

    paused = client_app.send_task("dormant.pause", args=["dormant-demo-web"],
                                  kwargs={"request_id": "flower-1"}, queue=queue)
    assert paused.get(timeout=30)["outcome"] == "changed"
    bad = client_app.send_task("dormant.suspend", args=["no such guest?"], queue=queue)
    with pytest.raises(Exception, match="malformed instance"):
        bad.get(timeout=30)
    retried = client_app.send_task("dormant.resume", args=["dormant-demo-cache"],
                                   queue=f"dormant.{down_host}")
    with pytest.raises(Exception, match=r"libvirt|hypervisor|connect"):
        retried.get(timeout=60)

    info = wait_until(lambda: _seen_by_flower(flower, paused.id, "SUCCESS"), timeout=20,
                      message="pause succeeded in flower")
    assert info["name"] == "dormant.pause"
    assert "dormant-demo-web" in info["args"]
    assert "flower-1" in info["kwargs"]
    assert info["worker"].startswith("w")
    assert '"changed"' in info["result"] or "'changed'" in info["result"]

    failed = wait_until(lambda: _seen_by_flower(flower, bad.id, "FAILURE"), timeout=20,
                        message="bad suspend failed in flower")
    assert failed["name"] == "dormant.suspend"
    assert "InvalidInput" in failed["exception"]

    gave_up = wait_until(lambda: _seen_by_flower(flower, retried.id, "FAILURE"), timeout=20,
                         message="retried resume failed in flower")
    assert gave_up["name"] == "dormant.resume"
    assert gave_up["retries"] == 1  # the retried delivery was seen, then the final failure
    assert "HypervisorUnavailable" in gave_up["exception"]

    # A task sent by dormant's own client (the CLI's) shows up as queued at once: here to a
    # host queue no worker consumes, so only the task-sent event can tell Flower about it.
    from worker.api.client import Client
    from worker.core import settings as settings_mod

    own = settings_mod.load(dormant_environment(redis_clean, host_name,
                                                DORMANT_BROKER_URL=broker_url))
    with Client.from_settings(own) as client:
        waiting = client.app.send_task("dormant.ping", queue="dormant.nobody-consumes-this")
    queued = wait_until(lambda: _seen_by_flower(flower, waiting.id, "PENDING"), timeout=20,
                        message="client-sent task queued in flower")
    assert queued["name"] == "dormant.ping" and queued["sent"]

    status, listing = flower.get("/api/tasks?taskname=dormant.pause")
    assert status == 200
    assert listing[paused.id]["state"] == "SUCCESS"

    # Flower's REST API as a caller: a task sent by name to the host queue.
    status, sent = flower.get("/api/task/async-apply/dormant.unpause",
                              post={"args": ["dormant-demo-web"], "queue": queue})
    assert status == 200, sent
    unpaused = wait_until(lambda: _seen_by_flower(flower, sent["task-id"], "SUCCESS"),
                          timeout=30, message="unpause sent through Flower's API succeeded")
    assert "'changed'" in unpaused["result"] or '"changed"' in unpaused["result"]

    # The same API without credentials, or with wrong ones, answers 401 and leaks nothing.
    for auth in (None, (USER, "wrong")):
        status, body = flower.get("/api/tasks", auth=auth)
        assert status == 401
        assert paused.id not in str(body)
        status, _ = flower.get(f"/api/task/info/{paused.id}", auth=auth)
        assert status == 401
    assert flower.get("/healthcheck", auth=None) == (200, "OK")


def _poll(predicate, *, seconds: float):
    try:
        return wait_until(predicate, timeout=seconds, interval=0.1, message="poll")
    except TimeoutError:
        return None
