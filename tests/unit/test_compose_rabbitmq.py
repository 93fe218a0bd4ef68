"""docker-compose.rabbitmq.yml on top of docker-compose.yml, checked without a Docker engine:
every dormant process gets the amqp:// URL and waits for a healthy node, which is built here
from Debian's package, persists on a volume and is published on loopback only."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit import test_compose as base
from worker.core import settings as settings_mod
from worker.fleet import broker

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = yaml.safe_load((ROOT / "docker-compose.rabbitmq.yml").read_text())


def merged() -> dict[str, dict[str, Any]]:
    """Compose's merge of the two files, as far as these services use it: mappings (the
    environment, depends_on) merge key by key, the rest of the override wins."""
    services = copy.deepcopy(base.SERVICES)
    for name, extra in OVERRIDE["services"].items():
        service = services.setdefault(name, {})
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(service.get(key), dict):
                service[key] = {**service[key], **value}
            else:
                service[key] = value
    return services


@pytest.fixture(autouse=True)
def operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base.OPERATOR_ENV, "RABBITMQ_PASSWORD", "rabbit-pw")


def test_every_dormant_process_uses_rabbitmq_and_waits_for_it() -> None:
    services = merged()
    dormant = [name for name, s in services.items()
               if "build" in s and base.dockerfile_of(s) == "Dockerfile"]
    assert set(dormant) == {"worker-kvm1", "worker-kvm2", "beat", "flower", "dormant"}
    for name in dormant:
        env = base.env_of(services[name])
        url = env["DORMANT_BROKER_URL"]
        assert url == "amqp://dormant:rabbit-pw@rabbitmq:5672/dormant", name
        assert broker.for_url(url) is broker.RABBITMQ
        settings_mod.load({k: v for k, v in env.items() if k.startswith("DORMANT_")})
        # Redis stays the state store and the result backend.
        assert env["DORMANT_STATE_URL"].startswith("redis://:pw@redis:6379/")
        assert services[name]["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
        if name.startswith("worker-"):  # the base file's settings survive the merge
            assert env["DORMANT_HOST"] == name.removeprefix("worker-")
            assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_the_node_is_built_here_persists_and_is_published_on_loopback_only() -> None:
    rabbit = merged()["rabbitmq"]
    assert rabbit["build"]["dockerfile"] == "Dockerfile.rabbitmq"
    assert rabbit["hostname"] == "rabbitmq"  # rabbit@rabbitmq: the same data directory
    assert "rabbitmq-data:/var/lib/rabbitmq" in rabbit["volumes"]
    assert [base.interpolate(p) for p in rabbit["ports"]] == ["127.0.0.1:5672:5672"]
    assert base.env_of(rabbit) == {"RABBITMQ_PASSWORD": "rabbit-pw"}
    assert rabbit["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert "rabbitmq-data" in OVERRIDE["volumes"]


def test_the_password_has_no_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(base.OPERATOR_ENV, "RABBITMQ_PASSWORD")
    with pytest.raises(AssertionError, match="requires RABBITMQ_PASSWORD"):
        base.env_of(merged()["worker-kvm1"])


def test_the_image_is_debians_package_on_the_same_base_run_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile.rabbitmq").read_text()
    script = (ROOT / "scripts" / "base-images.sh").read_text()
    (image,) = re.findall(r"^BASE=(\S+)$", script, re.M)
    assert re.findall(r"^FROM (\S+)$", dockerfile, re.M) == [image]
    assert "apt-get install -y --no-install-recommends rabbitmq-server" in dockerfile
    assert re.findall(r"^USER (\S+)", dockerfile, re.M) == ["rabbitmq"]
    entry = (ROOT / "scripts" / "rabbitmq-entrypoint.sh").read_text()
    # The virtual host dormant needs: quorum by default, so plain clients' declarations match.
    assert '"default_queue_type": "quorum"' in entry
    assert "exec /usr/lib/rabbitmq/bin/rabbitmq-server" in entry
    assert "scripts" not in (ROOT / ".dockerignore").read_text().split()
