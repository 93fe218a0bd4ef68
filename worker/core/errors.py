"""dormant's one error tree.

``DormantError`` is the root. ``TransientError`` is the only branch that is retried;
everything under ``PermanentError`` fails a task at once. Constructors are
``(message, **details)``: the keyword-only details stay on the instance (``.details``) for the
code that caught it, while ``args`` holds the message alone, so Celery's JSON round trip
rebuilds the error by name from its message.
"""

from __future__ import annotations

from typing import Any


class DormantError(Exception):
    """Root of every error dormant raises on purpose."""

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigurationError(DormantError):
    """A setting is unknown or malformed."""


class PermanentError(DormantError):
    """Retrying cannot help; the caller must change something."""


class InvalidInput(PermanentError):
    """The instance id, request id or target is malformed."""


class UnknownInstance(PermanentError):
    """No domain with this UUID or name exists on the hypervisor."""


class InvalidTransition(PermanentError):
    """The guest's current state does not allow the requested action."""


class Unsavable(InvalidTransition):
    """libvirt refuses to save this guest's memory (ivshmem, passthrough, vGPU, virtiofs...)."""


class SaveDirectoryFull(PermanentError):
    """The save directory's filesystem cannot hold the guest's memory plus the reserve."""


class HostMemoryShort(PermanentError):
    """The host has too little available memory to restore the guest without swapping."""


class TransitionNotReached(PermanentError):
    """libvirt accepted the call but the guest did not reach the target state in time."""


class HypervisorRefused(PermanentError):
    """libvirt rejected the call with an error that retrying will not fix."""


class StaleLock(PermanentError):
    """The per-instance lock expired while held; a newer holder owns the instance now."""


class TaskFailed(PermanentError):
    """A task failed with an error that is not dormant's own (e.g. from an older worker)."""


class TransientError(DormantError):
    """A failure that may pass by itself; retried with backoff."""


class HypervisorUnavailable(TransientError):
    """libvirtd cannot be reached or the connection broke."""


class HypervisorBusy(TransientError):
    """libvirt timed out on the domain's state-change lock or a job is running on it."""


class InstanceBusy(TransientError):
    """Another transition holds this instance's lock."""


class StateStoreUnavailable(TransientError):
    """The Redis state store cannot be reached."""


class StateStoreFull(StateStoreUnavailable):
    """The Redis state store is at maxmemory and refuses writes (noeviction)."""


class RoomReserved(TransientError):
    """The disk or memory a transition needs is promised to others in flight on its host."""


class BrokerUnavailable(TransientError):
    """The Celery broker or result backend cannot be reached."""


class WorkerTimeout(TransientError):
    """No worker answered within the caller's timeout (the task may still run later)."""


class NoWorker(TransientError):
    """No live worker serves the host (or consumes the queue) the work is for."""
