"""The RabbitMQ half of ``make deploy-test``: docker-compose.yml with docker-compose.rabbitmq.yml,
for real, driven from outside the stack.

Run by scripts/deploy-test.sh after tests/deploy/check.py (same images, environment and libvirt
socket, plus RABBITMQ_PASSWORD and the image built from Dockerfile.rabbitmq). What differs from
the Redis stack is checked here, each step failing when its property is broken: every health
check turns healthy (the node included), RabbitMQ is published on loopback only and refuses a
caller without the password; a caller with only Celery and the amqp:// URL pauses, unpauses,
suspends and resumes a real KVM guest, through quorum queues; transitions queued before the
node is SIGKILLed complete afterwards (publisher confirms, quorum queue on its volume); Flower
sees the worker through RabbitMQ; no container log holds a secret; ``down -v`` leaves nothing.

    python -m tests.deploy.check_rabbitmq
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request
import uuid
from typing import Any

import libvirt

from tests.deploy import check
from tests.deploy.check import (
    PAUSED,
    QUEUE,
    RUNNING,
    SAVED,
    TIMINGS,
    WORKER,
    compose,
    container,
    docker,
    expect,
    expect_state,
    logs,
    project_objects,
    step,
    wait_healthy,
)
from tests.support.guests import GuestFactory, TestGuest, remove_leftovers
from tests.support.services import free_port, wait_until

RABBITMQ_PASSWORD = os.environ["RABBITMQ_PASSWORD"]
SERVICES = ["rabbitmq", "redis", WORKER, "beat", "flower"]


def caller(*args: str, password: str | None = RABBITMQ_PASSWORD) -> tuple[int, Any, str]:
    """The client on the stack's RabbitMQ (its results on the stack's Redis)."""
    return check.run_client(args, secret="RABBITMQ_PASSWORD", password=password,
                            ports=["--port", os.environ["REDIS_PORT"],
                                   "--amqp-port", os.environ["RABBITMQ_PORT"]])


def call(*args: str) -> dict[str, Any]:
    return check.call(*args, via=caller)


def transition(task: str, guest: TestGuest, wanted: tuple[Any, ...]) -> None:
    check.transition(task, guest, wanted, via=caller)


def ready(queue: str) -> int:
    """Messages ready in a queue, from the node itself (a passive declare through the
    published port; rabbitmqctl's counts lag by the node's statistics interval, 5 s)."""
    from kombu import Connection

    url = f"amqp://dormant:{RABBITMQ_PASSWORD}@127.0.0.1:{os.environ['RABBITMQ_PORT']}/dormant"
    with Connection(url, connect_timeout=10) as conn:
        channel: Any = conn.default_channel
        return int(channel.queue_declare(queue, passive=True).message_count)


def queues() -> dict[str, dict[str, str]]:
    """rabbitmqctl inside the node's container: dormant's queues, their type and depth (the
    counts as of the node's last statistics tick)."""
    out = docker("exec", container("rabbitmq"), "rabbitmqctl", "-q", "list_queues", "-p",
                 "dormant", "--no-table-headers", "name", "type", "messages_ready",
                 "messages_unacknowledged")
    rows = (line.split("\t") for line in out.splitlines() if line.strip())
    return {name: {"type": kind, "ready": ready, "unacked": unacked}
            for name, kind, ready, unacked in rows}


def flower_json(path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{os.environ['FLOWER_PORT']}{path}")
    token = base64.b64encode(os.environ["FLOWER_BASIC_AUTH"].encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main() -> int:
    check.COMPOSE_FILES.append("docker-compose.rabbitmq.yml")
    for name in ("REDIS_PORT", "FLOWER_PORT", "RABBITMQ_PORT"):
        os.environ[name] = str(free_port())
    for name in ("REDIS_BIND", "FLOWER_BIND", "RABBITMQ_BIND"):
        os.environ.setdefault(name, "127.0.0.1")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("qemu:///system")
    remove_leftovers(conn)
    guests = GuestFactory(conn)
    try:
        with step("compose up on RabbitMQ: every health check turns healthy"):
            start = time.monotonic()
            compose("up", "-d", "--no-build", *SERVICES)
            wait_healthy(["rabbitmq", "redis", WORKER, "flower"], timeout=300)
            TIMINGS["time to a healthy stack on RabbitMQ"] = time.monotonic() - start
            published = docker("port", container("rabbitmq")).strip()
            expect(published.startswith("5672/tcp -> 127.0.0.1:")
                   and len(published.splitlines()) == 1,
                   f"rabbitmq published beyond loopback: {published}")

        a, b = (guests.create("idle") for _ in range(2))

        with step("RabbitMQ refuses a caller without the password or with a wrong one"):
            for password in (None, "wrong-" + uuid.uuid4().hex):
                code, _, err = caller("send", "pause", a.uuid, "--queue", QUEUE,
                                      password=password)
                expect(code == 1, f"RabbitMQ accepted a caller with password {password!r}")
                expect(any(w in err for w in ("ACCESS_REFUSED", "Login was refused",
                                              "AccessRefused")),
                       f"refused, but not for authentication: {err}")
                print(f"    refused: {err[:200]}")
            expect_state(a, RUNNING, "refused pause")

        with step("a caller with only Celery and the amqp:// URL: four transitions, quorum"):
            transition("pause", a, PAUSED)
            transition("unpause", a, RUNNING)
            transition("suspend", a, SAVED)
            transition("resume", a, RUNNING)
            listed = queues()
            expect(listed.get(QUEUE, {}).get("type") == "quorum", f"queues: {listed}")
            expect(listed.get("dormant.control", {}).get("type") == "quorum",
                   f"queues: {listed}")

        with step("transitions queued before the node is SIGKILLed complete (quorum queue)"):
            compose("stop", WORKER)
            queued = [call("send", "pause", a.uuid, "--queue", QUEUE)["task_id"],
                      call("send", "suspend", b.uuid, "--queue", QUEUE)["task_id"]]
            # Publisher confirms: each send returned once the node had the message.
            expect(ready(QUEUE) == 2, "transitions not queued")
            docker("kill", "-s", "KILL", container("rabbitmq"))
            docker("start", container("rabbitmq"))
            wait_healthy(["rabbitmq"], timeout=180)
            expect(ready(QUEUE) == 2, "the queued transitions did not survive the node's crash")
            compose("start", WORKER)
            results = [call("result", task_id, "--wait", "180")["result"] for task_id in queued]
            expect(all(r["outcome"] == "changed" for r in results), f"results: {results}")
            expect_state(a, PAUSED, "queued pause")
            expect_state(b, SAVED, "queued suspend")
            wait_until(lambda: queues()[QUEUE] == {"type": "quorum", "ready": "0",
                                                   "unacked": "0"},
                       timeout=60, interval=2, message="nothing queued or unacknowledged")

        with step("Flower sees the worker through RabbitMQ; health checks healthy again"):
            wait_healthy(["rabbitmq", "redis", WORKER, "flower"], timeout=180)
            workers = wait_until(lambda: check.NODE in flower_json("/api/workers?refresh=1")
                                 and flower_json("/api/workers"), timeout=60, interval=2,
                                 message="Flower lists the worker")
            expect(check.NODE in workers, f"Flower's workers: {list(workers)}")

        with step("no secret in any container log"):
            secrets = {"RABBITMQ_PASSWORD": RABBITMQ_PASSWORD,
                       "REDIS_PASSWORD": check.REDIS_PASSWORD,
                       "Flower password": check.FLOWER_AUTH.split(":", 1)[1]}
            for cid in project_objects()["containers"]:
                text = logs(cid)
                for name, secret in secrets.items():
                    expect(secret not in text, f"{name} in the log of {cid}")
    finally:
        check.tear_down(guests, conn)
    return 0


if __name__ == "__main__":
    check.entry(main)
