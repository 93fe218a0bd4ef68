"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

Every command must parse with the real CLI that will run it (Celery's click commands with this
project's app, Flower's option table, the ``dormant`` console script), every ``DORMANT_*``
variable must load through worker.core.settings, and the image must contain every package.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.core import settings as settings_mod

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What an operator exports before `docker compose up` (the compose file requires these).
OPERATOR_ENV = {"REDIS_PASSWORD": "pw", "FLOWER_BASIC_AUTH": "ops:secret"}
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::(?P<op>[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with OPERATOR_ENV exported."""
    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if name in OPERATOR_ENV:
            return OPERATOR_ENV[name]
        if op == "?":
            raise AssertionError(f"compose requires {name}: {arg}")
        return arg or ""
    return _INTERPOLATION.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    entry = service.get("entrypoint") or []
    as_list = lambda part: part.split() if isinstance(part, str) else list(part)  # noqa: E731
    return [interpolate(str(a)) for a in as_list(entry) + as_list(command)]


def celery_services() -> dict[str, list[str]]:
    return {name: command_of(s) for name, s in SERVICES.items()
            if command_of(s)[:1] == ["celery"]}


def by_subcommand(sub: str) -> dict[str, list[str]]:
    return {name: cmd for name, cmd in celery_services().items() if cmd[3:4] == [sub]}


def parse_celery(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``celery ...`` with Celery's own click commands; raise on any bad option."""
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    assert argv[0] == "celery"
    ctx = celery.make_context("celery", list(argv[1:]))
    app_name = ctx.params["app"]
    module = __import__(app_name)  # `-A tasks` must be importable
    ctx.obj = CLIContext(app=module.app, no_color=True, workdir=None)
    name, *rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    sub = celery.get_command(ctx, name)
    assert sub is not None, f"celery has no command {name!r}"
    if name == "flower":  # Flower takes tornado options, not click ones
        from flower.options import options

        known = set(options._options)
        for arg in rest:
            assert arg.startswith("--"), arg
            option = arg[2:].split("=", 1)[0].replace("_", "-")
            assert option in known, f"flower has no option --{option}"
        return name, {}
    return name, sub.make_context(name, list(rest), parent=ctx).params


def healthchecks(program: str) -> list[list[str]]:
    return [[interpolate(a) for a in s["healthcheck"]["test"][1:]] for s in SERVICES.values()
            if s.get("healthcheck", {}).get("test", [None, None])[1] == program]


def test_every_celery_command_and_healthcheck_parses_with_this_project():
    commands = list(celery_services().values()) + healthchecks("celery")
    assert len(commands) >= 4
    for argv in commands:
        assert argv[1:3] == ["-A", "tasks"], argv
        parse_celery(argv)


def test_worker_health_checks_run_dormant_health_with_valid_options():
    from worker.cli import main

    checks = [[interpolate(a) for a in s["healthcheck"]["test"][1:]]
              for name, s in SERVICES.items() if name.startswith("worker-")]
    assert checks
    for argv in checks:
        assert argv[:2] == ["dormant", "health"], argv
        ctx = main.make_context("dormant", list(argv[1:]))
        sub = main.get_command(ctx, "health")
        assert sub is not None
        params = sub.make_context("health", list(argv[2:]), parent=ctx).params
        assert params["node"].startswith("dormant@") and params["timeout"] == 5


def test_the_dormant_service_runs_the_console_script():
    from worker.cli import main

    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["dormant"] == "worker.cli:main"
    tools = [cmd for cmd in (command_of(s) for s in SERVICES.values()) if cmd[:1] == ["dormant"]]
    tools += healthchecks("dormant")
    assert len(tools) >= 3
    for argv in tools:
        ctx = main.make_context("dormant", list(argv[1:]), resilient_parsing=False)
        name, *rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        sub = main.get_command(ctx, name)
        assert sub is not None, argv
        sub.make_context(name, rest, parent=ctx)  # an unknown option raises here


def dockerfile_of(service: dict[str, Any]) -> str:
    build = service["build"]
    return "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")


def test_every_service_is_built_here_and_runs_a_command_of_the_project():
    """No image from a registry but the base: every service builds from this repository."""
    for name, service in SERVICES.items():
        argv = command_of(service)
        assert "build" in service, name
        if dockerfile_of(service) == "Dockerfile":
            assert service["image"] == "dormant:latest"
            assert argv[0] in {"celery", "dormant"}, (name, argv)
        else:
            assert (name, dockerfile_of(service)) == ("redis", "Dockerfile.redis")
            assert " ".join(argv).startswith("sh -c 'exec redis-server "), argv


def test_every_dormant_variable_is_a_setting_and_loads():
    names = {f"DORMANT_{f.upper()}" for f in settings_mod.Settings.__dataclass_fields__}
    for name, service in SERVICES.items():
        env = env_of(service)
        dormant = {k: v for k, v in env.items() if k.startswith("DORMANT_")}
        assert set(dormant) <= names, (name, set(dormant) - names)
        if "build" in service and name != "redis":
            loaded = settings_mod.load(dormant)  # types and ranges, as the service will see
            assert loaded.broker_url.startswith(("redis://", "rediss://"))


def test_redis_persists_and_requires_the_password_the_clients_use():
    redis_service = SERVICES["redis"]
    command = " ".join(command_of(redis_service))
    assert "--appendonly yes" in command
    assert "exec redis-server" in command  # redis-server is the container's process 1
    assert '--requirepass "$REDIS_PASSWORD"' in command
    # A limit, so noeviction means "refuse writes" (dormant retries) rather than grow until
    # the machine's OOM killer takes Redis.
    assert '--maxmemory "$REDIS_MAXMEMORY"' in command and "noeviction" in command
    assert env_of(redis_service)["REDIS_MAXMEMORY"]
    assert env_of(redis_service)["REDIS_PASSWORD"] == OPERATOR_ENV["REDIS_PASSWORD"]
    assert any(v.endswith(":/data") for v in redis_service["volumes"])
    assert "redis-cli ping" in " ".join(redis_service["healthcheck"]["test"])
    for name, service in SERVICES.items():
        for key in ("DORMANT_BROKER_URL", "DORMANT_RESULT_BACKEND", "DORMANT_STATE_URL"):
            if "build" in service and name != "redis":
                assert f":{OPERATOR_ENV['REDIS_PASSWORD']}@" in env_of(service)[key], name


def test_exactly_one_beat():
    beats = by_subcommand("beat")
    assert len(beats) == 1
    (name,) = beats
    assert SERVICES[name].get("deploy", {}).get("replicas", 1) == 1


def test_one_threads_worker_per_hypervisor_host_on_its_libvirt_socket():
    workers = by_subcommand("worker")
    assert len(workers) >= 2
    hosts = set()
    for name, argv in workers.items():
        service = SERVICES[name]
        env = env_of(service)
        _, params = parse_celery(argv)
        assert params["pool"].__module__ == "celery.concurrency.thread"  # metrics need it
        hosts.add(env["DORMANT_HOST"])
        assert env["DORMANT_LIBVIRT_URI"] == "qemu:///system"
        volumes = [interpolate(v) for v in service["volumes"]]
        assert "/var/run/libvirt/libvirt-sock:/var/run/libvirt/libvirt-sock" in volumes
        # It reads the save directory's free space before every save (read-only is enough).
        save_dir = settings_mod.load({k: v for k, v in env.items()
                                      if k.startswith("DORMANT_")}).save_dir
        assert f"{save_dir}:{save_dir}:ro" in volumes
        assert "ports" not in service  # Prometheus scrapes it on the compose network
        assert params["hostname"] == f"dormant@{env['DORMANT_HOST']}"
        # The health check asks libvirtd and pings this very worker (dormant health).
        check = service["healthcheck"]["test"]
        assert check[:3] == ["CMD", "dormant", "health"]
        assert check[check.index("--node") + 1] == params["hostname"]
        assert f"node.hostname == {env['DORMANT_HOST']}" in \
            service["deploy"]["placement"]["constraints"]
        assert service["stop_grace_period"] == "2m"  # warm shutdown finishes a managed save
    assert len(hosts) == len(workers)


def test_flower_requires_basic_auth_and_has_a_probe():
    (name,) = by_subcommand("flower")
    flower = SERVICES[name]
    env = env_of(flower)
    assert env["FLOWER_BASIC_AUTH"] == OPERATOR_ENV["FLOWER_BASIC_AUTH"]
    assert env.get("FLOWER_UNAUTHENTICATED_API", "false") == "false"
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert "--port=5555" in command_of(flower)
    assert [interpolate(p) for p in flower["ports"]] == ["127.0.0.1:5555:5555"]


def test_published_ports_are_loopback_by_default():
    published = {name: [interpolate(p) for p in s["ports"]]
                 for name, s in SERVICES.items() if "ports" in s}
    assert published == {"redis": ["127.0.0.1:6379:6379"], "flower": ["127.0.0.1:5555:5555"]}


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "FLOWER_BASIC_AUTH"])
def test_secrets_have_no_default(missing, monkeypatch):
    monkeypatch.delitem(OPERATOR_ENV, missing)
    with pytest.raises(AssertionError, match=f"requires {missing}"):
        for service in SERVICES.values():
            env_of(service)


def test_the_image_contains_every_package_and_runs_unprivileged():
    dockerfile = (ROOT / "Dockerfile").read_text()
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".")
               for top in ("worker", "tasks") for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk <= packages, f"not installed by `pip install .`: {on_disk - packages}"
    for path in ("pyproject.toml", "celeryconfig.py", "worker", "tasks"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, re.M), path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"worker", "tasks", "celeryconfig.py", "pyproject.toml"} & set(ignored)
    assert {".git", ".venv"} <= set(ignored)
    assert all(p in dockerfile for p in ("libvirt-dev", "pkg-config", "gcc", "python3-venv"))


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.redis"])
def test_images_build_from_the_base_that_base_images_sh_provides(name):
    """The same files build against a registry and against scripts/base-images.sh's stand-in."""
    dockerfile = (ROOT / name).read_text()
    script = (ROOT / "scripts" / "base-images.sh").read_text()
    (base,) = re.findall(r"^BASE=(\S+)$", script, re.M)
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", dockerfile, re.M)
    assert stages and {image for image, _ in stages} == {base}, stages
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in {"root", "0"}


# -- the replicated deployment (docker-compose.sentinel.yml, over docker-compose.yml) ----------
OVERRIDE: dict[str, dict[str, Any]] = yaml.safe_load(
    (ROOT / "docker-compose.sentinel.yml").read_text())["services"]


def test_with_the_sentinel_override_every_dormant_process_follows_the_sentinels():
    from worker.store.sentinel import parse

    sentinels = tuple((f"sentinel-{n}", 26379) for n in (1, 2, 3))
    for name, service in SERVICES.items():
        if dockerfile_of(service) != "Dockerfile":
            continue
        env = {**env_of(service), **env_of(OVERRIDE[name])}  # compose merges environment
        loaded = settings_mod.load({k: v for k, v in env.items() if k.startswith("DORMANT_")})
        for url in (loaded.broker_url, loaded.result_backend, loaded.state_url):
            found = parse(url)
            assert found.sentinels == sentinels and found.password == OPERATOR_ENV["REDIS_PASSWORD"]
        assert [parse(u).db for u in (loaded.broker_url, loaded.result_backend,
                                      loaded.state_url)] == [0, 1, 2]
        assert (loaded.sentinel_master, loaded.state_wait_replicas) == ("dormant", 1)


def test_the_sentinel_override_runs_a_replica_and_three_sentinels_on_the_master():
    replica = " ".join(command_of(OVERRIDE["redis-replica"]))
    assert "--replicaof redis 6379" in replica and '--masterauth "$REDIS_PASSWORD"' in replica
    # The first master may be a replica after a failover: it authenticates to the new one.
    assert '--masterauth "$REDIS_PASSWORD"' in " ".join(command_of(OVERRIDE["redis"]))
    for n in (1, 2, 3):
        command = " ".join(command_of(OVERRIDE[f"sentinel-{n}"]))
        assert "exec redis-server /data/sentinel.conf --sentinel" in command
        assert '"sentinel monitor dormant redis 6379 2"' in command  # quorum 2 of 3
        assert '"sentinel down-after-milliseconds dormant 5000"' in command
        assert '"sentinel auth-pass dormant $REDIS_PASSWORD"' in command
        assert any(v.endswith(":/data") for v in OVERRIDE[f"sentinel-{n}"]["volumes"])
