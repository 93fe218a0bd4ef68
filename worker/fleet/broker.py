"""What each broker needs: the one place that knows Redis from RabbitMQ.

dormant runs on either broker; ``DORMANT_BROKER_URL`` chooses (``redis://``, ``rediss://``:
kombu's Redis transport; ``amqp://``, ``amqps://``: RabbitMQ through py-amqp). The state store
and the result backend are Redis either way. Everything that differs is answered here:

============================  ===============================  ================================
concern                       Redis                            RabbitMQ (quorum queues)
============================  ===============================  ================================
queues                        one direct exchange per queue,   quorum queues (``x-queue-type``)
                              named like it                    bound to the topic exchange
                                                               ``dormant``, routing key = name
publishing                    a Redis command                  publisher confirms: a send
                                                               returns once the broker holds it
a countdown (retry backoff)   kept by the worker, far below    native delayed delivery:
                              the visibility timeout           ``celery_delayed_*`` quorum
                                                               queues hold it, not the worker
a dead worker's deliveries    stay in kombu's ``unacked``      requeued by the broker the
                              hash: the host's next worker     moment the worker's channel
                              restores them (recovery.py)      closes: nothing to do
messages nobody holds         swept by the host's worker       cannot happen: a delivery
                              (recovery.restore_orphans)       belongs to an open channel
a message whose channel a     acked (or requeued) through a    already requeued by the broker;
reconnect closed              fresh connection (kombu's QoS)   its redelivery answers
                                                               ``duplicate``: nothing to do
queue depth                   LLEN + the ``unacked`` hash      queue.declare (passive): ready
                                                               messages and consumers
============================  ===============================  ================================

Why the topic exchange has its own name: a plain Celery client that names only the queue
declares a *direct* exchange named like the queue, and RabbitMQ refuses to redeclare an
exchange with another type; Celery's native delayed delivery refuses direct exchanges. So
dormant's queues are bound to both: ``dormant`` (topic, delayed retries come back through it)
and, once such a client has sent, the client's own direct exchange. For the client's queue
declaration (no ``x-queue-type``) to match the quorum queue, dormant's virtual host is created
with ``default_queue_type = quorum`` (docs/production.md "RabbitMQ").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from kombu import Connection, Exchange, Queue

if TYPE_CHECKING:
    from celery import Celery

    from worker.core.settings import Settings

TOPIC_EXCHANGE = "dormant"  # RabbitMQ: every dormant queue is bound to it by its own name
# A message that came back through native delayed delivery carries its delay in front of its
# routing key: 28 binary digits, one per word (kombu.transport.native_delayed_delivery).
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


@dataclass(frozen=True)
class QueueDepth:
    """Messages of one queue: ``ready`` to be delivered, ``unacked`` delivered and not yet
    acknowledged (None where the broker does not say over its protocol), ``consumers``
    (None where unknown)."""

    queue: str
    ready: int
    unacked: int | None
    consumers: int | None

    @property
    def empty(self) -> bool:
        """Nothing waiting and nothing in flight (as far as the broker says)."""
        return self.ready == 0 and not self.unacked


class Broker(Protocol):
    """One broker's answers (see the table above)."""

    name: str
    # True where dormant must put a dead worker's unacknowledged messages back itself (the
    # start-up restore, the reconnect restore and the orphan sweep of worker/fleet/recovery.py).
    restores_unacked: bool

    def queue(self, name: str) -> Queue:
        """How a dormant queue is declared."""

    def celery_settings(self, s: Settings) -> dict[str, Any]:
        """Celery settings this broker needs (merged into celeryconfig)."""

    def client_settings(self, s: Settings, timeout: float) -> dict[str, Any]:
        """Celery settings of dormant's own fail-fast client (the CLI): socket timeouts of
        ``timeout`` seconds, one publish retry."""

    def configure(self, app: Celery) -> None:
        """What Celery settings cannot say (before the app declares any queue)."""

    def prepare_worker(self) -> None:
        """Once per worker process, before it consumes."""

    def retry_queue(self, delivery_info: dict[str, Any] | None) -> str | None:
        """The queue a retry of this delivery goes back to (None: Celery's own choice)."""

    def settle_orphaned(self, app: Celery, delivery_tag: Any, *, requeue: bool) -> bool:
        """Settle a message whose channel a reconnect closed; False if nothing was done."""

    def depth(self, connection: Connection, queue: str) -> QueueDepth:
        """How many messages a queue holds."""

    def delayed(self, connection: Connection) -> QueueDepth | None:
        """Countdowns (retries waiting for their backoff) the broker holds, or None where
        the workers hold them (``celery inspect scheduled`` lists those)."""


class RedisBroker:
    """kombu's Redis transport: delivery state lives in Redis keys that dormant tends."""

    name = "redis"
    restores_unacked = True

    def queue(self, name: str) -> Queue:
        # Each queue has its own direct exchange, as a plain client that names only the
        # queue creates.
        return Queue(name, Exchange(name, type="direct"), routing_key=name)

    def celery_settings(self, s: Settings) -> dict[str, Any]:
        return {
            # Redis redelivers an unacked message after this; retries and countdowns stay far
            # below it. kombu sweeps for expired unacked messages only every interval x
            # throttle seconds (10 x 10 by default): a worker SIGKILLed mid-task would wait up
            # to 100 s past the visibility timeout.
            "broker_transport_options": {
                "visibility_timeout": s.visibility_timeout,
                "unacked_restore_interval": max(1, min(10, s.visibility_timeout // 4)),
                "unacked_restore_throttle": 1,
            },
        }

    def client_settings(self, s: Settings, timeout: float) -> dict[str, Any]:
        return {"broker_transport_options": {
            "visibility_timeout": s.visibility_timeout, "socket_connect_timeout": timeout,
            "socket_timeout": timeout, "max_retries": 1}}

    def configure(self, app: Celery) -> None:
        return None

    def prepare_worker(self) -> None:
        """Don't push the messages this worker is running back to the queue when its broker
        connection closes.

        kombu's Redis QoS does that on every channel close (``restore_at_shutdown``), which on
        a lost connection would run a transition twice at once -- and while Redis is down
        kombu 5.7 crashes the whole worker trying (AttributeError in ``_connparams``).
        Unacked messages stay in Redis instead: acknowledged when their task ends, or restored
        by this host's next worker at start-up (worker/fleet/recovery.py).
        """
        from kombu.transport import redis as kombu_redis

        kombu_redis.QoS.restore_at_shutdown = False

    def retry_queue(self, delivery_info: dict[str, Any] | None) -> str | None:
        return None  # Celery sends a retry back through the exchange it came from

    def settle_orphaned(self, app: Celery, delivery_tag: Any, *, requeue: bool) -> bool:
        """kombu's own QoS calls through a fresh connection: ack = drop the message from the
        unacked index; reject with requeue = ``restore_by_tag`` to the head of its queue."""
        with app.connection_for_write() as connection:
            qos = connection.default_channel.qos  # type: ignore[attr-defined]
            if requeue:
                qos.restore_by_tag(delivery_tag, leftmost=True)
            else:
                qos.ack(delivery_tag)
        return True

    def depth(self, connection: Connection, queue: str) -> QueueDepth:
        import json

        channel = connection.default_channel
        client = channel.client  # type: ignore[attr-defined]
        unacked = 0
        for raw in client.hvals(channel.unacked_key):  # type: ignore[attr-defined]
            try:
                _payload, _exchange, routing_key = json.loads(raw)
            except (TypeError, ValueError):
                continue
            unacked += routing_key == queue
        return QueueDepth(queue, int(client.llen(queue)), unacked, None)

    def delayed(self, connection: Connection) -> QueueDepth | None:
        return None  # kombu's Redis transport: a countdown waits in the worker that took it


class RabbitBroker:
    """RabbitMQ with quorum queues: the broker keeps every delivery until it is acknowledged."""

    name = "rabbitmq"
    restores_unacked = False

    def queue(self, name: str) -> Queue:
        return Queue(name, Exchange(TOPIC_EXCHANGE, type="topic"), routing_key=name,
                     queue_arguments={"x-queue-type": "quorum"})

    def celery_settings(self, s: Settings) -> dict[str, Any]:
        return {
            # A send returns once the broker has the message (written to the quorum queue's
            # log), not when it left the socket.
            "broker_transport_options": {"confirm_publish": True},
            # Quorum queues have no global QoS: prefetch is per consumer (and static).
            "worker_detect_quorum_queues": True,
            # Queues dormant creates by name (another host's, when the control queue forwards)
            # are quorum queues too, bound to the topic exchange (configure below).
            "task_create_missing_queue_type": "quorum",
            # Countdowns (retry backoff) wait in the broker, in quorum queues.
            "broker_native_delayed_delivery_queue_type": "quorum",
        }

    def client_settings(self, s: Settings, timeout: float) -> dict[str, Any]:
        return {"broker_transport_options": {
                    "confirm_publish": True, "connect_timeout": timeout,
                    "read_timeout": timeout, "write_timeout": timeout, "max_retries": 1},
                "task_create_missing_queue_type": "quorum"}

    def configure(self, app: Celery) -> None:
        """Queues created by name get the topic exchange (Celery would give each a direct one
        named like the queue; :attr:`celery.app.amqp.AMQP.autoexchange` is its hook for it)."""
        # (celery-types declares it an Exchange; Celery calls it with the queue's name)
        app.amqp.autoexchange = _topic_exchange  # type: ignore[assignment]

    def prepare_worker(self) -> None:
        return None

    def retry_queue(self, delivery_info: dict[str, Any] | None) -> str | None:
        """The queue the message was routed to: its routing key, without the delay prefix a
        delayed redelivery carries. (Left to itself, Celery 5.7 routes a delayed retry by the
        *default* queue's routing key: a host's retries would go to ``dormant.control``.)"""
        routing_key = (delivery_info or {}).get("routing_key")
        if not routing_key:
            return None
        return _DELAY_PREFIX.sub("", str(routing_key), count=1)

    def settle_orphaned(self, app: Celery, delivery_tag: Any, *, requeue: bool) -> bool:
        # A delivery tag means something only on its own channel, and RabbitMQ requeued every
        # unacknowledged delivery of that channel when it closed.
        return False

    def depth(self, connection: Connection, queue: str) -> QueueDepth:
        """A passive declare on a channel of its own (a queue that does not exist closes the
        channel with 404: nothing was ever sent to it). AMQP does not tell how many
        deliveries are unacknowledged: ``rabbitmqctl list_queues name
        messages_unacknowledged`` or the management plugin's API does."""
        from amqp.exceptions import NotFound

        channel: Any = connection.channel()  # a py-amqp Channel
        try:
            declared = channel.queue_declare(queue, passive=True)
        except NotFound:
            return QueueDepth(queue, 0, None, 0)
        finally:
            if channel.is_open:
                channel.close()
        return QueueDepth(queue, int(declared.message_count), None,
                          int(declared.consumer_count))

    def delayed(self, connection: Connection) -> QueueDepth:
        """Native delayed delivery's queues, one per bit of the countdown, added up."""
        from kombu.transport.native_delayed_delivery import (
            MAX_NUMBER_OF_BITS_TO_USE,
            level_name,
        )

        levels = [self.depth(connection, level_name(n)) for n in range(MAX_NUMBER_OF_BITS_TO_USE)]
        return QueueDepth("celery_delayed_* (countdowns)", sum(d.ready for d in levels), None,
                          None)


def _topic_exchange(_queue: str) -> Exchange:
    return Exchange(TOPIC_EXCHANGE, type="topic")


REDIS = RedisBroker()
RABBITMQ = RabbitBroker()


def for_url(url: str) -> Broker:
    """The broker behind a Celery broker URL, by kombu's own transport (its driver type)."""
    driver = Connection(url).transport.driver_type
    if driver == "amqp":
        return RABBITMQ
    if driver == "redis":
        return REDIS
    raise ValueError(f"unsupported broker transport {driver!r} (dormant runs on Redis or "
                     "RabbitMQ)")


@cache
def current() -> Broker:
    """The broker of this process's settings (``DORMANT_BROKER_URL``)."""
    from worker.core import settings

    return for_url(settings.get().broker_url)
