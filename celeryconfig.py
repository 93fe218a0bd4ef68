"""Celery settings for dormant, read from DORMANT_* environment variables — nothing else.

Delivery is at-least-once (late acks, reject on worker lost, prefetch 1), so every task is
idempotent; serialisation is JSON only. The broker is Redis or RabbitMQ (quorum queues); what
differs between them is in worker/fleet/broker.py.
"""

from worker.core import settings as _settings
from worker.fleet import broker as _broker
from worker.store.sentinel import SentinelOptions

_s = _settings.get()
_b = _broker.for_url(_s.broker_url)

broker_url = _s.broker_url
result_backend = _s.result_backend
broker_connection_retry_on_startup = True


# rediss:// checks the server's certificate and name (Celery would not, left to itself):
# broker_use_ssl / redis_backend_use_ssl, defined once in worker/core/settings.py.
globals().update(_settings.celery_tls(_s))

# JSON only: a pickle message is refused, not executed.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# At-least-once delivery made safe by idempotent tasks.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# What the broker needs (worker/fleet/broker.py): Redis's visibility timeout and unacked sweep;
# RabbitMQ's quorum queues, publisher confirms and native delayed delivery.
# sentinel:// URLs (worker/store/sentinel.py): the master's name and how to reach the sentinels,
# which Celery and kombu take as transport options rather than from the URL.
_sentinel = SentinelOptions.from_settings(_s)
_broker_settings = _b.celery_settings(_s)
_broker_settings["broker_transport_options"] = {
    **_broker_settings.get("broker_transport_options", {}),
    **_sentinel.transport_options(_s.broker_url)}
globals().update(_broker_settings)
result_backend_transport_options = {"visibility_timeout": _s.visibility_timeout,
                                    **_sentinel.transport_options(_s.result_backend)}
# A result that cannot be stored because Redis is down is stored once it is back (backoff up
# to 10 s, for about ten minutes). Without this Celery gives up at once; on the way out it
# fails to record the failure too, and the request is never finished: its message stays
# unacknowledged and the caller waits for the visibility timeout (seen in `make faults`).
result_backend_always_retry = True
result_backend_max_retries = 60
result_backend_max_sleep_between_retries_ms = 10_000
result_expires = _s.result_ttl
result_extended = True  # Flower and clients see task name and arguments with the result

# The pool is chosen on the command line: scripts/run.sh and docker-compose.yml use
# `--pool threads`, since tasks wait on libvirtd rather than the CPU (one libvirt connection
# per thread gives parallel saves, and one process keeps one metrics registry).
worker_hijack_root_logger = False
if _s.concurrency:  # DORMANT_CONCURRENCY; a -c on the command line still wins
    worker_concurrency = _s.concurrency

# Flower sees queued, started, retried, failed and succeeded tasks.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# Queues: this host's own and the fleet-wide control queue, declared as the broker needs.
task_queues = tuple(_b.queue(name) for name in (_s.host_queue, _settings.CONTROL_QUEUE))
task_default_queue = _settings.CONTROL_QUEUE
task_create_missing_queues = True

timezone = _s.reclaim_timezone
enable_utc = True
