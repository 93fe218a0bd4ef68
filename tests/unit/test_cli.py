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
    hosts: list[str] = field(default_factory=list)
    send_error: Exception | None = None
    journal_entries: list[dict[str, Any]] = field(default_factory=list)
    recorded_entries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sent: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    waits: list[float | None] = field(default_factory=list)
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
        return {h: self.status(host=h) for h in self.hosts}

    def wait(self, result: FakeResult, timeout: float | None = 60, what: str = "") -> Any:
        """The real client's wait: its translation of timeouts and foreign errors."""
        self.waits.append(timeout)
        return Client.wait(self, result, timeout, what)  # type: ignore[arg-type]

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
                                             "604800 seconds (7 days), got 0.0"),
    (["pause", "vm1", "--max-seconds", "many"], "'--max-seconds'"),
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
    scripted.hosts = ["h2", "h1"]
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
    scripted.hosts = ["h1", "gone"]
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
class RecordingApp:
    """The part of a Celery app the client uses: send_task, recorded."""

    sent: list[dict[str, Any]] = field(default_factory=list)

    def send_task(self, name: str, args: Any = None, kwargs: Any = None,
                  queue: str | None = None, task_id: str | None = None) -> FakeResult:
        self.sent.append({"name": name, "args": args, "kwargs": kwargs, "queue": queue})
        return FakeResult(id=task_id or f"task-{len(self.sent)}", outcome=None)

    def close(self) -> None:
        pass


@pytest.fixture
def routed(fake_redis, hypervisor, make_domain):  # type: ignore[no-untyped-def]
    """A client whose registry says host h1 serves one test domain."""
    domain = make_domain()
    registry.publish(fake_redis, hypervisor, "h1", interval=60)
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
