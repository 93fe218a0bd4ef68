"""The ``dormant`` CLI's output and exit codes, and the client's routing, without services.

The CLI runs under click's CliRunner against a scripted client; the client's routing and
journal reads run on fakeredis with a registry published from libvirt's test driver.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery.backends.base import create_exception_cls  # type: ignore[attr-defined]
from celery.exceptions import TimeoutError as CeleryTimeout
from click.testing import CliRunner
from kombu.exceptions import OperationalError

from worker.api.client import Client
from worker.cli import main
from worker.cli import transitions as cli
from worker.core.errors import (
    ConfigurationError,
    HypervisorUnavailable,
    InvalidInput,
    InvalidTransition,
    NoWorker,
    UnknownInstance,
)
from worker.core.settings import CONTROL_QUEUE, Settings
from worker.fleet import registry

UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


# -- a scripted client ---------------------------------------------------------------------------
@dataclass
class FakeResult:
    id: str
    outcome: Any  # the JSON answer, or an exception the task "raised"

    def get(self, **_: Any) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@dataclass
class ScriptedClient:
    """Stands in for worker.api.client.Client: records what was sent, answers from a script."""

    answers: dict[str, Any] = field(default_factory=dict)  # instance or "host:<h>" -> outcome
    fleet: list[str] = field(default_factory=list)  # hosts in the registry
    send_error: Exception | None = None
    journal_entries: list[dict[str, Any]] = field(default_factory=list)
    recorded_entries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sent: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    waits: list[float | None] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)  # hosts (or instances) no live worker serves
    watched: list[str | None] = field(default_factory=list)  # hosts the waits watched
    _outgoing: dict[str, Any] = field(default_factory=dict)  # the real wait's: nothing resent

    def __enter__(self) -> ScriptedClient:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def _send(self, name: str, key: str, *args: Any, **kwargs: Any) -> FakeResult:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append((name, args, kwargs))
        return FakeResult(id=f"task-{len(self.sent)}", outcome=self.answers.get(key))

    def pause(self, instance: str, **kw: Any) -> FakeResult:
        return self._send("pause", instance, instance, **kw)

    def unpause(self, instance: str, **kw: Any) -> FakeResult:
        return self._send("unpause", instance, instance, **kw)

    def suspend(self, instance: str, **kw: Any) -> FakeResult:
        return self._send("suspend", instance, instance, **kw)

    def resume(self, instance: str, **kw: Any) -> FakeResult:
        return self._send("resume", instance, instance, **kw)

    def ensure(self, instance: str, target: str, **kw: Any) -> FakeResult:
        return self._send("ensure", instance, instance, target, **kw)

    def status(self, instance: str | None = None, *, host: str | None = None) -> FakeResult:
        return self._send("status", instance or f"host:{host}", instance, host=host)

    def status_fleet(self) -> dict[str, FakeResult]:
        return {h: self.status(host=h) for h in self.fleet}

    def hosts(self) -> list[str]:
        return list(self.fleet)

    def wait(self, result: FakeResult, timeout: float | None = 60, what: str = "",
             *, watch: bool = False, host: str | None = None, notice: Any = None) -> Any:
        """The real client's wait: its translation of timeouts and foreign errors (watching
        the worker is tested on the real client, below)."""
        self.waits.append(timeout)
        if watch:
            self.watched.append(host)
        return Client.wait(self, result, timeout, what)  # type: ignore[arg-type]

    def serving(self, host: str | None) -> list[str]:
        return [] if host in self.dead else [f"w@{host}"]

    def workers_of(self, hosts: list[str]) -> dict[str, list[str]]:
        return {h: self.serving(h) for h in hosts}

    def require_worker(self, instance: str) -> str | None:
        if instance in self.dead:
            raise NoWorker(f"no live worker serves host 'h1' (which serves {instance!r}); "
                           "live hosts: none")
        return "h1"

    def recorded(self, uuids: list[str]) -> dict[str, list[dict[str, Any]]]:
        return {u: self.recorded_entries.get(u, []) for u in uuids}

    def journal(self, instance: str, *, limit: int = 50) -> list[dict[str, Any]]:
        if not self.journal_entries:
            raise UnknownInstance(f"unknown instance {instance!r}: no journal")
        return self.journal_entries[-limit:]


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> ScriptedClient:
    client = ScriptedClient()
    monkeypatch.setattr(cli, "make_client", lambda: client)
    return client


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def result(**overrides: Any) -> dict[str, Any]:
    return {"instance": UUID, "name": "vm1", "host": "h1", "action": "pause",
            "outcome": "changed", "state_before": "running", "state_after": "paused(user)",
            "request_id": "r1", "attempts": 1, "duration_ms": 12.5, **overrides}


# -- transitions ------------------------------------------------------------------------------
def test_wait_json_prints_the_result_as_one_document(scripted: ScriptedClient) -> None:
    scripted.answers["vm1"] = result()
    run = invoke("pause", "vm1", "--wait", "--json", "--request-id", "r1", "--timeout", "7")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout) == result()
    assert scripted.sent == [("pause", ("vm1",), {"request_id": "r1", "max_seconds": None})]
    assert scripted.waits == [7.0]


def test_wait_table_shows_the_outcome(scripted: ScriptedClient) -> None:
    scripted.answers[UUID] = result(outcome="already", action="suspend")
    run = invoke("suspend", UUID.upper(), "--wait")
    assert run.exit_code == 0
    assert "already" in run.stdout and UUID in run.stdout  # the full UUID, never cut short
    assert scripted.sent[0][1] == (UUID,)  # canonical lower-case UUID sent


def test_without_wait_prints_only_the_task_id(scripted: ScriptedClient) -> None:
    run = invoke("resume", "vm1")
    assert (run.exit_code, run.stdout) == (0, "task-1\n")
    assert scripted.waits == []
    run = invoke("unpause", "vm1", "--no-wait", "--json")
    assert json.loads(run.stdout) == {"task_id": "task-2"}


def test_pause_passes_max_seconds_and_ensure_its_target(scripted: ScriptedClient) -> None:
    invoke("pause", "vm1", "--max-seconds", "90")
    invoke("ensure", "vm1", "SUSPENDED".lower())
    assert scripted.sent == [("pause", ("vm1",), {"request_id": None, "max_seconds": 90.0}),
                             ("ensure", ("vm1", "suspended"), {"request_id": None})]


@pytest.mark.parametrize(("error", "code", "text"), [
    (UnknownInstance("unknown instance 'vm1' on host h1"), 2,
     "error: UnknownInstance: unknown instance 'vm1'"),
    (InvalidTransition("cannot resume an instance that is running"), 1,
     "error: InvalidTransition: cannot resume"),
    (create_exception_cls("OddError", "celery.exceptions")("rebuilt by celery"), 1,
     "error: TaskFailed: OddError: rebuilt by celery"),
    (HypervisorUnavailable("libvirtd is down"), 3, "error: HypervisorUnavailable: libvirtd"),
    (CeleryTimeout("timed out"), 3, "error: WorkerTimeout: no worker answered pause vm1 "
                                    "within 120s"),
])
def test_task_errors_map_to_exit_codes(scripted: ScriptedClient, error: Exception, code: int,
                                       text: str) -> None:
    scripted.answers["vm1"] = error
    run = invoke("pause", "vm1", "--wait", "--json")
    assert run.exit_code == code
    assert run.stdout == ""
    assert "error:" in run.stderr and text in run.stderr


def _backend_gave_up() -> RuntimeError:
    try:
        try:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1")
        except redis.ConnectionError as exc:
            raise RuntimeError("Retry limit exceeded") from exc
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("error", [
    OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
    redis.ConnectionError("state store down"),
    redis.TimeoutError("state store slow"),
    _backend_gave_up(),
])
def test_unreachable_services_exit_3(scripted: ScriptedClient, error: Exception) -> None:
    scripted.send_error = error
    run = invoke("suspend", "vm1", "--wait")
    assert run.exit_code == 3 and "error: BrokerUnavailable: " in run.stderr


def test_unexpected_errors_are_not_swallowed(scripted: ScriptedClient) -> None:
    scripted.send_error = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        invoke("suspend", "vm1")


@pytest.mark.parametrize("args", [
    ["pause", "not a name"],
    ["pause", "4dea22b3-1d52-d8f3-2516-782e98ab3fa"],  # one digit short of a UUID
    ["pause", "vm1", "--max-seconds", "0"],
    ["pause", "vm1", "--max-seconds", "many"],
    ["suspend", "vm1", "--request-id", "has space"],
    ["ensure", "vm1", "sideways"],
    ["status", "ok", "../etc"],
    ["history", "vm1", "--limit", "0"],
    ["pause"],
    ["pause", "vm1", "--timeout", "0"],
])
def test_bad_input_exits_2_before_sending(scripted: ScriptedClient, args: list[str]) -> None:
    run = invoke(*args)
    assert run.exit_code == 2, run.output
    assert scripted.sent == []
    assert run.stdout == ""
    [line] = run.stderr.splitlines()
    assert line.startswith("error: InvalidInput: "), line


@pytest.mark.parametrize(("args", "words"), [
    (["pause", "vm1", "--max-seconds", "0"], "--max-seconds must be more than 0 and at most "
                                             "604800 seconds (7 days), got 0\n"),
    (["pause", "vm1", "--max-seconds", "many"], "--max-seconds must be a number of seconds, "
                                                "got 'many'"),
    (["suspend", "vm1", "--request-id", "r" * 5000], "malformed --request-id 'rrr"),
    (["suspend", "vm1", "--request-id", "r" * 5000], "at most 128 characters"),
    (["ensure", "vm1", "sideways"], "unknown TARGET 'sideways'"),
    (["pause", "x" * 5000], "malformed INSTANCE"),
])
def test_messages_name_the_flag_state_the_limit_and_quote_briefly(
        scripted: ScriptedClient, args: list[str], words: str) -> None:
    run = invoke(*args)
    assert run.exit_code == 2 and words in run.stderr, run.stderr
    assert len(run.stderr) < 400  # a 5,000-character argument is not echoed back


def test_version() -> None:
    run = invoke("--version")
    assert run.exit_code == 0 and run.stdout.startswith("dormant ")


def test_bad_configuration_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Client:
        raise ConfigurationError("unknown setting(s) DORMANT_BORKER_URL")

    monkeypatch.setattr(cli, "make_client", broken)
    run = invoke("pause", "vm1")
    assert run.exit_code == 2 and "DORMANT_BORKER_URL" in run.stderr


def test_error_text_with_brackets_is_printed_literally(scripted: ScriptedClient) -> None:
    scripted.answers["vm1"] = InvalidTransition("state [red]odd[/red] and a very long reason " * 5)
    run = invoke("pause", "vm1", "--wait")
    assert run.exit_code == 1
    assert "[red]odd[/red]" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1  # one line a script can grep


# -- status -------------------------------------------------------------------------------------
def _state(name: str, host: str = "h1") -> dict[str, Any]:
    return {"instance": f"uuid-{name}", "name": name, "host": host, "state": "running",
            "reason": ""}


def test_status_of_instances_reports_each_failure_and_exits_non_zero(
        scripted: ScriptedClient) -> None:
    scripted.answers.update(vm1=_state("vm1"), vm2=UnknownInstance("unknown instance 'vm2'"))
    run = invoke("status", "vm1", "vm2", "--json")
    assert run.exit_code == 2  # an unknown instance is bad input
    assert json.loads(run.stdout) == [_state("vm1")]
    assert "error: UnknownInstance: unknown instance 'vm2'" in run.stderr


def test_status_timeout_exits_3(scripted: ScriptedClient) -> None:
    scripted.answers["vm1"] = CeleryTimeout()
    run = invoke("status", "vm1", "--timeout", "2")
    assert run.exit_code == 3 and "no worker answered status vm1 within 2s" in run.stderr


def test_status_of_the_fleet_asks_every_host(scripted: ScriptedClient) -> None:
    scripted.fleet = ["h2", "h1"]
    scripted.answers.update({"host:h1": [_state("b"), _state("a")],
                             "host:h2": [_state("c", "h2")]})
    run = invoke("status", "--json")
    assert run.exit_code == 0
    assert [r["name"] for r in json.loads(run.stdout)] == ["a", "b", "c"]
    table = invoke("status").stdout
    assert "uuid-c" in table and "h2" in table


def test_status_marks_a_guest_whose_real_state_differs_from_the_recorded_one(
        scripted: ScriptedClient) -> None:
    scripted.answers.update(vm1=_state("vm1"), vm2=_state("vm2"), vm3=_state("vm3"))
    scripted.recorded_entries = {
        "uuid-vm1": [{"outcome": "changed", "state_after": "paused", "reason_after": "user"}],
        "uuid-vm2": [{"outcome": "external", "state_after": "running"}],
    }
    rows = json.loads(invoke("status", "vm1", "vm2", "vm3", "--json").stdout)
    assert [(r.get("recorded_state"), r.get("drift")) for r in rows] == [
        ("paused", True), ("running", False), (None, None)]  # vm3: nothing recorded
    table = invoke("status", "vm1", "vm2").stdout
    assert "paused (differs)" in table


def test_history_shows_external_entries_with_libvirts_event(scripted: ScriptedClient) -> None:
    scripted.journal_entries = [
        {"outcome": "external", "source": "event", "event": "suspended", "detail": "ioerror",
         "state_before": "running", "state_after": "paused", "finished_at": 1_700_000_000.0,
         "note": "paused by an I/O error"},
        {"outcome": "external", "source": "reconciliation", "state_before": "paused",
         "state_after": "running", "finished_at": 1_700_000_060.0,
         "note": "noticed by reconciliation"},
    ]
    table = invoke("history", "vm1").stdout
    assert "suspended/ioerror" in table and "paused by an I/O error" in table
    assert "reconciliation" in table and "noticed by reconciliation" in table


def test_status_of_an_empty_registry_exits_3(scripted: ScriptedClient) -> None:
    run = invoke("status")
    assert run.exit_code == 3 and "registry" in run.stderr


def test_status_of_the_fleet_with_a_silent_host_exits_3(scripted: ScriptedClient) -> None:
    scripted.fleet = ["h1", "gone"]
    scripted.answers.update({"host:h1": [_state("a")], "host:gone": CeleryTimeout()})
    run = invoke("status", "--json")
    assert run.exit_code == 3
    assert json.loads(run.stdout) == [_state("a")]
    assert "status of host gone" in run.stderr


# -- history ------------------------------------------------------------------------------------
def test_history_json_and_table(scripted: ScriptedClient) -> None:
    scripted.journal_entries = [
        result(finished_at=1_700_000_000.0, request_id="first"),
        result(action="unpause", outcome="failed", error_type="InvalidTransition",
               finished_at=1_700_000_060.0, request_id="second"),
    ]
    run = invoke("history", "vm1", "--json")
    assert run.exit_code == 0
    assert [e["request_id"] for e in json.loads(run.stdout)] == ["first", "second"]
    table = invoke("history", "vm1", "--limit", "1").stdout
    assert "2023-11-14 22:14:20" in table and "InvalidTransition" in table
    assert "first" not in table


def test_history_of_an_unknown_instance_exits_2(scripted: ScriptedClient) -> None:
    run = invoke("history", "vm9")
    assert run.exit_code == 2 and "error: UnknownInstance: " in run.stderr and "vm9" in run.stderr


# -- the client: routing and the journal, on fakeredis ---------------------------------------------
@dataclass
class Sent:
    id: str
    answer: Any = None
    state: str = "SUCCESS"  # answered at once (what the client's resend loop looks at)

    @property
    def result(self) -> Any:
        return self.answer

    def get(self, **_: Any) -> Any:
        return self.answer


@dataclass
class NoBroadcastReplies:
    """``app.control``: a broadcast nobody answers (no worker without a presence entry)."""

    asked: int = 0

    def inspect(self, timeout: float) -> NoBroadcastReplies:
        self.asked += 1
        return self

    def active_queues(self) -> None:
        return None


@dataclass
class RecordingApp:
    """The part of a Celery app the client uses: send_task, recorded; control, silent."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    control: NoBroadcastReplies = field(default_factory=NoBroadcastReplies)
    answers: dict[str, Any] = field(default_factory=dict)  # task name -> its answer

    def send_task(self, name: str, args: Any = None, kwargs: Any = None,
                  queue: str | None = None, task_id: str | None = None,
                  **options: Any) -> Sent:
        self.sent.append({"name": name, "args": args, "kwargs": kwargs, "queue": queue,
                          **options})
        return Sent(task_id or f"task-{len(self.sent)}", self.answers.get(name))

    def close(self) -> None:
        pass


def present(client: redis.Redis, host: str, node: str = "w1", *, ttl: float = 60) -> None:
    """A live worker's presence entry for ``host`` (what worker/recovery.py keeps)."""
    import time

    from worker.store import keys

    client.zadd(keys.host_workers(host), {node: time.time() + ttl})


@pytest.fixture
def routed(fake_redis, hypervisor, make_domain):  # type: ignore[no-untyped-def]
    """A client whose registry says host h1 serves one test domain, and h1's worker lives."""
    domain = make_domain()
    registry.publish(fake_redis, hypervisor, "h1", interval=60)
    present(fake_redis, "h1")
    app = RecordingApp()
    client = Client(app, fake_redis, Settings(host="cli-test"))  # type: ignore[arg-type]
    return client, app, domain


def test_client_sends_to_the_host_serving_the_instance(routed) -> None:  # type: ignore[no-untyped-def]
    client, app, domain = routed
    client.pause(domain.name(), request_id="r-1", max_seconds=30)
    client.suspend(domain.UUIDString().upper())
    ensured = client.ensure(domain.name(), "running")
    assert [(s["name"], s["queue"]) for s in app.sent] == [
        ("dormant.pause", "dormant.h1"), ("dormant.suspend", "dormant.h1"),
        ("dormant.ensure", "dormant.h1")]
    assert app.sent[0]["kwargs"] == {"request_id": "r-1", "max_seconds": 30.0}
    assert app.sent[1]["args"] == [domain.UUIDString()]
    # No request id given: the first task's id, so that a copy sent again is the same request.
    assert app.sent[2]["kwargs"] == {"target": "running", "request_id": ensured.id}


def test_client_falls_back_to_the_control_queue(routed) -> None:  # type: ignore[no-untyped-def]
    client, app, _ = routed
    client.resume("not-registered")
    client.status(UUID)
    client.status()
    assert [s["queue"] for s in app.sent] == [CONTROL_QUEUE] * 3
    assert app.sent[2]["args"] == []


def test_client_rejects_bad_input_before_sending(routed) -> None:  # type: ignore[no-untyped-def]
    from worker.core.errors import InvalidInput

    client, app, domain = routed
    for call in (lambda: client.pause("bad name"),
                 lambda: client.pause(domain.name(), max_seconds=-1),
                 lambda: client.unpause(domain.name(), request_id=""),
                 lambda: client.ensure(domain.name(), "upside-down")):
        with pytest.raises(InvalidInput):
            call()
    assert app.sent == []


def test_client_asks_every_recent_host_for_the_fleet(routed) -> None:  # type: ignore[no-untyped-def]
    client, app, _ = routed
    assert list(client.status_fleet()) == ["h1"]
    assert app.sent == [{"name": "dormant.status", "args": [], "kwargs": None,
                         "queue": "dormant.h1"}]


def test_client_reads_the_journal_by_name(routed, store) -> None:  # type: ignore[no-untyped-def]
    client, _, domain = routed
    uuid = domain.UUIDString()
    for i in range(3):
        store.journal_only({"instance": uuid, "action": "pause", "request_id": f"r{i}"}, uuid)
    store.journal_only({"instance": "typo", "outcome": "failed"}, "typo")
    assert [e["request_id"] for e in client.journal(domain.name(), limit=2)] == ["r1", "r2"]
    assert client.journal(uuid)[0]["request_id"] == "r0"
    assert client.journal("typo") == [{"instance": "typo", "outcome": "failed"}]
    with pytest.raises(UnknownInstance):
        client.journal("never-seen")


def test_history_command_reads_the_real_journal(routed, store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    client, _, domain = routed
    store.journal_only({"instance": domain.UUIDString(), "action": "suspend",
                        "outcome": "changed", "finished_at": 1_700_000_000.0}, domain.UUIDString())
    monkeypatch.setattr(cli, "make_client", lambda: client)
    run = invoke("history", domain.name(), "--json")
    assert run.exit_code == 0
    assert json.loads(run.stdout)[0]["action"] == "suspend"


def test_client_refuses_a_host_no_live_worker_serves_before_sending(routed) -> None:  # type: ignore[no-untyped-def]
    client, app, domain = routed
    with pytest.raises(InvalidInput, match=r"unknown host 'nosuchhost'.*live hosts: h1"):
        client.drain("nosuchhost", run_id="drain:nosuchhost:1")
    with pytest.raises(InvalidInput, match="unknown host"):
        client.sample("h2")
    with pytest.raises(UnknownInstance, match="no worker has published it"):
        client.drain("h1", run_id="drain:h1:1", instances=["nosuch"])
    with pytest.raises(UnknownInstance):
        client.published(UUID)  # a well-formed UUID no worker has published
    with pytest.raises(InvalidInput, match="unknown run id"):
        client.restore("no:such", restore_id="restore:1")
    assert app.sent == []
    client.drain("h1", run_id="drain:h1:2", instances=[domain.name()])
    assert app.sent == [{"name": "dormant.drain", "args": None, "queue": "dormant.h1",
                         "kwargs": {"run_id": "drain:h1:2",
                                    "instances": [domain.UUIDString()]}}]


# -- issue 22: no silent waits, health in the grammar, small slips ------------------------------
def test_a_wait_with_no_live_worker_exits_3_at_once_and_queues_nothing(
        scripted: ScriptedClient) -> None:
    scripted.dead = {"vm1"}
    run = invoke("pause", "vm1", "--wait")
    assert run.exit_code == 3 and scripted.sent == [] and scripted.waits == []
    [line] = run.stderr.splitlines()
    assert line.startswith("error: NoWorker: no live worker serves host 'h1'"), line


def test_without_wait_the_task_is_queued_and_a_note_says_no_worker_takes_it_yet(
        scripted: ScriptedClient) -> None:
    scripted.dead = {"vm1"}
    run = invoke("suspend", "vm1")
    assert (run.exit_code, run.stdout) == (0, "task-1\n")
    [line] = run.stderr.splitlines()
    assert line.startswith("note: task task-1 is queued, but no live worker serves"), line


def test_waits_watch_the_host_that_serves_the_instance(scripted: ScriptedClient) -> None:
    scripted.answers["vm1"] = result()
    assert invoke("pause", "vm1", "--wait").exit_code == 0
    assert scripted.watched == ["h1"]


def test_status_skips_instances_and_hosts_no_live_worker_serves(
        scripted: ScriptedClient) -> None:
    scripted.dead = {"vm2", "gone"}
    scripted.answers.update(vm1=_state("vm1"))
    run = invoke("status", "vm1", "vm2", "--json")
    assert run.exit_code == 3
    assert json.loads(run.stdout) == [_state("vm1")]
    assert run.stderr.startswith("error: NoWorker: ") and "vm2" in run.stderr
    assert [name for name, *_ in scripted.sent] == ["status"]  # nothing sent for vm2

    scripted.sent.clear()
    scripted.fleet = ["h1", "gone"]
    scripted.answers["host:h1"] = [_state("a")]
    fleet = invoke("status", "--json")
    assert fleet.exit_code == 3 and json.loads(fleet.stdout) == [_state("a")]
    assert "error: NoWorker: no live worker serves host gone" in fleet.stderr
    assert [kw["host"] for _n, _a, kw in scripted.sent] == ["h1"]  # no wait for "gone"


# -- the real client's wait, watching the worker (fakeredis, no broker) -------------------------
@dataclass
class Unanswered:
    """A task no worker answers: get() blocks for its timeout, like Celery's, then gives up."""

    id: str = "t-1"
    gets: int = 0

    def get(self, timeout: float, **_: Any) -> Any:
        import time

        self.gets += 1
        time.sleep(timeout)  # the blocking call being stood in for, not a synchronisation
        raise CeleryTimeout()


@pytest.fixture
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.api.client as client_mod

    monkeypatch.setattr(client_mod, "WORKER_CHECK_EVERY", 0.05)
    monkeypatch.setattr(client_mod, "WAIT_NOTICE_AFTER", 0.1)


@pytest.mark.usefixtures("quick_checks")
def test_a_wait_says_what_it_waits_for_and_times_out_while_a_worker_lives(routed) -> None:  # type: ignore[no-untyped-def]
    from worker.core.errors import WorkerTimeout

    client, _app, _domain = routed
    notices: list[str] = []
    with pytest.raises(WorkerTimeout, match=r"no worker answered pause vm1 within 0.4s"):
        client.wait(Unanswered(), 0.4, "pause vm1", watch=True, host="h1",
                    notice=notices.append)
    assert notices == ["waiting for pause vm1 (task t-1, host h1; at most 0.4s)"]


@pytest.mark.usefixtures("quick_checks")
def test_a_wait_ends_with_no_worker_as_soon_as_the_hosts_worker_is_gone(routed) -> None:  # type: ignore[no-untyped-def]
    import time

    from worker.store import keys

    client, app, _domain = routed
    client.state.delete(keys.host_workers("h1"))  # its presence lapsed: the worker died
    started = time.monotonic()
    pending = Unanswered()
    with pytest.raises(NoWorker, match=r"no live worker serves host h1 any more: pause vm1 "
                                       r"is not done \(task t-1 stays queued"):
        client.wait(pending, 600, "pause vm1", watch=True, host="h1")
    assert time.monotonic() - started < 5 and pending.gets == 1
    assert app.control.asked == 1  # presence found none: one broadcast asked, unanswered


def test_hosts_are_unknown_or_without_a_worker_and_the_live_ones_are_named(routed) -> None:  # type: ignore[no-untyped-def]
    from worker.store import keys

    client, app, domain = routed
    client.state.zadd(keys.HOSTS, {"h2": 0})  # h2 published once; its worker is gone
    with pytest.raises(NoWorker, match=r"no live worker serves host 'h2'; live hosts: h1"):
        client.live_host("h2")
    with pytest.raises(InvalidInput, match=r"unknown host 'h3'.*live hosts: h1"):
        client.live_host("h3")
    assert client.live_host("h1") == "h1" and client.require_worker(domain.name()) == "h1"
    client.state.delete(keys.host_workers("h1"))
    with pytest.raises(NoWorker, match=r"serves host 'h1' \(which serves .*live hosts: none"):
        client.require_worker(domain.name())
    with pytest.raises(NoWorker, match=r"dormant\.control"):
        client.require_worker("never-published")
    assert app.sent == []


def test_a_worker_without_a_presence_entry_is_found_by_a_broadcast(routed) -> None:  # type: ignore[no-untyped-def]
    from worker.store import keys

    client, app, _domain = routed

    class Answers(NoBroadcastReplies):
        def active_queues(self) -> dict[str, list[dict[str, str]]]:  # type: ignore[override]
            return {"w9@x": [{"name": "dormant.h1"}, {"name": CONTROL_QUEUE}]}

    app.control = Answers()
    client.state.delete(keys.host_workers("h1"))
    assert client.serving("h1") == ["w9@x"] and client.serving(None) == ["w9@x"]


@pytest.fixture
def fleet_cli(routed, monkeypatch):  # type: ignore[no-untyped-def]
    """Every command on the real client over fakeredis: registry h1 (live) and a broker that
    only records what is sent."""
    import worker.cli.reclaim as cr

    client, app, domain = routed
    client.close = lambda: None
    monkeypatch.setattr(cr, "make_client", lambda: client)
    monkeypatch.setattr(cli, "make_client", lambda: client)
    return client, app, domain


@pytest.mark.parametrize("args", [
    ["sample"], ["sample", "--host", "h1"], ["drain", "h1"], ["reclaim", "--dry-run"],
    ["reclaim", "--host", "h1"], ["idle"], ["idle", "DOMAIN"], ["status"],
    ["pause", "DOMAIN", "--wait"], ["restore", "drain:h1:1"],
])
def test_every_command_that_needs_a_worker_says_no_worker_at_once(fleet_cli,
                                                                  args: list[str]) -> None:  # type: ignore[no-untyped-def]
    from worker.reclaim import run_store
    from worker.store import keys

    client, app, domain = fleet_cli
    run_store.create(client.state, "drain:h1:1", {"run_id": "drain:h1:1", "kind": "drain",
                                             "host": "h1", "status": "done"}, [], queue=[],
                ttl=60)
    client.state.delete(keys.host_workers("h1"))  # h1's worker is gone
    run = invoke(*[domain.name() if a == "DOMAIN" else a for a in args])
    assert run.exit_code == 3, run.output
    assert app.sent == []
    [line] = run.stderr.splitlines()
    assert line.startswith("error: NoWorker: ") and "h1" in line, line


def test_commands_with_an_empty_registry_say_no_worker(fleet_cli) -> None:  # type: ignore[no-untyped-def]
    from worker.store import keys

    client, app, _domain = fleet_cli
    client.state.delete(keys.HOSTS)
    for args in (["sample"], ["idle"], ["reclaim"], ["status"]):
        run = invoke(*args)
        assert run.exit_code == 3 and run.stderr.startswith("error: NoWorker: "), (args,
                                                                                  run.output)
    assert app.sent == []


def test_sample_is_sent_to_expire_with_the_commands_timeout(fleet_cli) -> None:  # type: ignore[no-untyped-def]
    _client, app, _domain = fleet_cli
    app.answers["dormant.sample"] = {"host": "h1", "stored": 1, "at": 0}
    run = invoke("sample", "--host", "h1", "--timeout", "7", "--json")
    assert run.exit_code == 0 and json.loads(run.stdout) == [app.answers["dormant.sample"]]
    assert app.sent[0]["name"] == "dormant.sample" and app.sent[0]["expires"] == 7.0


def test_drains_of_the_same_second_are_two_runs_each_remembered_as_queued(fleet_cli) -> None:  # type: ignore[no-untyped-def]
    from worker.reclaim import run_store

    client, app, domain = fleet_cli
    first = client.drain("h1", run_id=run_store.drain_id("h1", 0), instances=[domain.name()])
    second = client.drain("h1", run_id=run_store.drain_id("h1", 0), instances=[domain.name()])
    ids = [s["kwargs"]["run_id"] for s in app.sent]
    assert len(set(ids)) == 2
    assert [run_store.queued(client.state, rid)["task_id"] for rid in ids] == [first.id, second.id]


# -- health ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def settings_read_afresh() -> Any:
    """``health`` reads the process-wide settings (cached): each test sees its own."""
    from worker.core import settings

    settings.get.cache_clear()
    yield
    settings.get.cache_clear()


def test_health_with_a_bad_setting_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DORMANT_IDLE_CPU_QUANTILE", "2")
    run = invoke("health")
    assert run.exit_code == 2 and run.stdout == ""
    [line] = run.stderr.splitlines()
    assert line.startswith("error: ConfigurationError: DORMANT_IDLE_CPU_QUANTILE=2"), line


@pytest.mark.parametrize(("value", "words"), [
    ("0", "must be more than 0 seconds, got 0"), ("-1", "must be more than 0 seconds, got -1"),
    ("nan", "got nan"), ("inf", "finite"), ("soon", "must be a number of seconds, got 'soon'"),
])
def test_every_timeout_must_be_more_than_0(value: str, words: str) -> None:
    for command in (["health"], ["status"], ["pause", "vm1"], ["drain", "h1"],
                    ["sample"], ["restore", "r:1"]):
        run = invoke(*command, "--timeout", value)
        assert run.exit_code == 2, (command, run.output)
        [line] = run.stderr.splitlines()
        assert line == f"error: InvalidInput: Invalid value for '--timeout': {words}" or \
            (line.startswith("error: InvalidInput: Invalid value for '--timeout': ")
             and words in line), line


def test_health_names_the_failed_check_with_a_documented_type(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DORMANT_LIBVIRT_URI", "qemu+unix:///system?socket=/nonexistent/sock")
    run = invoke("health", "--json")
    assert run.exit_code == 3
    assert json.loads(run.stdout)[0]["ok"] is False
    [line] = run.stderr.splitlines()  # no log line, no second line
    assert line.startswith("error: HypervisorUnavailable: libvirtd: "), line


def test_health_of_a_working_hypervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DORMANT_LIBVIRT_URI", "test:///default")
    run = invoke("health", "--json", "--timeout", "5")
    assert run.exit_code == 0 and run.stderr == "", run.output
    assert json.loads(run.stdout)[0]["ok"] is True


# -- small slips --------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["ensure", "vm1"], ["cancel"], ["restore"],
                                  ["kill-switch", "maybe"]])
def test_click_usage_errors_are_one_line(args: list[str]) -> None:
    run = invoke(*args)
    assert run.exit_code == 2
    [line] = run.stderr.splitlines()
    assert line.startswith("error: InvalidInput: "), line


def test_malformed_run_ids_are_cut_and_their_length_stated(scripted: ScriptedClient) -> None:
    for command in ("restore", "cancel"):
        run = invoke(command, "x" * 300)
        assert run.exit_code == 2
        [line] = run.stderr.splitlines()
        assert line.startswith("error: InvalidInput: malformed run id 'xxx")
        assert "... (300 characters)" in line and len(line) < 250, line


def test_a_cut_value_states_its_own_length() -> None:
    from worker.core.validation import QUOTE_MAX, given, quote

    assert quote("r" * 5000).endswith("... (5000 characters)")
    assert len(quote("r" * 5000)) < QUOTE_MAX + 30
    assert quote("short") == "'short'" and given("0") == "0"
    assert given("9" * 200).endswith("... (200 characters)")


def _an_open_run(client: Client, rid: str = "hv:run") -> None:
    from worker.reclaim import run_store

    run_store.create(client.state, rid, {"run_id": rid, "kind": "reclaim", "host": "h1",
                                    "status": "acting"}, [], queue=["u1", "u2"], ttl=60)


def test_following_a_run_says_what_it_waits_for_then_times_out(
        fleet_cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import time

    import worker.cli.reclaim as cr

    client, _app, _domain = fleet_cli
    monkeypatch.setattr(cr, "WAIT_NOTICE_AFTER", 0.1)
    _an_open_run(client)
    with pytest.raises(SystemExit) as exited:
        cr._follow(client, "hv:run", deadline=time.monotonic() + 0.6)
    assert exited.value.code == 3
    notes, error = capsys.readouterr().err.strip().splitlines()
    assert notes == "note: waiting for run hv:run on host h1 to finish (0 of 2 action(s) done)"
    assert error.startswith("error: WorkerTimeout: run hv:run is still going")
    assert "`dormant cancel hv:run` stops it" in error


def test_following_a_run_stops_when_its_hosts_worker_is_gone(
        fleet_cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import time

    import worker.cli.reclaim as cr
    from worker.store import keys

    client, _app, _domain = fleet_cli
    monkeypatch.setattr(cr, "WORKER_CHECK_EVERY", 0.05)
    _an_open_run(client)
    client.state.delete(keys.host_workers("h1"))
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        cr._follow(client, "hv:run", deadline=started + 600)
    assert exited.value.code == 3 and time.monotonic() - started < 5
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: NoWorker: no live worker serves host h1 any more: run "
                            "hv:run is not finished (0 of 2 action(s))")
