"""Fixtures shared by the whole suite.

Integration fixtures start *real* services: a private ``redis-server`` per test session,
``celery -A tasks worker`` processes and tiny KVM guests on the local ``libvirtd``
(``qemu:///system``). Where a service is missing they skip with the reason, except in CI
(``CI=true``), where a missing service fails the test: CI never skips silently.

The broker is that Redis, or for tests marked ``both_brokers`` each in turn that Redis and a
private ``rabbitmq-server`` node (tests/support/rabbit.py), started once per session when a
test first needs it. The state store and the result backend stay on Redis either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.rabbit import RabbitServer
from tests.support.services import (
    RedisServer,
    WorkerProcess,
    answers_ping,
    free_port,
    new_workdir,
    test_env,
    unique,
    wait_until,
)

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
WORKERS_KEY = pytest.StashKey[list[WorkerProcess]]()


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere, always with the reason."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if report.failed:
        for worker in item.stash.get(WORKERS_KEY, []):
            report.sections.append((f"worker {worker.nodename} log", worker.log()[-20000:]))


# -- Redis ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=new_workdir("dormant-redis-"))
    try:
        server.start()
    except (FileNotFoundError, TimeoutError) as exc:
        unavailable(str(exc))
    yield server
    server.stop()


@pytest.fixture
def redis_clean(redis_server: RedisServer) -> RedisServer:
    """The private Redis, emptied before the test."""
    if not redis_server._answers():
        redis_server.start()
    redis_server.flush()
    return redis_server


# -- RabbitMQ and the choice of broker ------------------------------------------------------
BROKERS = ("redis", "rabbitmq")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``both_brokers`` runs once per broker (its ids end in [redis] and
    [rabbitmq])."""
    if metafunc.definition.get_closest_marker("both_brokers") \
            and "broker_kind" in metafunc.fixturenames:
        metafunc.parametrize("broker_kind", BROKERS, indirect=True)


@pytest.fixture
def broker_kind(request: pytest.FixtureRequest) -> str:
    """"redis" unless the test is marked ``both_brokers`` (then each in turn)."""
    return str(getattr(request, "param", "redis"))


@pytest.fixture(scope="session")
def rabbit_server() -> Iterator[RabbitServer]:
    server = RabbitServer(port=free_port(), workdir=new_workdir("dormant-rabbit-"))
    try:
        server.start()
    except (FileNotFoundError, TimeoutError, RuntimeError) as exc:
        server.stop()
        unavailable(str(exc))
    yield server
    server.stop()


@pytest.fixture
def rabbit_clean(rabbit_server: RabbitServer) -> RabbitServer:
    """The private RabbitMQ node, running (a test may have killed it). Queues are not
    emptied: every test has a queue of its own (its host name)."""
    if not rabbit_server.answers():
        rabbit_server.start()
    return rabbit_server


@pytest.fixture
def broker_url(request: pytest.FixtureRequest, broker_kind: str, redis_clean: RedisServer) -> str:
    """The broker URL workers and clients of this test use."""
    if broker_kind == "rabbitmq":
        return request.getfixturevalue("rabbit_clean").url()  # type: ignore[no-any-return]
    return redis_clean.url(0)


# -- libvirt ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def libvirt_conn():  # type: ignore[no-untyped-def]
    import libvirt

    from tests.support.guests import remove_leftovers

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd (qemu:///system) is not reachable: {exc}")
    remove_leftovers(conn)
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


@pytest.fixture
def guests(libvirt_conn):  # type: ignore[no-untyped-def]
    """Factory of tiny real guests, all removed afterwards (also when the test fails)."""
    from tests.support.guests import GuestFactory
    from tests.support.journal import revive

    revive(libvirt_conn)  # a libvirtd restarted by an earlier test (or a neighbour) broke it
    factory = GuestFactory(libvirt_conn)
    yield factory
    factory.cleanup()


@pytest.fixture
def linux_guests(libvirt_conn):  # type: ignore[no-untyped-def]
    """Factory of real Linux guests (KVM where a stock kernel boots, else TCG), all removed."""
    from tests.support.linux_guest import LinuxGuestFactory, Unavailable

    try:
        factory = LinuxGuestFactory(libvirt_conn)
    except Unavailable as exc:
        unavailable(str(exc))
    yield factory
    factory.cleanup()


@pytest.fixture
def save_directory(libvirt_conn):  # type: ignore[no-untyped-def]
    """``save_directory(size_mib)``: a small loop-mounted filesystem that the save images of
    the guests a test routes there land on (tests/support/save_dir.py). Those guests are
    removed and the filesystem unmounted afterwards, also when the test fails."""
    from tests.support.journal import revive
    from tests.support.save_dir import SaveDirectory, remove_leftovers

    if os.geteuid() != 0:
        unavailable("a loop-mounted save directory needs root")
    remove_leftovers()
    made: list[SaveDirectory] = []

    def make(size_mib: int) -> SaveDirectory:
        made.append(SaveDirectory(size_mib))
        return made[-1].open()

    yield make
    revive(libvirt_conn)
    for directory in made:
        directory.close(libvirt_conn)


# -- Celery workers --------------------------------------------------------------------------
@pytest.fixture
def host_name() -> str:
    """A unique DORMANT_HOST per test, so its queue dormant.<host> is private to it."""
    return unique("test-host-")


@pytest.fixture
def dormant_env(redis_clean: RedisServer, host_name: str, broker_url: str) -> dict[str, str]:
    return test_env(redis_clean, host_name, DORMANT_BROKER_URL=broker_url)


@pytest.fixture
def start_worker(request: pytest.FixtureRequest, redis_clean: RedisServer, broker_url: str,
                 host_name: str, tmp_path) -> Iterator[Callable[..., WorkerProcess]]:  # type: ignore[no-untyped-def]
    """Start ``celery -A tasks worker`` processes; stopped (SIGTERM, then SIGKILL) afterwards.

    ``start_worker(pool="prefork", concurrency=2, env={...}, args=[...], wait=True)``
    """
    started: list[WorkerProcess] = []
    request.node.stash[WORKERS_KEY] = started

    def start(*, pool: str = "prefork", concurrency: int = 2, env: dict[str, str] | None = None,
              args: list[str] | None = None, host: str | None = None,
              wait: bool = True) -> WorkerProcess:
        name = unique("w")
        environment = test_env(redis_clean, host or host_name,
                               **{"DORMANT_BROKER_URL": broker_url, **(env or {})})
        worker = WorkerProcess(
            name=name, env=environment, log_path=tmp_path / f"{name}.log",
            args=["-P", pool, "-c", str(concurrency), *(args or [])],
        )
        worker.start()
        started.append(worker)
        if wait:
            wait_for_worker(worker, redis_clean, broker=environment["DORMANT_BROKER_URL"])
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_for_worker(worker: WorkerProcess, redis_server: RedisServer, timeout: float = 60,
                    *, broker: str | None = None) -> None:
    """Ready means it answers a broadcast ping by name (through ``broker``, else the Redis)."""
    app = redis_server.celery_client(broker=broker)

    def answered() -> bool:
        if not worker.alive():
            raise RuntimeError(f"worker {worker.nodename} exited:\n{worker.log()[-5000:]}")
        return answers_ping(app, worker.nodename)

    wait_until(answered, timeout=timeout, interval=0.2, message=f"worker {worker.nodename} ping")


@pytest.fixture
def client_app(redis_clean: RedisServer, broker_url: str):  # type: ignore[no-untyped-def]
    app = redis_clean.celery_client(broker=broker_url)
    yield app
    app.close()
