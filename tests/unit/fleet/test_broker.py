"""What each broker needs (worker/fleet/broker.py), without a broker: the choice by URL, the
declarations Celery gets, and where a retry goes back to."""

from __future__ import annotations

import pytest
from celery import Celery
from kombu.transport.native_delayed_delivery import calculate_routing_key

from worker.core.settings import Settings
from worker.fleet import broker


@pytest.mark.parametrize(("url", "kind"), [
    ("redis://127.0.0.1:6379/0", "redis"),
    ("rediss://:pw@redis.internal:6380/0", "redis"),
    ("amqp://dormant:pw@rabbit.internal:5672/dormant", "rabbitmq"),
    ("amqps://dormant:pw@rabbit.internal:5671/dormant", "rabbitmq"),
    ("pyamqp://guest:guest@127.0.0.1//", "rabbitmq"),
])
def test_the_broker_is_chosen_by_kombus_transport_of_the_url(url: str, kind: str) -> None:
    assert broker.for_url(url).name == kind


def test_a_transport_dormant_does_not_run_on_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'memory'"):
        broker.for_url("memory://")


def test_rabbitmq_queues_are_quorum_queues_on_the_topic_exchange() -> None:
    queue = broker.RABBITMQ.queue("dormant.kvm1")
    assert queue.queue_arguments == {"x-queue-type": "quorum"}
    assert queue.durable and not queue.auto_delete
    assert (queue.exchange.name, queue.exchange.type) == ("dormant", "topic")
    assert queue.routing_key == "dormant.kvm1"


def test_redis_queues_keep_a_direct_exchange_named_like_the_queue() -> None:
    queue = broker.REDIS.queue("dormant.kvm1")
    assert (queue.exchange.name, queue.exchange.type) == ("dormant.kvm1", "direct")
    assert not queue.queue_arguments


def test_rabbitmq_settings_confirm_publishes_and_delay_in_quorum_queues() -> None:
    conf = broker.RABBITMQ.celery_settings(Settings(host="kvm1"))
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["worker_detect_quorum_queues"] is True
    assert conf["task_create_missing_queue_type"] == "quorum"
    assert conf["broker_native_delayed_delivery_queue_type"] == "quorum"
    assert "visibility_timeout" not in str(conf)  # a Redis notion


def test_redis_settings_keep_the_visibility_timeout_and_the_unacked_sweep() -> None:
    options = broker.REDIS.celery_settings(Settings(host="kvm1",
                                                    visibility_timeout=40))["broker_transport_options"]
    assert options == {"visibility_timeout": 40, "unacked_restore_interval": 10,
                       "unacked_restore_throttle": 1}


def test_a_queue_created_by_name_on_rabbitmq_is_quorum_and_topic_routed() -> None:
    """The control worker forwards to another host's queue by name: Celery creates it."""
    app = Celery("t", broker="amqp://127.0.0.1//", set_as_current=False)
    app.conf.update(broker.RABBITMQ.celery_settings(Settings(host="kvm1")))
    broker.RABBITMQ.configure(app)
    created = app.amqp.queues["dormant.kvm9"]
    assert created.queue_arguments == {"x-queue-type": "quorum"}
    assert (created.exchange.name, created.exchange.type) == ("dormant", "topic")
    assert created.routing_key == "dormant.kvm9"


@pytest.mark.parametrize("countdown", [1, 7, 60, 3600])
def test_a_retry_goes_back_to_the_queue_a_delayed_message_came_from(countdown: int) -> None:
    delayed = calculate_routing_key(countdown, "dormant.kvm1")  # what the broker delivers
    assert delayed != "dormant.kvm1"
    assert broker.RABBITMQ.retry_queue({"exchange": "dormant", "routing_key": delayed}) == \
        "dormant.kvm1"
    assert broker.RABBITMQ.retry_queue({"routing_key": "dormant.kvm1"}) == "dormant.kvm1"
    assert broker.RABBITMQ.retry_queue({}) is None
    assert broker.REDIS.retry_queue({"routing_key": "dormant.kvm1"}) is None  # Celery's own


def test_only_redis_needs_dormant_to_restore_a_dead_workers_messages() -> None:
    assert broker.REDIS.restores_unacked
    assert not broker.RABBITMQ.restores_unacked
    app = Celery("t", broker="amqp://127.0.0.1//", set_as_current=False)
    # RabbitMQ requeued the delivery when its channel closed: nothing to settle, no I/O.
    assert broker.RABBITMQ.settle_orphaned(app, 7, requeue=False) is False


def test_queue_depth_is_empty_only_with_nothing_ready_or_in_flight() -> None:
    assert broker.QueueDepth("q", 0, 0, None).empty
    assert broker.QueueDepth("q", 0, None, 1).empty  # RabbitMQ: unacked not known over AMQP
    assert not broker.QueueDepth("q", 1, 0, None).empty
    assert not broker.QueueDepth("q", 0, 2, None).empty
