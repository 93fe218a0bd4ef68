"""One transition, step by step: validate, deduplicate, lock, read, let the guest judge the
fence (fencing.py), act, verify, record.

Plain Python over a Hypervisor and a Store, so it runs the same inside a Celery task, a test
or a benchmark. Errors leave the journal saying what happened and the lock released.
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from typing import Any, NoReturn

from worker.api.contract import Fingerprint, reused
from worker.core import faultpoints, metrics, validation
from worker.core.errors import (
    DormantError,
    InvalidInput,
    PermanentError,
    StaleLock,
    StateStoreUnavailable,
    TransientError,
    TransitionNotReached,
    UnknownInstance,
)
from worker.core.states import Observed, State, Target
from worker.fleet import registry
from worker.hypervisor import Guest, Hypervisor
from worker.transition import failed_save, fencing
from worker.transition.context import Context, Request
from worker.transition.guards import Done, Held, Reused, Store
from worker.transition.release import Release, log_fields, patiently
from worker.transition.table import STEP_RESULT, Action, Plan, Step, plan

log = logging.getLogger("dormant.transition")
FENCE_TRIES = 3  # fresh fences a transition takes when the guest refuses one (a failover)


def run(ctx: Context, req: Request) -> dict[str, Any]:
    """Carry out one transition and return its JSON result (see README, "Results")."""
    started = ctx.clock()
    base = {
        "action": str(req.action),
        "host": ctx.host,
        "task_id": req.task_id,
        "attempts": req.attempt,
        "started_at": started,
    }
    try:
        instance = validation.instance(req.instance)
        request_id = validation.request_id(req.request_id) or req.task_id
        target = validation.target(req.target) if req.action is Action.ENSURE else None
        max_seconds = validation.max_seconds(req.max_seconds)
        if max_seconds is not None and req.action is not Action.PAUSE:
            raise InvalidInput("max_seconds only applies to pause")
        if not request_id:
            raise InvalidInput("a request_id (or a task id) is required")
    except InvalidInput as exc:
        entry = {**base, "instance": str(req.instance)[:200], "outcome": "rejected",
                 "request_id": str(req.request_id)[:200], **_error(exc, started, ctx)}
        journal_rejection(ctx.store, entry, req.instance, ctx.hypervisor)
        exc.journaled = True  # type: ignore[attr-defined]  # tasks/base.py: not twice
        metrics.transition_finished(str(req.action), "rejected", 0.0)
        raise
    base["request_id"] = request_id
    return _Transition(ctx, req, base, instance, request_id, target, max_seconds).run()


def journal_rejection(store: Store, entry: dict[str, Any], instance: Any,
                      hypervisor: Hypervisor | None = None) -> None:
    """Journal a refused call: in the fleet journal, and in the instance's own journal only
    when ``instance`` names a real guest -- one some worker has published, or one this
    worker's hypervisor knows (a read, never a change). An unknown or malformed instance
    never gets a journal of its own."""
    uuid = None
    try:
        key = validation.instance(instance)
        uuid, host = registry.resolve(store.redis, key)
        uuid = uuid if host else None
        if uuid is None and hypervisor is not None:
            uuid = hypervisor.guest(key).uuid
    except Exception as exc:  # malformed, unknown or unreachable: the fleet journal only
        log.debug("no journal of its own for %r: %s", instance, exc)
    store.journal_only(entry, uuid)


def _error(exc: Exception, started: float, ctx: Context) -> dict[str, Any]:
    finished = ctx.clock()
    return {
        "error_type": type(exc).__name__,
        "error": str(exc),
        "finished_at": finished,
        "duration_ms": round((finished - started) * 1000, 3),
    }


class _Transition:
    def __init__(self, ctx: Context, req: Request, base: dict[str, Any], instance: str,
                 request_id: str, target: Target | None, max_seconds: float | None) -> None:
        self.ctx, self.req, self.base = ctx, req, base
        self.instance, self.request_id = instance, request_id
        self.target, self.max_seconds = target, max_seconds
        self.held: Held | None = None
        self.guest: Guest | None = None
        self.before: Observed | None = None
        self.acted = False  # a state-changing libvirt call was made
        self.refused = False  # a reused request id was refused (journaled already)
        self.recorded = False  # the result is recorded (a replica had not acknowledged it)

    def fingerprint(self, uuid: str) -> Fingerprint:
        """What this request asks for; its request id is bound to it."""
        return Fingerprint(str(self.req.action), uuid, str(self.target or ""),
                           self.max_seconds)

    def run(self) -> dict[str, Any]:
        key = self.instance
        if not validation.is_uuid(key):
            # A name: answer a finished request before touching libvirt, then lock by UUID.
            recorded = self.ctx.store.request(self.request_id)
            if recorded is not None and (answer := self._recorded(recorded)) is not None:
                return answer
            key = self._lookup().uuid
        try:
            floor = 0
            for _try in range(FENCE_TRIES):
                if (answer := self._acquire(key, floor)) is not None:
                    return answer
                faultpoints.reached("fenced", key)  # the fault suite's kill point (tests only)
                try:
                    with fencing.exclusive(key, self.ctx.lock_wait):
                        return self._locked(key)
                except StaleLock as exc:
                    if "guest_fence" not in exc.details and "before_acting" not in exc.details:
                        raise
                    # The guest refused this fence, or the lock was lost before anything was
                    # done: a newer holder owns the guest; wait for it and take a newer fence.
                    floor = self._outdated(exc)
            raise StaleLock(f"{FENCE_TRIES} fences in a row were stale before acting on "
                            f"{self.instance}; giving up")
        except Exception as exc:  # not only DormantError: a held lock must never outlive us
            if not self.refused and not self.recorded:
                self._fail(key, exc)
            raise

    def _acquire(self, key: str, floor: int) -> dict[str, Any] | None:
        """Take the lock (a fence above ``floor``); the answer when there is nothing to do."""
        waited = time.monotonic()
        outcome = self.ctx.store.acquire(
            self.request_id, key, wait=self.ctx.lock_wait,
            fingerprint=self.fingerprint(key).key(), fence_floor=floor,
            pending={"action": str(self.req.action), "instance": key,
                     "name": self.guest.name if self.guest else None,
                     "task_id": self.req.task_id})
        metrics.lock_waited(time.monotonic() - waited)
        if isinstance(outcome, Reused):
            self._refuse(outcome.record)
        if isinstance(outcome, Done):
            return self._duplicate(outcome.result)
        self.held = outcome
        # The journal interval [started_at, finished_at] is the time the lock was held,
        # so entries of one instance never overlap; the wait for the lock is before it.
        self.base.setdefault("received_at", self.base["started_at"])
        self.base["started_at"] = self.ctx.clock()
        return None

    def _outdated(self, exc: StaleLock) -> int:
        """This holder is stale and did nothing: journal it, let the lock go (if still ours)
        and return the fence the next one must be above (the guest's, when it refused)."""
        held, self.held = self.held, None
        assert held is not None
        entry = {**self.base, "instance": held.instance, "outcome": "stale",
                 "name": self.guest.name if self.guest else None, "fence": held.fence,
                 "guest_fence": exc.details.get("guest_fence"),
                 **_error(exc, self.base["started_at"], self.ctx)}
        self.ctx.store.finish(held, instance=held.instance, request_id=self.request_id,
                              entry=entry, record=None)
        metrics.transition_retried(str(self.req.action), type(exc).__name__)
        log.warning("%s %s: %s", self.req.action, held.instance, exc,
                    extra={"dormant": log_fields(entry)})
        return int(exc.details.get("guest_fence") or 0)

    def _recorded(self, recorded: dict[str, Any]) -> dict[str, Any] | None:
        """For a request by name: the duplicate answer, a refusal, or None to go on."""
        bound = recorded.get("fingerprint")
        if not bound:  # recorded before ids were bound to a fingerprint
            return self._duplicate(recorded) if recorded.get("status") == "done" else None
        if not Fingerprint.parse(bound).same_request(self.fingerprint("")):
            self._refuse(recorded)
        if recorded.get("status") == "done" and recorded.get("name") == self.instance:
            return self._duplicate(recorded)
        return None  # another spelling of the instance: begin compares the UUIDs

    def _refuse(self, recorded: dict[str, Any]) -> NoReturn:
        """The request id was first used for something else: journal and raise, no lock."""
        self.refused = True
        exc = reused(self.request_id, Fingerprint.parse(recorded["fingerprint"]),
                     recorded.get("name"))
        entry = {**self.base, "instance": self.guest.uuid if self.guest else self.instance,
                 "name": self.guest.name if self.guest else None, "outcome": "rejected",
                 "first_used_for": recorded["fingerprint"],
                 **_error(exc, self.base["started_at"], self.ctx)}
        journal_rejection(self.ctx.store, entry, entry["instance"], self.ctx.hypervisor)
        exc.journaled = True  # type: ignore[attr-defined]
        metrics.transition_finished(str(self.req.action), "rejected", 0.0)
        log.info("%s %s: rejected: %s", self.req.action, entry["instance"], exc,
                 extra={"dormant": log_fields(entry)})
        raise exc

    def _lookup(self) -> Guest:
        try:
            self.guest = self.ctx.hypervisor.guest(self.instance)
        except UnknownInstance as exc:
            self._fail(self.instance, exc)
            raise UnknownInstance(f"unknown instance {self.instance!r}: {exc}") from None
        except DormantError as exc:
            self._fail(self.instance, exc)
            raise
        return self.guest

    def _duplicate(self, recorded: dict[str, Any]) -> dict[str, Any]:
        result = {k: v for k, v in recorded.items() if k != "status"}
        result.update(outcome="duplicate", original_task_id=recorded.get("task_id"),
                      task_id=self.req.task_id)
        metrics.transition_finished(str(self.req.action), "duplicate", 0.0)
        return result

    def _locked(self, uuid: str) -> dict[str, Any]:
        if self.guest is None:
            guest, observed = self.ctx.hypervisor.observe(uuid)
            if guest is None:
                raise UnknownInstance(f"unknown instance {self.instance!r}: no such domain")
            self.guest = guest
        else:
            observed = self.guest.observe()
        self.before = observed
        steps = plan(self.req.action, observed, self.target)
        previous = self.held.previous if self.held else None
        before = observed
        if steps.already:
            # An earlier delivery of this very request may have done the work before dying.
            # Only a pending intent counts: a failed record may come from a refusal that
            # never called libvirt.
            if (previous and previous.get("status") == "pending"
                    and previous.get("state_before") not in (None, str(observed.state))):
                outcome = "changed"
                before = Observed(State(previous["state_before"].split("(")[0]),
                                  previous.get("reason_before") or "")
            else:
                outcome = "already"
            after = observed
        else:
            assert self.held is not None
            # Room on the host first (disk for a save, memory for a restore): a refusal comes
            # before anything is recorded or asked of libvirt.
            promise = self.ctx.room.promise(steps.steps[0], self.guest, str(self.req.action)) \
                if self.ctx.room is not None else None
            try:
                # The guest judges the fence before anything is recorded or done (fencing.py).
                fencing.claim(self.guest, fence=self.held.fence, request_id=self.request_id,
                              host=self.ctx.host, now=self.ctx.clock())
                faultpoints.reached("claimed", uuid)
                self.ctx.store.record_intent(
                    self.held, self.request_id,
                    {"state_before": str(observed.state), "reason_before": observed.reason,
                     "task_id": self.req.task_id, "action": str(self.req.action),
                     "instance": uuid, "name": self.guest.name, "fence": self.held.fence,
                     "fingerprint": self.fingerprint(uuid).key()},
                )
                after = self._act(steps)
            except BaseException as exc:
                outstanding = getattr(exc, "outstanding", None)
                if outstanding is not None and promise is not None:  # libvirt still at it
                    outstanding.add_done_callback(lambda _f: self._release(promise))
                else:
                    self._release(promise)
                raise
            self._release(promise)
            outcome = "changed"
        return self._succeed(outcome, before, after, steps)

    def _release(self, promise: Any) -> None:
        if self.ctx.room is not None and promise is not None:
            try:
                self.ctx.room.release(promise)
            except DormantError as exc:  # it lapses by itself past the call's deadline
                log.warning("could not release the room promised to %s: %s", promise.uuid, exc)

    def _act(self, steps: Plan) -> Observed:
        assert self.guest is not None
        observed = self.before
        for step in steps.steps:
            self.acted = True
            try:
                self.guest.run(step)
            except DormantError as exc:
                if step is Step.SAVE and isinstance(exc, PermanentError):  # libvirt said no
                    assert self.before is not None
                    raise failed_save.settle(exc, self.guest, self.before, self.ctx.room,
                                             str(self.req.action)) from None
                raise
            observed = self._wait_for(STEP_RESULT[step])
        assert observed is not None
        return observed

    def _wait_for(self, state: State) -> Observed:
        """Post-condition: read the state back until it is ``state`` or the deadline passes."""
        assert self.guest is not None
        deadline = time.monotonic() + self.ctx.verify_timeout
        pause = 0.01
        while True:
            observed = self.guest.observe()
            if observed.state is state:
                return observed
            if self.held is not None and not self.ctx.store.holds(self.held):
                # A newer holder owns the guest and may have moved it on: stop waiting.
                raise StaleLock(
                    f"lost the lock on {self.guest.uuid} while waiting for {state}; "
                    f"the guest is {observed} and a newer transition owns it"
                )
            if time.monotonic() >= deadline:
                raise TransitionNotReached(
                    f"{self.guest.name} is {observed} {self.ctx.verify_timeout:g}s after the "
                    f"call; expected {state}"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _succeed(self, outcome: str, before: Observed, after: Observed,
                 steps: Plan) -> dict[str, Any]:
        assert self.guest is not None and self.held is not None
        finished = self.ctx.clock()
        result = {
            **self.base,
            "instance": self.guest.uuid,
            "name": self.guest.name,
            "target": str(steps.target),
            "outcome": outcome,
            # Plain states, as ensure targets and dormant.status name them; libvirt's reason
            # (a pause by the user, an I/O error, ...) apart.
            "state_before": str(before.state),
            "reason_before": before.reason,
            "state_after": str(after.state),
            "reason_after": after.reason,
            "steps": [str(s) for s in steps.steps] if outcome == "changed" else [],
            "fence": self.held.fence,
            "finished_at": finished,
            "duration_ms": round((finished - self.base["started_at"]) * 1000, 3),
        }
        deadline: float | str | None = None
        if self.max_seconds is not None:
            deadline = round(finished + self.max_seconds, 3)
            result["unpause_at"] = deadline
        elif outcome == "changed":
            deadline = "clear"
        try:
            self.ctx.store.finish(
                self.held, instance=self.guest.uuid, request_id=self.request_id,
                entry=result, deadline=deadline,
                record={**result, "status": "done",
                        "fingerprint": self.fingerprint(self.guest.uuid).key()},
                host=self.ctx.host,
            )
        except StaleLock as exc:
            self.held = None
            self.ctx.store.journal_only(
                {**result, "outcome": "stale", **_error(exc, self.base["started_at"], self.ctx)},
                self.guest.uuid,
            )
            raise
        except StateStoreUnavailable as exc:
            if "replicated" in exc.details:
                # Recorded and unlocked, on the master alone: the retry answers from the
                # record, or redoes the request if a failover lost it.
                self.held, self.recorded = None, True
                metrics.transition_retried(str(self.req.action), type(exc).__name__)
                log.warning("%s %s: %s", self.req.action, self.guest.name, exc)
            raise
        self.held = None
        metrics.transition_finished(str(self.req.action), outcome,
                                    result["duration_ms"] / 1000)
        log.info("%s %s: %s (%s -> %s)", self.req.action, self.guest.name, outcome,
                 before, after, extra={"dormant": log_fields(result)})
        return result

    def _fail(self, key: str, exc: Exception) -> None:
        """Journal a failed attempt and release the lock (also before a retry)."""
        retrying = isinstance(exc, TransientError) and not self.req.final_attempt
        entry = {
            **self.base,
            "instance": self.guest.uuid if self.guest else key,
            "name": self.guest.name if self.guest else None,
            "target": str(self.target or ""),
            "outcome": "retrying" if retrying else "failed",
            "state_before": str(self.before.state) if self.before else None,
            "reason_before": self.before.reason if self.before else None,
            **_error(exc, self.base["started_at"], self.ctx),
        }
        entry["error_class"] = "transient" if isinstance(exc, TransientError) else "permanent"
        if isinstance(exc, DormantError) and exc.details:  # figures of a refusal, and so on
            entry["details"] = exc.details
        held, self.held = self.held, None
        instance = entry["instance"]
        outstanding = getattr(exc, "outstanding", None)
        if held is not None and outstanding is not None:
            # libvirt may still carry the abandoned call out: keep the guest locked (the
            # keeper goes on renewing) until it returns, then release and journal that.
            entry["lock"] = "kept until the abandoned call returns"
            outstanding.add_done_callback(Release(self.ctx, held, entry, str(exc)))
            held = None
        record = None if retrying else {**entry, "status": "failed"}
        if record is not None and validation.is_uuid(instance):
            # Bound like a success; a name that never resolved binds nothing.
            record["fingerprint"] = self.fingerprint(instance).key()
        try:
            patiently(held, lambda: self.ctx.store.finish(
                held, instance=instance, request_id=self.request_id, entry=entry,
                record=record, deadline=None, host=self.ctx.host,
                # Only a real instance's UUID gets a journal of its own.
                journal_instance=(validation.is_uuid(instance)
                                  and not isinstance(exc, UnknownInstance)),
            ), self.ctx.store.lock_ttl_ms / 1000)
        except DormantError as store_exc:  # the store itself is down: say so in the log
            if isinstance(store_exc, StaleLock):  # lost the lock: journal it, record nothing
                lost = {**entry, "lock_error": str(store_exc)}
                if not isinstance(exc, StaleLock) or self.acted:
                    lost["outcome"] = "stale"  # libvirt was called; its result is discarded
                with suppress(DormantError):
                    self.ctx.store.journal_only(lost, instance)
            log.error("could not record %s on %s: %s", exc, instance, store_exc)
        if retrying:
            metrics.transition_retried(str(self.req.action), type(exc).__name__)
        else:
            metrics.transition_finished(str(self.req.action), "failed",
                                        (self.ctx.clock() - self.base["started_at"]))
        log.warning("%s %s: %s %s", self.req.action, instance, entry["outcome"], exc,
                    extra={"dormant": log_fields(entry)})
