"""A caller outside the compose stack: Celery and the Redis password, nothing of dormant.

This is docs/production.md's contract ("Enqueueing work from other services") as another service
would write it: tasks addressed by name with JSON arguments, sent to the host's queue. The
checker runs it as its own process (``python -I tests/deploy/client.py``), the password in
``REDIS_PASSWORD`` (unset: none is sent), and it fails if anything imported dormant.

    client.py --port P [--amqp-port A] send TASK INSTANCE --queue Q [--request-id ID] [--wait S]
    client.py --port P [--amqp-port A] result TASK_ID [--wait S]

With ``--amqp-port`` the broker is the stack's RabbitMQ (docker-compose.rabbitmq.yml): user and
virtual host ``dormant``, the password in ``RABBITMQ_PASSWORD``; the results stay in Redis.

prints one JSON object, ``{"task_id": ..., "result": ...}``; an error exits 1 with it on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from celery import Celery

DORMANT_PACKAGES = {"worker", "tasks", "celeryconfig"}


def app(port: int, password: str | None, *, results: bool = True,
        amqp_port: int | None = None, amqp_password: str | None = None) -> Celery:
    """A Celery app on the stack's published Redis (loopback only); no password = none sent.
    With ``amqp_port``, on the stack's RabbitMQ (publisher confirms: a send returns once the
    broker holds the message)."""
    auth = f":{password}@" if password is not None else ""
    broker = f"redis://{auth}127.0.0.1:{port}/0"
    if amqp_port is not None:
        broker = f"amqp://dormant:{amqp_password or ''}@127.0.0.1:{amqp_port}/dormant"
    caller = Celery(broker=broker,
                    backend=f"redis://{auth}127.0.0.1:{port}/1" if results else None)
    caller.conf.update(task_serializer="json", accept_content=["json"],
                       result_accept_content=["json"], task_send_sent_event=True,
                       broker_connection_retry_on_startup=False,
                       broker_transport_options={"max_retries": 1, "confirm_publish": True}
                       if amqp_port is not None else {"max_retries": 1},
                       redis_socket_connect_timeout=5, redis_socket_timeout=30)
    return caller


def send(caller: Celery, task: str, instance: str, queue: str, **kwargs: Any) -> Any:
    """Queue one transition; fail at once (no publish retries) when Redis refuses it."""
    return caller.send_task(f"dormant.{task}", args=[instance], kwargs=kwargs, queue=queue,
                            retry=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-port", type=int, default=None)
    commands = parser.add_subparsers(dest="command", required=True)
    sending = commands.add_parser("send")
    sending.add_argument("task")
    sending.add_argument("instance")
    sending.add_argument("--queue", required=True)
    sending.add_argument("--request-id")
    sending.add_argument("--wait", type=float, default=0.0, help="seconds; 0 = do not wait")
    reading = commands.add_parser("result")
    reading.add_argument("task_id")
    reading.add_argument("--wait", type=float, default=120.0)
    args = parser.parse_args(argv)

    password = os.environ.get("REDIS_PASSWORD")
    caller = app(args.port, password, results=args.command == "result" or args.wait > 0,
                 amqp_port=args.amqp_port, amqp_password=os.environ.get("RABBITMQ_PASSWORD"))
    try:
        if args.command == "send":
            extra = {"request_id": args.request_id} if args.request_id else {}
            sent = send(caller, args.task, args.instance, args.queue, **extra)
            out: dict[str, Any] = {"task_id": sent.id}
            if args.wait:
                out["result"] = sent.get(timeout=args.wait)
        else:
            out = {"task_id": args.task_id,
                   "result": caller.AsyncResult(args.task_id).get(timeout=args.wait)}
    except Exception as exc:  # refused, timed out, failed: the checker reads why
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    leaked = sorted(DORMANT_PACKAGES & set(sys.modules))
    if leaked:
        print(f"error: the caller imported dormant: {leaked}", file=sys.stderr)
        return 4
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
