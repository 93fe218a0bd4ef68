"""The one Redis error boundary: every module's commands, pipelines and scripts turn an outage
into the transient StateStoreUnavailable; other Redis errors stay bugs."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis

from tests.unit.conftest import FakeStateRedis
from worker.core import metrics
from worker.core.errors import StateStoreFull, StateStoreUnavailable
from worker.fleet import registry
from worker.reclaim import exemptions, killswitch, marks, run_store, sampling, ticks
from worker.reclaim.sampling import Sample
from worker.store import connection
from worker.store.connection import Boundary, StateRedis, connect

SAMPLE = Sample(t=100.0, state="running", cpu_ns=1, vcpus=1, rx=0, tx=0, rd=0, wr=0)

CALLS: dict[str, Callable[[Any], Any]] = {
    "run_store.load (command)": lambda c: run_store.load(c, "r1"),
    "run_store.create (transaction)": lambda c: run_store.create(c, "r1", {"run_id": "r1"}, [],
                                                       queue=["a"], ttl=60),
    "run_store.record (Lua script)": lambda c: run_store.record(c, "r1", "a", {}, suspended=True,
                                                      ttl=60),
    "sampling.store (pipeline)": lambda c: sampling.store(c, "h", [("u", "n", SAMPLE)],
                                                          window=600, now=100.0),
    "sampling.load (pipeline)": lambda c: sampling.load(c, ["u"], since=0),
    "registry.hosts": lambda c: registry.hosts(c),
    "registry.resolve": lambda c: registry.resolve(c, "web-1"),
    "killswitch.disabled_reason": lambda c: killswitch.disabled_reason(c, enabled_setting=True),
    "exemptions.add": lambda c: exemptions.add(c, "u"),
    "marks.load": lambda c: marks.load(c, ["u"]),
    "ticks.claim": lambda c: ticks.claim(c, "s:1", ttl=5),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_an_outage_is_the_transient_state_store_error_everywhere(
        fake_redis: FakeStateRedis, call: Callable[[Any], Any]) -> None:
    call(fake_redis)  # works while Redis is up
    fake_redis.server.connected = False
    with pytest.raises(StateStoreUnavailable, match="state store unavailable"):
        call(fake_redis)
    fake_redis.server.connected = True
    call(fake_redis)  # and again once it is back: nothing was left broken


def test_other_redis_errors_are_not_outages(fake_redis: FakeStateRedis) -> None:
    fake_redis.set("dormant:exempt", "not a set")
    with pytest.raises(redis.ResponseError):
        fake_redis.sadd("dormant:exempt", "u")


def test_connect_gives_the_boundary_client_with_verified_tls() -> None:
    plain = connect("redis://127.0.0.1:1/2")
    assert isinstance(plain, StateRedis)
    assert "ssl_cert_reqs" not in plain.connection_pool.connection_kwargs
    secure = connect("rediss://redis.example:6380/2", tls_ca="/etc/ca.pem")
    options = secure.connection_pool.connection_kwargs
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED and options["ssl_check_hostname"]
    assert options["ssl_ca_certs"] == "/etc/ca.pem"


def test_a_refused_connection_is_unavailable_after_redis_py_retries() -> None:
    client = connect("redis://127.0.0.1:1/2")  # nothing listens on port 1
    with pytest.raises(StateStoreUnavailable):
        client.get("x")
    with pytest.raises(StateStoreUnavailable), client.pipeline() as pipe:
        pipe.get("x")
        pipe.execute()


def test_no_module_opens_a_redis_client_of_its_own() -> None:
    """Every state-store client comes from worker.store.connection, the boundary: no other
    module of worker/ or tasks/ builds a redis.Redis (Celery's broker and backend are Celery's)."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[3]
    opened = []
    for path in [*root.glob("worker/**/*.py"), *root.glob("tasks/*.py")]:
        if path.relative_to(root).as_posix() == "worker/store/connection.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                if called.endswith(("Redis", "Redis.from_url", "StrictRedis", "from_url",
                                    "ConnectionPool")):
                    opened.append(f"{path.relative_to(root)}:{node.lineno} {called}")
    assert opened == []


class _RefusesWrites:
    """Answers writes as a Redis at maxmemory with noeviction does (reads still work)."""

    full = False

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.full and str(args[0]).upper() in {"SET", "SADD", "XADD", "HSET", "ZADD"}:
            raise redis.exceptions.OutOfMemoryError(
                "command not allowed when used memory > 'maxmemory'.")
        return super().execute_command(*args, **options)  # type: ignore[misc]


class _FullableRedis(Boundary, _RefusesWrites, fakeredis.FakeRedis):
    pass


def test_a_full_redis_is_the_transient_state_store_full_error_counted_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    client = _FullableRedis(decode_responses=True)
    before = metrics.STATE_STORE_FULL._value.get()
    exemptions.add(client, "u")
    client.full = True
    connection._last_full_log[0] = 0.0
    with caplog.at_level(logging.ERROR, logger="dormant.store"), \
            pytest.raises(StateStoreFull, match="state store full"):
        exemptions.add(client, "v")
    assert isinstance(StateStoreFull(""), StateStoreUnavailable)  # retried like an outage
    assert exemptions.contains(client, "u")  # reads still answer
    assert metrics.STATE_STORE_FULL._value.get() == before + 1
    assert [r.message for r in caplog.records if "state store full" in r.message]
    client.full = False
    exemptions.add(client, "v")
    assert exemptions.contains(client, "v")
