"""Every Redis key dormant uses, built in one place. Nothing else spells a key."""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "dormant"


def lock(instance: str) -> str:
    """Per-instance lock; value ``<fence>:<owner token>``."""
    return f"{PREFIX}:lock:{instance}"


def fence(instance: str) -> str:
    """Monotonic counter bumped by every lock acquisition (fencing token)."""
    return f"{PREFIX}:fence:{instance}"


def request(request_id: str) -> str:
    """Idempotency record of one request id: pending, then its final result."""
    return f"{PREFIX}:request:{request_id}"


def journal(instance: str) -> str:
    """Per-instance journal stream."""
    return f"{PREFIX}:journal:{instance}"


JOURNAL_ALL = f"{PREFIX}:journal"  # fleet-wide journal stream (also bad input with no instance)

DEADLINES = f"{PREFIX}:deadlines"  # zset: instance uuid -> auto-unpause time (epoch seconds)


def deadline(instance: str) -> str:
    """Hash with the details of an instance's auto-unpause deadline."""
    return f"{PREFIX}:deadline:{instance}"


def where(instance_uuid: str) -> str:
    """Registry: which host serves this instance (expires unless refreshed)."""
    return f"{PREFIX}:where:{instance_uuid}"


def name(instance_name: str) -> str:
    """Registry: domain name -> UUID (expires unless refreshed)."""
    return f"{PREFIX}:name:{instance_name}"


def host_instances(host: str) -> str:
    """Registry: hash of instance uuid -> name served by one host."""
    return f"{PREFIX}:host:{host}:instances"


def watched(host: str) -> str:
    """Hash of instance uuid -> name that this host's event watcher last saw (reconciliation
    uses it to notice a guest undefined while no worker ran; the registry's own hash is
    rewritten at every refresh)."""
    return f"{PREFIX}:events:{host}:watched"


def reserved(host: str, resource: str) -> str:
    """Hash of the room promised on one host to saves (``disk``) or restores (``memory``) in
    flight: guest uuid -> ``<bytes>:<expiry epoch ms>`` (worker/transition/room.py). A field
    per transition running now; the key expires with its last promise."""
    return f"{PREFIX}:host:{host}:reserved:{resource}"


HOSTS = f"{PREFIX}:hosts"  # zset: host -> last registry refresh (epoch seconds)

# Messages workers sent on their own, until answered (worker/fleet/outbox.py).
OUTBOX = f"{PREFIX}:outbox"  # zset: task id -> when to check it next (epoch seconds)
OUTBOX_ENTRIES = f"{PREFIX}:outbox:entries"  # hash: task id -> the message (JSON)

# Reclamation.
KILL_SWITCH = f"{PREFIX}:reclaim:disabled"  # present = reclamation disabled fleet-wide
EXEMPT = f"{PREFIX}:reclaim:exempt"  # set of instance uuids exempted by CLI
RUNS = f"{PREFIX}:reclaim:runs"  # zset: run id -> start time


def activity(instance_uuid: str) -> str:
    """One instance's activity record: its samples as rate codes, the newest sample's counters
    and when it was first sampled (binary string, worker/reclaim/activity.py)."""
    return f"{PREFIX}:activity:{instance_uuid}"


def activity_times(host: str) -> str:
    """The times one host sampled its guests (binary string of milliseconds)."""
    return f"{PREFIX}:activity-times:{host}"


def activity_guests(host: str) -> str:
    """Which guests one host sampled, and when last (binary string, worker/reclaim/activity.py)."""
    return f"{PREFIX}:activity-guests:{host}"


def samples(instance_uuid: str) -> str:
    """Activity samples in the old form (a sorted set of JSON); read once to convert them."""
    return f"{PREFIX}:samples:{instance_uuid}"


def first_seen(instance_uuid: str) -> str:
    """When an instance was first sampled, in the old form; read once to convert it."""
    return f"{PREFIX}:first-seen:{instance_uuid}"


def sampled(host: str) -> str:
    """The old form of activity_guests (a sorted set); expires by itself after an upgrade."""
    return f"{PREFIX}:sampled:{host}"


def unsavable(instance_uuid: str) -> str:
    """Why libvirt refused to save this instance, for which definition (reclamation's
    ``cannot_save``, worker/reclaim/unsavable.py): one small JSON string per such guest."""
    return f"{PREFIX}:reclaim:unsavable:{instance_uuid}"


def mark(instance_uuid: str) -> str:
    """Grace mark: set on the first idle night, suspended on a later one."""
    return f"{PREFIX}:reclaim:mark:{instance_uuid}"


def run(run_id: str) -> str:
    """Report of one reclamation or drain run (hash: meta + per-instance entries)."""
    return f"{PREFIX}:run:{run_id}"


def run_manifest(run_id: str) -> str:
    """Set of instance uuids a run suspended: what ``restore`` brings back."""
    return f"{PREFIX}:run:{run_id}:manifest"


def run_claim(run_id: str) -> str:
    """Claim so one run id executes once even with two beat processes."""
    return f"{PREFIX}:run:{run_id}:claim"


def run_queue(run_id: str) -> str:
    """List of instance uuids a run still has to act on (fed to the host cap's window)."""
    return f"{PREFIX}:run:{run_id}:queue"


def run_queued(run_id: str) -> str:
    """What the CLI (or client) queued under this run id before any worker started it: JSON
    kind, host, task id, time. Lets ``dormant cancel`` and ``reclaim report`` know the id."""
    return f"{PREFIX}:run:{run_id}:queued"


def run_cancel(run_id: str) -> str:
    """Present = the run is cancelled (JSON: by whom, when): no action of it starts any more."""
    return f"{PREFIX}:run:{run_id}:cancel"


def schedule_claim(slot: str) -> str:
    """Claim of one beat tick (e.g. ``sample:<slot>``) so two beat processes fan out once."""
    return f"{PREFIX}:schedule:{slot}:claim"


def host_workers(host: str) -> str:
    """Sorted set: node name -> when its presence lapses (epoch s), for one host's workers."""
    return f"{PREFIX}:host:{host}:workers"


# -- families, for `dormant usage` (worker/store/usage.py) -------------------------------------
# Every key dormant writes falls in one family, matched by its prefix; each family says what
# bounds it. Celery's and kombu's own keys (broker and result backend) are named here too,
# from their documented layouts, so that no key goes unaccounted.
@dataclass(frozen=True)
class Family:
    """Keys that share a purpose, a prefix (or exact names) and a bound."""

    name: str
    bound: str  # what keeps it from growing without limit
    prefixes: tuple[str, ...] = ()
    exact: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()

    def holds(self, key: str) -> bool:
        return key.startswith(self.prefixes) or key in self.exact or key.endswith(self.suffixes)


QUEUE_PREFIX = "dormant."  # dormant.<host> and dormant.control (worker/core/settings.py)
FAMILIES = (
    Family("samples", "one window (DORMANT_IDLE_WINDOW), then they expire",
           prefixes=(f"{PREFIX}:activity:", f"{PREFIX}:activity-times:",
                     f"{PREFIX}:activity-guests:", f"{PREFIX}:sampled:",
                     f"{PREFIX}:samples:", f"{PREFIX}:first-seen:")),
    Family("journals", "per instance ~100 entries, gone 90 days after its last one; "
           "the fleet journal ~100,000 entries",
           prefixes=(f"{PREFIX}:journal:",), exact=(JOURNAL_ALL,)),
    Family("idempotency records", "DORMANT_RESULT_TTL (7 days) after the request",
           prefixes=(f"{PREFIX}:request:",)),
    Family("locks and fences", "locks: DORMANT_LOCK_TTL; one fence counter per instance ever "
           "locked (~70 B: a fence must never go backwards)",
           prefixes=(f"{PREFIX}:lock:", f"{PREFIX}:fence:")),
    Family("room promises", "a field per save or restore in flight on a host; the key expires "
           "with its last promise", suffixes=(":reserved:disk", ":reserved:memory")),
    Family("outbox", "what workers sent on their own until it is answered (run actions, "
           "forwarded transitions, auto-unpauses)", exact=(OUTBOX, OUTBOX_ENTRIES)),
    Family("registry", "3 registry intervals unless refreshed; hosts unseen for 7 days "
           "are dropped",
           prefixes=(f"{PREFIX}:where:", f"{PREFIX}:name:", f"{PREFIX}:host:",
                     f"{PREFIX}:events:"), exact=(HOSTS,)),
    Family("deadlines", "one per instance paused with max_seconds, until it is unpaused",
           prefixes=(f"{PREFIX}:deadline:",), exact=(DEADLINES,)),
    Family("runs", "DORMANT_RECLAIM_REPORT_TTL (90 days): reports, queues, manifests, claims",
           prefixes=(f"{PREFIX}:run:",), exact=(RUNS,)),
    Family("reclamation state", "grace marks: grace period + 7 days; exemptions and the kill "
           "switch: set by operators", prefixes=(f"{PREFIX}:reclaim:",)),
    Family("schedule claims", "one sample interval", prefixes=(f"{PREFIX}:schedule:",)),
    Family("queues", "the messages waiting: at most the host cap per run, plus callers' ones",
           prefixes=(QUEUE_PREFIX,)),
    Family("unacked", "messages being worked on: prefetch x concurrency per worker",
           exact=("unacked", "unacked_index", "unacked_mutex")),
    Family("results", "Celery results: DORMANT_RESULT_TTL; none for samples, nightly runs "
           "and run actions sent by dormant itself",
           prefixes=("celery-task-meta-", "celery-taskset-meta-", "chord-unlock-")),
    Family("remote control", "reply queues expire 10 s after their last use (kombu x-expires)",
           suffixes=(".reply.celery.pidbox",)),
    Family("bindings", "kombu's exchange tables: swept when their consumers are gone",
           prefixes=("_kombu.",)),
)
OTHER = Family("other", "not dormant's or Celery's: look at these keys")


def family(key: str) -> Family:
    """The family a key belongs to (OTHER when none claims it)."""
    for fam in FAMILIES:
        if fam.holds(key):
            return fam
    return OTHER
