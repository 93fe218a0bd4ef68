"""The task contract: every task's name and arguments, in one place.

Tasks (``tasks/``), the Python client (``worker/api/client.py``) and, through the client, the CLI
use these specs, so a name is spelled once and a call with a wrong argument list is refused
the same way everywhere: an :class:`~worker.core.errors.InvalidInput` naming the argument, never a
``TypeError`` with a traceback.

Idempotency keys live here too: a request id is bound to its :class:`Fingerprint` (action,
instance UUID, target, max_seconds), the way payment APIs bind an idempotency key to its body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.core import validation
from worker.core.errors import InvalidInput
from worker.core.validation import quote
from worker.reclaim import run_store


@dataclass(frozen=True)
class Param:
    """One argument of a task."""

    name: str
    required: bool = False
    # The CLI's spelling, used in messages the CLI prints ("--max-seconds").
    flag: str = ""
    # Checks (and canonicalises) a value the caller gave; None = checked in the task body.
    check: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A task's name, its arguments in positional order, and the queue kind it runs on."""

    name: str
    params: tuple[Param, ...] = ()
    queue: str = "host"  # "host": dormant.<host> (or forwarded from control); "control"

    @property
    def short(self) -> str:
        """``pause`` for ``dormant.pause`` (the journal's ``action``)."""
        return self.name.removeprefix("dormant.")

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Map a call's ``args``/``kwargs`` onto the parameters, or raise InvalidInput."""
        names = [p.name for p in self.params]
        accepted = ", ".join(names) if names else "no arguments"
        if not isinstance(args, list | tuple):
            raise InvalidInput(f"{self.name}: args must be a list, got {quote(args)}")
        if not isinstance(kwargs, Mapping):
            raise InvalidInput(f"{self.name}: kwargs must be an object, got {quote(kwargs)}")
        if len(args) > len(names):
            raise InvalidInput(
                f"{self.name} takes at most {len(names)} positional argument(s) "
                f"({accepted}), got {len(args)}")
        bound = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise InvalidInput(
                    f"{self.name}: unknown argument {quote(key)} (accepted: {accepted})")
            if key in bound:
                raise InvalidInput(f"{self.name}: argument {key!r} given twice "
                                   "(positionally and by name)")
            bound[key] = value
        for param in self.params:
            if param.name not in bound:
                if param.required:
                    raise InvalidInput(f"{self.name}: missing required argument "
                                       f"{param.name!r}")
                continue
            if param.check is not None:
                bound[param.name] = param.check(bound[param.name])
        return bound


# -- value checks for arguments the task bodies do not check themselves ----------------------
def _flag(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be true or false, got {quote(value)}")
        return value
    return check


def _instances(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not value:
        raise InvalidInput(f"instances must be a non-empty list of names or UUIDs, "
                           f"got {quote(value)}")
    return [validation.instance(v) for v in value]


def _optional_instance(value: Any) -> str | None:
    return None if value is None else validation.instance(value)


def _run_id(value: Any) -> str | None:
    return None if value is None else run_store.run_id(value)


def _required_run_id(value: Any) -> str:
    return run_store.run_id(value)


_INSTANCE = Param("instance", required=True, flag="INSTANCE")
_REQUEST_ID = Param("request_id", flag="--request-id")

# -- transitions (see README, "Task contract") ------------------------------------------------
PAUSE = TaskSpec("dormant.pause", (_INSTANCE, _REQUEST_ID, Param("max_seconds",
                                                                 flag="--max-seconds")))
UNPAUSE = TaskSpec("dormant.unpause", (_INSTANCE, _REQUEST_ID))
SUSPEND = TaskSpec("dormant.suspend", (_INSTANCE, _REQUEST_ID))
RESUME = TaskSpec("dormant.resume", (_INSTANCE, _REQUEST_ID))
ENSURE = TaskSpec("dormant.ensure", (_INSTANCE, Param("target", required=True, flag="TARGET"),
                                     _REQUEST_ID))
STATUS = TaskSpec("dormant.status", (Param("instance", flag="INSTANCE",
                                           check=_optional_instance),))
PING = TaskSpec("dormant.ping")

# -- reclamation --------------------------------------------------------------------------------
SAMPLE = TaskSpec("dormant.sample")
SAMPLE_FLEET = TaskSpec("dormant.sample_fleet", queue="control")
RECLAIM_FLEET = TaskSpec("dormant.reclaim_fleet", queue="control")
RECLAIM = TaskSpec("dormant.reclaim", (Param("run_id", check=_run_id),
                                       Param("dry_run", check=_flag("dry_run"))))
RUN_ITEM = TaskSpec("dormant.run_item", (Param("run_id", required=True, check=_required_run_id),
                                         _INSTANCE))
RESTORE = TaskSpec("dormant.restore", (Param("run_id", required=True, check=_required_run_id),
                                       Param("restore_id", check=_run_id)))
DRAIN = TaskSpec("dormant.drain", (Param("run_id", check=_run_id),
                                   Param("instances", flag="--instance", check=_instances)))

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    PAUSE, UNPAUSE, SUSPEND, RESUME, ENSURE, STATUS, PING,
    SAMPLE, SAMPLE_FLEET, RECLAIM_FLEET, RECLAIM, RUN_ITEM, RESTORE, DRAIN,
)}


def spec(name: str) -> TaskSpec:
    return TASKS[name]


# -- idempotency keys ------------------------------------------------------------------------
@dataclass(frozen=True)
class Fingerprint:
    """What a request id was first used for. The same id with another fingerprint is refused.

    ``instance`` is the UUID (a name and the UUID of one guest are the same instance).
    """

    action: str
    instance: str
    target: str = ""
    max_seconds: float | None = None

    def key(self) -> str:
        """The canonical string stored with the request's record (compared in Lua)."""
        seconds = "" if self.max_seconds is None else repr(float(self.max_seconds))
        return f"{self.action}|{self.instance}|{self.target}|{seconds}"

    @classmethod
    def parse(cls, key: str) -> Fingerprint:
        action, instance, target, seconds = [*key.split("|"), "", "", ""][:4]
        return cls(action, instance, target, float(seconds) if seconds else None)

    def same_request(self, other: Fingerprint) -> bool:
        """Equal but for the instance (checked once both are UUIDs)."""
        return (self.action, self.target, self.max_seconds) == \
            (other.action, other.target, other.max_seconds)

    def describe(self, name: str | None = None) -> str:
        text = f"{self.action} of {self.instance}"
        if name:
            text += f" ({name})"
        if self.target:
            text += f" to {self.target}"
        if self.max_seconds is not None:
            text += f" with --max-seconds {self.max_seconds:g}"
        return text


def reused(request_id: str, first: Fingerprint, first_name: str | None) -> InvalidInput:
    """The error for a request id reused for something else."""
    return InvalidInput(
        f"request id {quote(request_id)} was already used for {first.describe(first_name)}; "
        "a request id is bound to one action on one instance: choose a new one")
