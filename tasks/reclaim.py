"""Reclamation tasks: sampling, the nightly run, its actions, restore and drain.

* ``dormant.sample`` (host queue): one ``getAllDomainStats`` stored as samples;
  ``dormant.sample_fleet`` (control queue, beat) sends it to every registered host.
* ``dormant.reclaim`` (host queue): decide, apply the safety rules, write the report and start
  at most ``DORMANT_RECLAIM_HOST_CAP`` actions; ``dormant.reclaim_fleet`` (control, nightly
  crontab) sends one per host with the run id ``<host>:<date>``.
* ``dormant.run_item`` (host queue): one action of a run -- re-check, then the real transition
  (same runner, lock, idempotency, journal and retry policy as ``dormant.suspend``), record the
  outcome, and start the next queued action, so the host cap holds without any thread waiting.
* ``dormant.restore`` / ``dormant.drain`` (host queue): resume a run's manifest / suspend every
  running guest of the host.

The bodies are one call into :class:`worker.reclaim.actions.Reclaimer`; what stays here is Celery:
how a queued action is sent. Every task retries with the settings' one policy (DormantTask).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any
from zoneinfo import ZoneInfo

from celery import Task

from tasks.base import DormantTask
from tasks.celery_app import app
from tasks.context import context, settings
from tasks.timers import send_kept
from tasks.transitions import TransitionTask
from worker.api import contract
from worker.core.settings import Settings, queue_for_host
from worker.fleet import outbox, registry
from worker.fleet.registry import TTL_INTERVALS
from worker.reclaim import run_store, ticks
from worker.reclaim.actions import Reclaimer
from worker.transition.table import Action


def reclaimer() -> Reclaimer:
    """This process's reclaimer; its queued actions go to this host's queue, kept in the
    outbox until their run entry is finished (sent again if a failover loses them)."""
    s = settings()

    def send_item(rid: str, instance: str) -> None:
        send_kept(app, outbox.Entry(task_id=str(uuid.uuid4()), task=contract.RUN_ITEM.name,
                                    args=[rid, instance], queue=s.host_queue,
                                    instance=instance, run=rid))

    return Reclaimer(context(), s, send_item)


# -- sampling ----------------------------------------------------------------------------------
@app.task(base=DormantTask, shared=False, name=contract.SAMPLE.name)
def sample() -> dict[str, Any]:
    """Take one sample of every guest of this host now."""
    return reclaimer().sample()


def _hosts(s: Settings) -> list[str]:
    return registry.hosts(context().store.redis, max_age=s.registry_interval * TTL_INTERVALS)


@app.task(base=DormantTask, shared=False, name=contract.SAMPLE_FLEET.name, ignore_result=True)
def sample_fleet() -> int:
    """Beat: ask every registered host for a sample (once per tick, however many beats)."""
    s = settings()
    slot = int(time.time() // s.sample_interval)
    if not ticks.claim(context().store.redis, f"sample:{slot}", ttl=s.sample_interval):
        return 0
    hosts = _hosts(s)
    for host in hosts:
        app.send_task(contract.SAMPLE.name, queue=queue_for_host(host),
                      expires=s.sample_interval, ignore_result=True)  # nobody waits for it
    return len(hosts)


@app.task(base=DormantTask, shared=False, name=contract.RECLAIM_FLEET.name, ignore_result=True)
def reclaim_fleet() -> list[str]:
    """Nightly crontab: one reclamation per host, id ``<host>:<local date>`` (the run's claim
    makes a second beat or a second trigger a no-op). With ``DORMANT_RECLAIM_EVERY`` the id is
    ``<host>:<start of the period, UTC>`` instead: one run per host per period."""
    s = settings()
    now = time.time()
    day = dt.datetime.fromtimestamp(now, ZoneInfo(s.reclaim_timezone)).date()
    period_start = now - now % s.reclaim_every if s.reclaim_every else 0.0
    sent = []
    for host in _hosts(s):
        rid = run_store.periodic_id(host, period_start) if s.reclaim_every else \
            run_store.nightly_id(host, day)
        result = app.send_task(contract.RECLAIM.name, kwargs={"run_id": rid},  # the report
                               queue=queue_for_host(host), ignore_result=True)  # is its result
        # Known before its worker starts it, so `dormant cancel` can stop it meanwhile.
        run_store.note_queued(context().store.redis, rid, kind="reclaim", host=host,
                         task_id=str(result.id), at=now, ttl=s.reclaim_report_ttl)
        sent.append(rid)
    return sent


# -- runs --------------------------------------------------------------------------------------
@app.task(base=DormantTask, shared=False, bind=True, name=contract.RECLAIM.name)
def reclaim(self: Task, run_id: Any = None, dry_run: Any = False) -> dict[str, Any]:
    """Decide every guest of this host, write the report, start the capped suspends."""
    return reclaimer().reclaim(run_id, dry_run, owner=self.request.id or "")


@app.task(base=TransitionTask, shared=False, bind=True, name=contract.RUN_ITEM.name)
def run_item(self: TransitionTask, run_id: Any, instance: Any) -> dict[str, Any]:
    """One action of a run: re-check, then suspend (reclaim, drain) or resume (restore)."""

    def transition(action: Action, request_id: str) -> dict[str, Any]:
        return self.transition(action, instance, request_id=request_id)

    final = (self.request.retries or 0) >= (self.max_retries or 0)
    return reclaimer().run_item(run_id, instance, transition=transition, final=final)


@app.task(base=DormantTask, shared=False, bind=True, name=contract.RESTORE.name)
def restore(self: Task, run_id: Any, restore_id: Any = None) -> dict[str, Any]:
    """Resume exactly what run ``run_id`` suspended (its manifest); skip what is running or
    gone. Each call is its own restore run, reported like any other."""
    return reclaimer().restore(run_id, restore_id, owner=self.request.id or "")


@app.task(base=DormantTask, shared=False, bind=True, name=contract.DRAIN.name)
def drain(self: Task, run_id: Any = None, instances: Any = None) -> dict[str, Any]:
    """Maintenance: suspend every running guest of this host (or only ``instances``, names or
    UUIDs), capped, with a manifest for ``dormant restore``."""
    return reclaimer().drain(run_id, instances, owner=self.request.id or "")
