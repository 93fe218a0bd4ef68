"""The transition tasks, addressable by name with JSON arguments (the public contract).

``app.send_task("dormant.suspend", args=[instance], kwargs={"request_id": ...})``. Shared
concerns live in :class:`TransitionTask`; each body is one call into ``worker.transition.runner``.
"""

from __future__ import annotations

import time
from typing import Any

from tasks.base import DormantTask
from tasks.celery_app import app
from tasks.context import context, settings
from worker.api import contract
from worker.core import validation
from worker.core.errors import PermanentError
from worker.core.settings import CONTROL_QUEUE, queue_for_host
from worker.fleet import outbox, registry
from worker.transition.context import Request
from worker.transition.runner import run
from worker.transition.table import Action


class TransitionTask(DormantTask):
    """A task that runs one transition (and forwards it from the control queue)."""

    def transition(self, action: Action, instance: Any, **kwargs: Any) -> dict[str, Any]:
        self.forward_if_elsewhere(instance)
        retries = self.request.retries or 0
        req = Request(
            action=action,
            instance=instance,
            task_id=self.request.id or "",
            attempt=retries + 1,
            final_attempt=retries >= (self.max_retries or 0),
            **kwargs,
        )
        return run(context(), req)

    def forward_if_elsewhere(self, instance: Any) -> None:
        """A transition sent to the control queue runs on the host that serves the instance."""
        delivery = self.request.delivery_info or {}
        if delivery.get("routing_key") != CONTROL_QUEUE or not isinstance(instance, str):
            return
        try:
            validation.instance(instance)
        except PermanentError:
            return  # the runner rejects and journals it
        uuid, host = registry.resolve(context().store.redis, instance)
        if host and host != context().host:
            self.keep_until_answered(uuid or instance, queue_for_host(host))
            raise self.replace(
                self.signature(tuple(self.request.args or ()), dict(self.request.kwargs or {}),
                               queue=queue_for_host(host), immutable=True)
            )

    def keep_until_answered(self, instance: str, queue: str) -> None:
        """The forwarded message keeps this task's id; it goes into the outbox, sent again
        while its request is not recorded (worker/fleet/outbox.py)."""
        kwargs = dict(self.request.kwargs or {})
        try:
            request_id = validation.request_id(kwargs.get("request_id")) or self.request.id
        except PermanentError:
            return  # refused by the runner, never recorded: nothing to wait for
        outbox.keep(context().store.redis, outbox.Entry(
            task_id=self.request.id or "", task=self.name or "", queue=queue,
            args=list(self.request.args or ()), kwargs=kwargs, instance=instance,
            request_id=request_id or ""), check_at=time.time() + settings().resend_after)


@app.task(base=TransitionTask, shared=False, bind=True, name=contract.PAUSE.name)
def pause(self: TransitionTask, instance: Any, request_id: Any = None,
          max_seconds: Any = None) -> dict[str, Any]:
    """Stop the guest's vCPUs, keep it in RAM; unpause automatically after max_seconds."""
    return self.transition(Action.PAUSE, instance, request_id=request_id,
                           max_seconds=max_seconds)


@app.task(base=TransitionTask, shared=False, bind=True, name=contract.UNPAUSE.name)
def unpause(self: TransitionTask, instance: Any, request_id: Any = None) -> dict[str, Any]:
    return self.transition(Action.UNPAUSE, instance, request_id=request_id)


@app.task(base=TransitionTask, shared=False, bind=True, name=contract.SUSPEND.name)
def suspend(self: TransitionTask, instance: Any, request_id: Any = None) -> dict[str, Any]:
    """Save the guest's memory to disk and free the host (managed save)."""
    return self.transition(Action.SUSPEND, instance, request_id=request_id)


@app.task(base=TransitionTask, shared=False, bind=True, name=contract.RESUME.name)
def resume(self: TransitionTask, instance: Any, request_id: Any = None) -> dict[str, Any]:
    """Restore the guest from its managed-save image."""
    return self.transition(Action.RESUME, instance, request_id=request_id)


@app.task(base=TransitionTask, shared=False, bind=True, name=contract.ENSURE.name)
def ensure(self: TransitionTask, instance: Any, target: Any,
           request_id: Any = None) -> dict[str, Any]:
    """Make the instance running, paused or suspended, whatever it is now."""
    return self.transition(Action.ENSURE, instance, request_id=request_id, target=target)
