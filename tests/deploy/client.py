"""A caller outside the compose stack: Celery and the Redis password, nothing of dormant.

This is the README's contract ("Enqueueing work from other services") as another service
would write it: tasks addressed by name with JSON arguments, sent to the host's queue. The
checker asserts that dormant's own packages were never imported in its process.
"""

from __future__ import annotations

from typing import Any

from celery import Celery


def app(port: int, password: str | None, *, results: bool = True) -> Celery:
    """A Celery app on the stack's published Redis (loopback only); no password = none sent."""
    auth = f":{password}@" if password is not None else ""
    caller = Celery(broker=f"redis://{auth}127.0.0.1:{port}/0",
                    backend=f"redis://{auth}127.0.0.1:{port}/1" if results else None)
    caller.conf.update(task_serializer="json", accept_content=["json"],
                       result_accept_content=["json"], task_send_sent_event=True,
                       broker_connection_retry_on_startup=False,
                       broker_transport_options={"max_retries": 1},
                       redis_socket_connect_timeout=5, redis_socket_timeout=30)
    return caller


def send(caller: Celery, task: str, instance: str, queue: str, **kwargs: Any) -> Any:
    """Queue one transition; fail at once (no publish retries) when Redis refuses it."""
    return caller.send_task(f"dormant.{task}", args=[instance], kwargs=kwargs, queue=queue,
                            retry=False)
