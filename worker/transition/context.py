"""What one transition is given: the caller's :class:`Request` and the worker's :class:`Context`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.hypervisor import Hypervisor
from worker.transition.guards import Store
from worker.transition.table import Action

if TYPE_CHECKING:
    from worker.transition.room import Room


@dataclass(frozen=True, kw_only=True)
class Request:
    """What a caller asked for, as received (validated by :func:`run`)."""

    action: Action
    instance: Any
    request_id: Any = None
    target: Any = None
    max_seconds: Any = None
    task_id: str = ""
    attempt: int = 1
    final_attempt: bool = True


@dataclass(frozen=True, kw_only=True)
class Context:
    """What a worker brings: its hypervisor, its state store, the room checks of its host
    (None: none) and how long to wait."""

    hypervisor: Hypervisor
    store: Store
    host: str
    room: Room | None = None
    lock_wait: float = 60.0
    verify_timeout: float = 30.0
    clock: Callable[[], float] = time.time
