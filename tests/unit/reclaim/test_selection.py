"""Reclamation selection and safety with plain data; runs, marks and the kill switch on
fakeredis; the grace webhook against a real local HTTP server."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.webhook import WebhookReceiver
from worker.core.errors import InvalidInput
from worker.reclaim import exemptions, killswitch, marks, notify, run_store, selection, ticks
from worker.reclaim.idle import Decision, IdlePolicy
from worker.reclaim.sampling import Sample
from worker.reclaim.selection import Candidate, Mark, Safety, Verdict
from worker.store import keys

NOW = 1_800_000_000.0
IDLE = Decision("u", True, "idle: CPU < 3% per vCPU in 100.0% of intervals", {"intervals": 20})
BUSY = Decision("u", False, "not idle: CPU < 3% per vCPU in 0.0% of intervals", {"intervals": 20})
FEW = Decision("u", False, "not idle: too few usable intervals (2 < 12 needed)", {"intervals": 2})


def cand(uuid: str = "u1", *, decision: Decision = IDLE, state: str = "running",
         first_seen: float | None = NOW - 2 * 86400, **kw) -> Candidate:
    return Candidate(uuid=uuid, name=f"vm-{uuid}", state=state, decision=decision,
                     first_seen=first_seen, **kw)


def judge(c: Candidate, safety: Safety | None = None, run_id: str = "h:2026-11-27"):
    [entry] = selection.select([c], safety or Safety(), now=NOW, run_id=run_id).entries
    return entry


# -- select ----------------------------------------------------------------------------------
def test_idle_old_running_instance_is_suspended_with_the_decision_reason_and_numbers():
    e = judge(cand())
    assert e.verdict is Verdict.SUSPEND
    assert e.reason == IDLE.reason
    assert e.numbers["intervals"] == 20 and e.numbers["age_s"] == 2 * 86400


@pytest.mark.parametrize(("decision", "verdict"), [(BUSY, Verdict.KEEP), (FEW, Verdict.KEEP)])
def test_not_idle_is_kept_with_the_policy_reason(decision, verdict):
    e = judge(cand(decision=decision))
    assert e.verdict is verdict and e.reason == decision.reason and not e.unmark


@pytest.mark.parametrize("state", ["paused", "suspended", "shutoff", "crashed"])
def test_only_running_instances_are_reclaimed(state):
    e = judge(cand(state=state))
    assert e.verdict is Verdict.NOT_RUNNING and state in e.reason


@pytest.mark.parametrize(("meta", "cli", "says"), [
    (True, False, "domain metadata"), (False, True, "dormant exempt"),
    (True, True, "domain metadata and dormant exempt")])
def test_exemptions_win_over_idleness(meta, cli, says):
    e = judge(cand(exempt_metadata=meta, exempt_cli=cli))
    assert e.verdict is Verdict.EXEMPT and says in e.reason


@pytest.mark.parametrize(("age", "verdict"), [
    (None, Verdict.TOO_YOUNG), (86399.0, Verdict.TOO_YOUNG), (86400.0, Verdict.SUSPEND)])
def test_minimum_age_is_inclusive_and_never_seen_is_too_young(age, verdict):
    first = None if age is None else NOW - age
    e = judge(cand(first_seen=first), Safety(min_age=86400))
    assert e.verdict is verdict
    if verdict is Verdict.TOO_YOUNG:
        assert "minimum age" in e.reason


def test_kill_switch_turns_every_suspend_into_disabled_with_the_reason():
    safety = Safety(disabled_reason="kill switch on: set by ops")
    plan = selection.select([cand("a"), cand("b", decision=BUSY)], safety, now=NOW, run_id="r")
    assert [e.verdict for e in plan.entries] == [Verdict.DISABLED, Verdict.KEEP]
    assert "kill switch on: set by ops" in plan.entries[0].reason
    assert plan.to_suspend == []


def test_an_idle_guest_libvirt_cannot_save_is_reported_not_tried_nor_marked():
    reason = "Requested operation is not valid: cannot migrate domain: ... 'ivshmem'"
    e = judge(cand(unsavable=reason), Safety(grace=True))
    assert e.verdict is Verdict.CANNOT_SAVE and reason in e.reason
    assert e.reason.startswith(IDLE.reason)
    assert judge(cand(unsavable=reason, decision=BUSY)).verdict is Verdict.KEEP  # busy: as ever
    plan = selection.select([cand("a", unsavable=reason)], Safety(), now=NOW, run_id="r")
    assert plan.to_suspend == []


def test_grace_marks_first_waits_out_the_period_then_suspends():
    safety = Safety(grace=True, grace_period=3600)
    assert judge(cand(), safety).verdict is Verdict.MARK
    fresh = Mark(run_id="h:2026-11-26", at=NOW - 3599)
    assert judge(cand(mark=fresh), safety).verdict is Verdict.MARK
    old = Mark(run_id="h:2026-11-26", at=NOW - 3600)
    e = judge(cand(mark=old), safety)
    assert e.verdict is Verdict.SUSPEND and "marked 3600 s ago" in e.reason


def test_grace_never_suspends_in_the_run_that_marked():
    safety = Safety(grace=True, grace_period=0)
    e = judge(cand(mark=Mark(run_id="h:2026-11-27", at=NOW - 10)), safety, run_id="h:2026-11-27")
    assert e.verdict is Verdict.MARK


def test_an_instance_that_became_active_or_exempt_is_unmarked():
    mark = Mark(run_id="old", at=NOW - 86400)
    busy = judge(cand(decision=BUSY, mark=mark), Safety(grace=True))
    assert busy.verdict is Verdict.KEEP and busy.unmark and "mark removed" in busy.reason
    exempt = judge(cand(mark=mark, exempt_cli=True), Safety(grace=True))
    assert exempt.unmark
    assert not judge(cand(decision=BUSY), Safety(grace=True)).unmark


def test_plan_counts_and_order():
    plan = selection.select([cand("a"), cand("b", decision=BUSY), cand("c", state="paused"),
                      cand("d")], Safety(), now=NOW, run_id="r")
    assert [e.instance for e in plan.to_suspend] == ["a", "d"]
    assert plan.counts() == {"suspend": 2, "keep": 1, "not_running": 1}
    assert json.loads(json.dumps(plan.entries[0].as_dict()))["verdict"] == "suspend"


# -- metadata, scope, request ids ----------------------------------------------------------------
@pytest.mark.parametrize(("xml", "exempt"), [
    (None, False), ("", False),
    (selection.metadata_element(exempt=True), True),
    (selection.metadata_element(exempt=False), False),
    ('<policy xmlns="https://dormant.dev/xmlns/1" exempt="YES"/>', True),
    ('<policy xmlns="https://dormant.dev/xmlns/1"/>', False)])
def test_metadata_exemption(xml, exempt):
    assert selection.metadata_exempt(xml) is exempt


def test_unreadable_metadata_raises_so_the_caller_keeps_the_instance():
    with pytest.raises(ValueError, match="unreadable"):
        selection.metadata_exempt("<policy exempt=")


def test_scope_is_a_glob_and_empty_means_everything():
    assert selection.in_scope("web-1", "")
    assert selection.in_scope("dormant-test-ab-idle0", "dormant-test-ab-*")
    assert not selection.in_scope("prod-db", "dormant-test-ab-*")


def test_request_ids_are_stable_and_fit_the_contract():
    rid = selection.request_id("h:2026-11-27", "suspend", "u1")
    assert rid == "suspend:h:2026-11-27:u1" == selection.request_id("h:2026-11-27", "suspend", "u1")
    long = selection.request_id("h" * 100, "suspend", "9" * 36)
    assert len(long) <= 128 and long != selection.request_id("g" * 100, "suspend", "9" * 36)


# -- recheck -----------------------------------------------------------------------------------
POLICY = IdlePolicy(min_samples=3, window=60, min_span_fraction=0.1, max_gap=10)


def smp(t: float, cpu: int, state: str = "running", vcpus: int = 1, rx: int = 0) -> Sample:
    return Sample(t=t, state=state, cpu_ns=cpu, vcpus=vcpus, rx=rx, tx=0, rd=0, wr=0)


STORED = [smp(NOW - 10 + i, i * 1000) for i in range(8)]  # ~0 % CPU


def check(before: Sample | None, after: Sample | None, **kw):
    args = {"state": "running", "exempt": "", "disabled_reason": "", "stored": STORED,
            "before": before, "after": after, "policy": POLICY, **kw}
    return selection.recheck("u1", **args)


def test_recheck_passes_for_a_still_idle_instance():
    result = check(smp(NOW, 10_000), smp(NOW + 1, 20_000))
    assert result.ok and result.numbers["recheck_cpu_percent"] == pytest.approx(0.001)


def test_recheck_stops_an_instance_busy_right_now():
    result = check(smp(NOW, 0), smp(NOW + 1, 900_000_000))  # 90 % of a vCPU
    assert not result.ok and "busy at the re-check" in result.reason
    assert result.numbers["recheck_cpu_percent"] == pytest.approx(90)


def test_recheck_threshold_is_strict_and_normalised_per_vcpu():
    at_limit = check(smp(NOW, 0), smp(NOW + 1, 30_000_000))  # exactly 3 % of one vCPU
    assert not at_limit.ok
    four = check(smp(NOW, 0, vcpus=4), smp(NOW + 1, 30_000_000, vcpus=4))  # 0.75 % each
    assert four.ok


def test_recheck_network_activity_counts():
    result = check(smp(NOW, 0), smp(NOW + 1, 0, rx=5000))
    assert not result.ok and "rx" in result.reason


@pytest.mark.parametrize(("kw", "says"), [
    ({"state": "suspended"}, "no longer running"),
    ({"exempt": "dormant exempt"}, "exempt by dormant exempt"),
    ({"disabled_reason": "kill switch on: x"}, "kill switch on: x")])
def test_recheck_refuses_changed_state_exemption_and_kill_switch(kw, says):
    result = check(smp(NOW, 0), smp(NOW + 1, 0), **kw)
    assert not result.ok and says in result.reason


def test_recheck_treats_a_counter_reset_or_missing_sample_as_doubt():
    assert not check(smp(NOW, 5_000_000), smp(NOW + 1, 0)).ok
    assert not check(None, smp(NOW + 1, 0)).ok
    assert not check(smp(NOW, 0, state="paused"), smp(NOW + 1, 0)).ok


def test_recheck_needs_the_window_to_stay_idle():
    busy_history = [smp(NOW - 10 + i, i * 900_000_000) for i in range(8)]
    result = check(smp(NOW, 0), smp(NOW + 1, 1000), stored=busy_history)
    assert not result.ok and "no longer idle" in result.reason


# -- runs in Redis -------------------------------------------------------------------------------
def test_claim_is_once_per_run_but_a_redelivery_keeps_it(fake_redis):
    assert run_store.claim(fake_redis, "h:d", "task-1", ttl=60)
    assert run_store.claim(fake_redis, "h:d", "task-1", ttl=60)  # same task redelivered
    assert not run_store.claim(fake_redis, "h:d", "task-2", ttl=60)  # a second beat
    assert 0 < fake_redis.ttl(keys.run_claim("h:d")) <= 60


def test_report_queue_record_and_manifest(fake_redis):
    entries = [{"instance": u, "name": f"vm-{u}", "verdict": "suspend", "outcome": "pending"}
               for u in ("a", "b", "c")]
    run_store.create(fake_redis, "r1", {"run_id": "r1", "kind": "reclaim", "host": "h",
                                   "status": "acting", "started_at": NOW},
                entries, queue=["a", "b", "c"], ttl=600)
    assert run_store.take(fake_redis, "r1", 2) == ["a", "b"]
    assert run_store.record(fake_redis, "r1", "a", {"outcome": "suspended"}, suspended=True,
                       ttl=600) == (True, 1, 3)
    # A redelivered task records the same entry again: counted once.
    assert run_store.record(fake_redis, "r1", "a", {"outcome": "suspended"}, suspended=True,
                       ttl=600) == (False, 1, 3)
    assert run_store.record(fake_redis, "r1", "b", {"outcome": "failed", "error": "boom"},
                       suspended=False, ttl=600) == (True, 2, 3)
    assert run_store.next_item(fake_redis, "r1") == "c"
    assert run_store.next_item(fake_redis, "r1") is None
    report = run_store.load(fake_redis, "r1")
    assert report["manifest"] == ["a"]
    assert report["todo"] == 3 and report["done"] == 2
    by = {e["instance"]: e for e in report["entries"]}
    assert by["b"]["error"] == "boom" and by["b"]["name"] == "vm-b"
    assert by["c"]["outcome"] == "pending"
    assert run_store.latest(fake_redis) == ["r1"]
    # registered once
    assert run_store._record_script(fake_redis) is run_store._record_script(fake_redis)


def test_kill_switch_from_redis_or_settings(fake_redis):
    assert killswitch.disabled_reason(fake_redis, enabled_setting=True) == ""
    off = killswitch.disabled_reason(fake_redis, enabled_setting=False)
    assert "DORMANT_RECLAIM_ENABLED" in off
    killswitch.turn(fake_redis, True, by="ops", now=NOW)
    assert "set by ops" in killswitch.disabled_reason(fake_redis, enabled_setting=True)
    killswitch.turn(fake_redis, False, by="ops", now=NOW)
    assert killswitch.read(fake_redis) is None


def test_marks_are_created_once(fake_redis):
    assert marks.put(fake_redis, "u1", rid="r1", now=NOW, ttl=60)
    assert not marks.put(fake_redis, "u1", rid="r2", now=NOW + 5, ttl=60)
    assert marks.load(fake_redis, ["u1", "u2"]) == {"u1": Mark("r1", NOW), "u2": None}
    assert marks.clear(fake_redis, "u1")
    assert marks.load(fake_redis, ["u1"]) == {"u1": None}


def test_exemptions_and_tick_claims(fake_redis):
    assert exemptions.add(fake_redis, "u1") and not exemptions.add(fake_redis, "u1")
    assert exemptions.contains(fake_redis, "u1") and exemptions.members(fake_redis) == {"u1"}
    assert exemptions.remove(fake_redis, "u1") and not exemptions.contains(fake_redis, "u1")
    assert ticks.claim(fake_redis, "sample:1", ttl=5)
    assert not ticks.claim(fake_redis, "sample:1", ttl=5)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 101, None, "semi;colon"])
def test_run_ids_are_validated(bad):
    with pytest.raises(InvalidInput):
        run_store.run_id(bad)


def test_run_id_builders():
    import datetime as dt

    assert run_store.nightly_id("h1", dt.date(2026, 11, 27)) == "h1:2026-11-27"
    assert run_store.manual_id("h1", 0, dry_run=True, unique="ab12") == \
        "h1:19700101T000000Z-ab12:dry"
    assert run_store.periodic_id("h1", 0) == "h1:19700101T000000Z"
    assert run_store.run_id(run_store.restore_id(run_store.drain_id("h1", 0), 0))


# -- notify ------------------------------------------------------------------------------------
@pytest.fixture
def webhook():
    receiver = WebhookReceiver("/hook")
    yield receiver.url, receiver
    receiver.stop()


def test_notice_is_posted_as_json(webhook):
    url, hook = webhook
    body = notify.mark_notice(instance="u1", name="vm", host="h", run_id="r", reason="idle",
                              suspend_after=NOW)
    assert notify.post(url, body) == "sent (HTTP 204)"
    assert hook.received == [{"type": "application/json", "body": body}]


def test_failed_notice_is_reported_not_raised(webhook):
    url, hook = webhook
    hook.status = 500
    assert notify.post(url, {"instance": "u1"}) == "failed: HTTP 500"
    assert notify.post("http://127.0.0.1:9/none", {}, timeout=1).startswith("failed:")
    assert notify.post("", {}).startswith("skipped")


# -- beat fan-out (tasks/reclaim.py) ----------------------------------------------------------
class _Ctx:
    def __init__(self, client):
        self.store = type("S", (), {"redis": client})()
        self.host = "ctl"


@pytest.fixture
def fanout(fake_redis, monkeypatch):
    import time as _time

    import tasks.reclaim as tr
    from worker.core.settings import Settings

    settings = Settings(host="ctl", sample_interval=300, reclaim_timezone="Pacific/Kiritimati")
    monkeypatch.setattr(tr, "settings", lambda: settings)
    monkeypatch.setattr(tr, "context", lambda: _Ctx(fake_redis))
    sent: list[tuple[str, dict, str]] = []

    def send_task(name, kwargs=None, queue=None, **_):  # type: ignore[no-untyped-def]
        import types

        sent.append((name, kwargs or {}, queue))
        return types.SimpleNamespace(id=f"task-{len(sent)}")

    monkeypatch.setattr(tr.app, "send_task", send_task)
    fake_redis.zadd(keys.HOSTS, {"kvm-1": _time.time(), "kvm-2": _time.time(),
                                 "gone": _time.time() - 86400})
    return tr, sent


def test_nightly_fan_out_sends_one_run_per_live_host_with_the_local_date(fanout):
    import datetime as dt
    from zoneinfo import ZoneInfo

    tr, sent = fanout
    day = dt.datetime.now(ZoneInfo("Pacific/Kiritimati")).date().isoformat()
    assert tr.reclaim_fleet.run() == [f"kvm-1:{day}", f"kvm-2:{day}"]
    assert sent == [("dormant.reclaim", {"run_id": f"kvm-1:{day}"}, "dormant.kvm-1"),
                    ("dormant.reclaim", {"run_id": f"kvm-2:{day}"}, "dormant.kvm-2")]
    # Known as queued, so `dormant cancel kvm-1:<day>` can stop it before its worker starts.
    queued = run_store.queued(tr.context().store.redis, f"kvm-1:{day}")
    assert queued is not None and (queued["kind"], queued["host"], queued["task_id"]) == (
        "reclaim", "kvm-1", "task-1")


def test_periodic_fan_out_names_each_run_by_the_start_of_its_period(fanout, monkeypatch):
    import dataclasses

    tr, sent = fanout
    every = dataclasses.replace(tr.settings(), reclaim_every=240)
    monkeypatch.setattr(tr, "settings", lambda: every)
    before = time.time()
    sent_ids = tr.reclaim_fleet.run()
    after = time.time()
    starts = {t - t % 240 for t in (before, after)}  # the period may turn during the call
    assert any(sent_ids == [f"kvm-1:{run_store.stamp(t)}", f"kvm-2:{run_store.stamp(t)}"]
               for t in starts)
    assert [queue for _n, _kw, queue in sent] == ["dormant.kvm-1", "dormant.kvm-2"]


def test_sampling_fan_out_runs_once_per_tick_even_with_two_beats(fanout):
    tr, sent = fanout
    assert tr.sample_fleet.run() == 2
    assert tr.sample_fleet.run() == 0  # a second beat process in the same tick
    assert [(name, queue) for name, _kw, queue in sent] == [
        ("dormant.sample", "dormant.kvm-1"), ("dormant.sample", "dormant.kvm-2")]


# -- CLI reading reports and switching the kill switch (no worker needed) -------------------------
@pytest.fixture
def cli(fake_redis, monkeypatch):
    from click.testing import CliRunner

    import worker.cli.reclaim as cr
    from worker.api.client import Client
    from worker.cli import main
    from worker.core.settings import Settings

    class FakeClient(Client):
        """The real client's reads on fakeredis; no broker."""

        def __init__(self):
            super().__init__(None, fake_redis, Settings(host="h"))  # type: ignore[arg-type]

        def close(self):
            pass

    monkeypatch.setattr(cr, "make_client", FakeClient)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def _a_report(client, rid="h:2026-11-27", outcome="suspended"):
    run_store.create(client, rid, {"run_id": rid, "kind": "reclaim", "host": "h", "status": "done",
                              "reason": "1 action(s) finished", "started_at": NOW},
                [{"instance": "u1", "name": "web-1", "verdict": "suspend", "reason": "idle: x",
                  "outcome": outcome, "error": "boom" if outcome == "failed" else None}],
                queue=[], ttl=60)


def test_report_prints_the_newest_run_as_a_table_and_json(cli, fake_redis):
    _a_report(fake_redis)
    table = cli("reclaim", "report")
    assert table.exit_code == 0, table.output
    assert "web-1" in table.output and "suspended" in table.output
    doc = json.loads(cli("reclaim", "report", "h:2026-11-27", "--json").output)
    assert doc["runs"][0]["entries"][0]["outcome"] == "suspended"


def test_report_exit_codes(cli, fake_redis):
    assert cli("reclaim", "report").exit_code == 2  # nothing recorded yet
    unknown = cli("reclaim", "report", "no:such")
    assert unknown.exit_code == 2
    assert "error: InvalidInput: unknown run id 'no:such'" in unknown.output
    assert cli("reclaim", "report", "bad id").exit_code == 2
    # An instance no worker published cannot be exempted (exit 2, nothing written).
    ghost = cli("exempt", "4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
    assert ghost.exit_code == 2 and "error: UnknownInstance:" in ghost.output
    assert exemptions.members(fake_redis) == set()
    _a_report(fake_redis, outcome="failed")
    failed = cli("reclaim", "report", "h:2026-11-27")
    assert failed.exit_code == 1 and "boom" in failed.output


def test_kill_switch_commands(cli, fake_redis):
    assert json.loads(cli("kill-switch", "on", "--json").output)["reclamation"] == "disabled"
    assert killswitch.read(fake_redis) is not None
    status = json.loads(cli("kill-switch", "status", "--json").output)
    assert status["reclamation"] == "disabled" and "kill switch on" in status["reason"]
    assert json.loads(cli("kill-switch", "off", "--json").output)["reclamation"] == "enabled"
    assert cli("kill-switch", "maybe").exit_code == 2


# -- issue 22: run ids per request, the newest reclamation, the fleet's switch, cancel -----------
def test_operator_run_ids_of_the_same_second_differ_and_nightly_ones_do_not():
    import datetime as dt

    same = NOW
    drains = {run_store.drain_id("h1", same) for _ in range(50)}
    assert len(drains) == 50
    assert all(d.startswith("drain:h1:20270115T080000Z-") for d in drains)
    assert run_store.manual_id("h1", same) != run_store.manual_id("h1", same)
    assert run_store.restore_id("drain:h1:x", same) != run_store.restore_id("drain:h1:x", same)
    for rid in (*drains, run_store.manual_id("h1", same, dry_run=True),
                run_store.restore_id("x" * 100, same)):
        assert run_store.run_id(rid) == rid
    # A long source run is cut off the end, never the part that makes the restore unique.
    long_restores = {run_store.restore_id("x" * 100, same) for _ in range(10)}
    assert len(long_restores) == 10
    # The nightly and periodic runs keep one id per host per night (per period).
    day = dt.date(2027, 1, 15)
    assert run_store.nightly_id("h1", day) == run_store.nightly_id("h1", day) == "h1:2027-01-15"
    assert run_store.periodic_id("h1", same) == run_store.periodic_id("h1", same)


def test_a_malformed_run_id_is_quoted_briefly_with_its_true_length():
    with pytest.raises(InvalidInput) as info:
        run_store.run_id("y" * 300)
    message = str(info.value)
    assert "(300 characters)" in message and len(message) < 200


def test_the_newest_run_of_a_kind(fake_redis, monkeypatch):
    monkeypatch.setattr(run_store, "LATEST_PAGE", 2)  # make it read more than one page
    assert run_store.latest_of_kind(fake_redis, "reclaim") is None
    for i, kind in enumerate(["reclaim", "drain", "restore", "drain", "drain"]):
        run_store.create(fake_redis, f"r{i}", {"run_id": f"r{i}", "kind": kind,
                                          "started_at": NOW + i}, [], queue=[], ttl=60)
    assert run_store.latest_of_kind(fake_redis, "reclaim") == "r0"
    assert run_store.latest_of_kind(fake_redis, "drain") == "r4"
    assert run_store.latest(fake_redis) == ["r4"]


def _a_drain(client, rid="drain:h:1", *, status="done", todo=0, done=0):
    run_store.create(client, rid, {"run_id": rid, "kind": "drain", "host": "h", "status": status,
                              "reason": "x", "started_at": NOW + 60},
                [], queue=[f"u{i}" for i in range(todo)], ttl=60)
    for i in range(done):
        run_store.record(client, rid, f"u{i}", {"outcome": "suspended"}, suspended=True, ttl=60)


def test_report_without_an_id_is_the_newest_reclamation_not_a_newer_drain(cli, fake_redis):
    _a_drain(fake_redis)
    none_yet = cli("reclaim", "report")
    assert none_yet.exit_code == 2
    assert none_yet.output.startswith("error: InvalidInput: no reclamation run")
    _a_report(fake_redis)
    _a_drain(fake_redis, "drain:h:2")  # newer than the reclamation
    shown = json.loads(cli("reclaim", "report", "--json").output)["runs"][0]
    assert (shown["run_id"], shown["kind"]) == ("h:2026-11-27", "reclaim")
    drain = json.loads(cli("reclaim", "report", "drain:h:2", "--json").output)["runs"][0]
    assert drain["kind"] == "drain"  # any run by its id


def test_kill_switch_status_is_the_fleets_not_this_commands_setting(cli, fake_redis,
                                                                    monkeypatch):
    import dataclasses

    from worker.api.client import Client

    real_init = Client.__init__

    def disabled_here(self, app, state, settings):  # type: ignore[no-untyped-def]
        real_init(self, app, state, dataclasses.replace(settings, reclaim_enabled=False))

    monkeypatch.setattr(Client, "__init__", disabled_here)
    shown = cli("kill-switch", "--json")  # no ACTION: the status
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.output)
    assert status == {"reclamation": "enabled", "reason": "", "redis": None}
    killswitch.turn(fake_redis, True, by="ops", now=NOW)
    assert json.loads(cli("kill-switch", "--json").output)["reclamation"] == "disabled"
    table = cli("kill-switch")
    assert table.exit_code == 0 and "set by ops" in table.output


def test_cancel_a_run_queued_under_way_or_over(cli, fake_redis):
    unknown = cli("cancel", "drain:h:none")
    assert unknown.exit_code == 2
    assert unknown.output.startswith("error: InvalidInput: unknown run id 'drain:h:none'")
    assert cli("cancel", "bad id!").exit_code == 2

    # Queued, no worker has started it: cancelled at once, and its report says so.
    run_store.note_queued(fake_redis, "drain:h:q", kind="drain", host="h", task_id="t-1", at=NOW,
                     ttl=60)
    queued = json.loads(cli("reclaim", "report", "drain:h:q", "--json").output)["runs"][0]
    assert queued["status"] == "queued" and "t-1" in queued["reason"]
    answer = json.loads(cli("cancel", "drain:h:q", "--json").output)
    assert answer["status"] == "cancelled" and "t-1" in answer["reason"]
    assert run_store.cancelled(fake_redis, "drain:h:q") is not None
    shown = json.loads(cli("reclaim", "report", "drain:h:q", "--json").output)["runs"][0]
    assert shown["status"] == "cancelled"

    # Under way: 1 of 3 actions finished.
    _a_drain(fake_redis, "drain:h:w", status="acting", todo=3, done=1)
    going = json.loads(cli("cancel", "drain:h:w", "--json").output)
    assert going["status"] == "cancelling" and going["reason"].startswith("2 action(s)")
    again = cli("cancel", "drain:h:w", "--json")  # a second cancel keeps the first record
    assert again.exit_code == 0
    assert json.loads(again.output)["cancelled"] == going["cancelled"]

    # Over: nothing left to cancel (exit 1), and the way back is named.
    _a_drain(fake_redis, "drain:h:o", status="done", todo=1, done=1)
    over = cli("cancel", "drain:h:o")
    assert over.exit_code == 1
    assert over.output.startswith("error: InvalidTransition: run drain:h:o is over (done)")
    assert "dormant restore" in over.output
