"""The Celery application: configuration, task modules, beat schedule and worker hooks."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps
from celery.schedules import crontab
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    worker_init,
    worker_ready,
    worker_shutdown,
)

from tasks.delivery import hold_deliveries_while_full
from tasks.timers import (
    expire_deadlines_in_background,
    in_background,
    refresh_registry_in_background,
    resend_unanswered_in_background,
)
from worker.api import contract
from worker.core import logs, metrics
from worker.core import settings as settings_mod
from worker.fleet import broker

if TYPE_CHECKING:
    from worker.drift.watcher import Watcher

app = Celery("dormant", include=["tasks.transitions", "tasks.housekeeping", "tasks.reclaim"])
app.config_from_object("celeryconfig")

_s = settings_mod.get()
broker.current().configure(app)  # before any queue is declared (worker/fleet/broker.py)
# Auto-unpause deadlines are checked by a worker timer (DeadlineStep), not a beat task.
app.conf.beat_schedule = {
    # Reclamation: the control worker fans out to every registered host's queue.
    "sample-fleet": {
        "task": contract.SAMPLE_FLEET.name,
        "schedule": float(_s.sample_interval),
        "options": {"queue": settings_mod.CONTROL_QUEUE, "expires": _s.sample_interval},
    },
    "reclaim-nightly": {
        "task": contract.RECLAIM_FLEET.name,
        # Every DORMANT_RECLAIM_EVERY seconds when set (make run's demo), else nightly.
        "schedule": float(_s.reclaim_every) if _s.reclaim_every else
        crontab(hour=_s.reclaim_hour, minute=_s.reclaim_minute),  # reclaim_timezone
        "options": {"queue": settings_mod.CONTROL_QUEUE,
                    "expires": min(3600, _s.reclaim_every or 3600)},
    },
}


STARTUP_REGISTRY_WAIT = 10.0  # seconds start-up waits for the first registry refresh


# seconds between calls, the function, its arguments
TimerPlan = tuple[float, Callable[..., object], tuple[Any, ...]]


class TimerStep(bootsteps.StartStopStep):
    """Calls what :meth:`every` names on the worker's timer, repeatedly, until the worker
    stops; nothing when it names nothing."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: object, **kwargs: object) -> None:
        super().__init__(parent, **kwargs)
        self.tref = None

    def every(self, parent: Any) -> TimerPlan | None:
        raise NotImplementedError

    def start(self, parent: Any) -> None:
        plan = self.every(parent)
        if plan is not None:
            self.tref = parent.timer.call_repeatedly(*plan)

    def stop(self, parent: object) -> None:
        if self.tref is not None:
            self.tref.cancel()


class RegistryStep(TimerStep):
    """Publish this host's instances now and every ``DORMANT_REGISTRY_INTERVAL`` seconds.

    Each refresh runs on a thread of its own (libvirt calls there have deadlines, but the
    timer and, with prefork, the event loop must not wait even that long).
    """

    def every(self, parent: Any) -> TimerPlan:
        return settings_mod.get().registry_interval, refresh_registry_in_background, ()


class DeadlineStep(TimerStep):
    """On workers that consume ``dormant.control``: every ``DORMANT_DEADLINE_CHECK_INTERVAL``
    seconds, send the unpause of each due auto-unpause deadline (claimed by one worker only)."""

    def every(self, parent: Any) -> TimerPlan | None:
        worker_app = parent.app
        queues = worker_app.amqp.queues
        consumed = queues.consume_from if queues.consume_from is not None else queues
        if settings_mod.CONTROL_QUEUE not in consumed:
            return None
        return (settings_mod.get().deadline_check_interval, expire_deadlines_in_background,
                (worker_app,))


class OutboxStep(TimerStep):
    """On workers that consume ``dormant.control``: every third of ``DORMANT_RESEND_AFTER``,
    send again what a worker sent and nobody answered (worker/fleet/outbox.py)."""

    def every(self, parent: Any) -> TimerPlan | None:
        queues = parent.app.amqp.queues
        consumed = queues.consume_from if queues.consume_from is not None else queues
        if settings_mod.CONTROL_QUEUE not in consumed:
            return None
        return (max(1.0, settings_mod.get().resend_after / 3),
                resend_unanswered_in_background, (parent.app,))


app.steps["worker"].add(RegistryStep)
app.steps["worker"].add(DeadlineStep)
app.steps["worker"].add(OutboxStep)


class EventsStep(bootsteps.StartStopStep):
    """Journal changes made outside dormant: libvirt lifecycle events and reconciliation.

    Runs in the worker's main process on threads of its own (worker/drift/watcher.py), so it never
    delays start-up or a transition; off with ``DORMANT_EVENTS=false``.
    """

    def __init__(self, parent: object, **kwargs: object) -> None:
        super().__init__(parent, **kwargs)
        self.watcher: Watcher | None = None

    def start(self, parent: object) -> None:
        from tasks.context import context
        from worker.drift.watcher import Watcher

        s = settings_mod.get()
        if not s.events:
            return
        # An in-process test:/// hypervisor cannot share its events with another process.
        pump: list[Any] | None = [] if s.libvirt_uri.startswith("test:///") else None
        self.watcher = Watcher(context(), reconcile_interval=s.reconcile_interval,
                               registry_interval=s.registry_interval, pump=pump)
        self.watcher.start()

    def stop(self, parent: object) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None


app.steps["worker"].add(EventsStep)


_presence: list[object] = []


@worker_init.connect
def _on_worker_init(sender: object = None, **_: object) -> None:
    """Before consuming: announce this host's worker, restore a dead incarnation's messages
    (where the broker does not requeue them itself: worker/fleet/broker.py)."""
    from worker.fleet import recovery
    from worker.store import connection

    current = broker.current()
    current.prepare_worker()
    hold_deliveries_while_full()  # a Redis broker at maxmemory (tasks/delivery.py)
    s = settings_mod.get()
    consumed = set(getattr(app.amqp.queues, "consume_from", None) or app.amqp.queues)
    if s.host_queue not in consumed:
        return  # not serving a host (e.g. a control-only worker): nothing of a host to restore
    if not current.restores_unacked:
        return  # the broker requeued them when the dead worker's channel closed (said below)
    try:
        presence, _restored = recovery.recover(
            app, connection.for_settings(s), host=s.host,
            queue=s.host_queue, node=str(getattr(sender, "hostname", "") or s.host),
            ttl=s.host_claim_ttl)
    except Exception as exc:  # Redis down at start: the visibility timeout still applies
        logging.getLogger("dormant.recovery").error("start-up recovery skipped: %s", exc)
        return
    _presence.append(presence)


def _held_here() -> frozenset[str] | None:
    """Task ids this worker runs, holds (prefetched) or has scheduled (a retry's countdown);
    None if they kept changing while read (Celery's pool threads change them)."""
    from celery.worker import state

    for _attempt in range(5):
        try:
            held = (*state.active_requests, *state.reserved_requests,
                    *getattr(state, "scheduled_requests", ()))
            return frozenset(r.id for r in held) | frozenset(state.requests)
        except RuntimeError:  # changed size during iteration: read again
            continue
    return None


class ReconnectRecoveryStep(bootsteps.StartStopStep):
    """On every consumer restart after the first (a lost broker connection came back), restore
    this host's messages that the old connection delivered and nothing here will finish."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: object, **kwargs: object) -> None:
        super().__init__(parent, **kwargs)
        self.starts = 0

    def start(self, parent: object) -> None:
        self.starts += 1
        if self.starts == 1 or not _presence:
            return  # the first start: worker_init already recovered
        from worker.fleet import recovery

        held = _held_here()
        if held is None:
            return  # the orphan sweep restores them instead
        try:
            recovery.recover_after_reconnect(app, _presence[0],  # type: ignore[arg-type]
                                             queue=settings_mod.get().host_queue, keep=held)
        except Exception as exc:  # the orphan sweep tries again
            logging.getLogger("dormant.recovery").error("recovery after reconnect: %s", exc)


app.steps["consumer"].add(ReconnectRecoveryStep)


_sweeping = threading.Lock()


def _sweep_orphans_in_background() -> None:
    """Restore this host's messages nobody holds (worker/fleet/recovery.py), on a thread of its own
    (tasks/timers.py ``in_background``)."""
    held = _held_here()  # read on the timer's thread: where Celery changes them, with asynloop
    if not _presence or held is None:
        return

    def sweep() -> None:
        from worker.fleet import recovery

        s = settings_mod.get()
        try:
            recovery.restore_orphans(app, _presence[0],  # type: ignore[arg-type]
                                     queue=s.host_queue, keep=held,
                                     older_than=2 * s.orphan_sweep_interval)
        except Exception as exc:  # the next sweep tries again
            logging.getLogger("dormant.recovery").warning("orphan sweep failed: %s", exc)

    in_background(_sweeping, "dormant-orphans", sweep)


class OrphanSweepStep(TimerStep):
    """On a host's worker: every ``DORMANT_ORPHAN_SWEEP_INTERVAL`` seconds, restore the host
    queue's unacknowledged messages that this worker does not hold (worker/fleet/recovery.py)."""

    def every(self, parent: Any) -> TimerPlan | None:
        current = broker.current()
        if not current.restores_unacked:  # said here: logging is not set up at worker_init
            logging.getLogger("dormant.recovery").info(
                "%s requeues a dead worker's unacknowledged messages itself: no start-up "
                "restore, no orphan sweep", current.name)
            return None
        return settings_mod.get().orphan_sweep_interval, _sweep_orphans_in_background, ()


app.steps["worker"].add(OrphanSweepStep)


@worker_shutdown.connect
def _on_worker_shutdown(**_: object) -> None:
    for presence in _presence:
        presence.leave()  # type: ignore[attr-defined]


@celeryd_after_setup.connect
def _announce(sender: object = None, **_: object) -> None:
    """Say which hypervisor this worker drives, whatever the log level (next to Celery's
    banner), and warn when it is libvirt's fake test driver."""
    s = settings_mod.get()
    line = f"dormant: host {s.host} drives libvirt {s.libvirt_uri} (queue {s.host_queue})"
    print(line, file=sys.__stdout__, flush=True)
    log = logging.getLogger("dormant.worker")
    if s.libvirt_uri.startswith("test:"):
        log.warning("%s: libvirt's fake test driver, not real guests", line)
    else:
        log.info(line)


@worker_ready.connect
def _on_worker_ready(sender: object = None, **_: object) -> None:
    # Published before the worker answers pings when libvirtd is healthy; never holds
    # start-up longer than STARTUP_REGISTRY_WAIT when it is not.
    refreshing = refresh_registry_in_background()
    if refreshing is not None:
        refreshing.join(STARTUP_REGISTRY_WAIT)
    port = settings_mod.get().metrics_port
    if port:
        pool = type(getattr(sender, "pool", None)).__module__
        if pool.endswith("prefork"):
            logging.getLogger("dormant.metrics").warning(
                "DORMANT_METRICS_PORT with the prefork pool: transition metrics stay in the "
                "child processes; run the worker with --pool threads")
        metrics.serve(port)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _setup_logging(logger: logging.Logger, **_: object) -> None:
    s = settings_mod.get()
    logs.configure(logger, json_lines=s.log_json, level=s.log_level)
