"""rediss:// really checks certificates: broker, result backend and state store all refuse a
server whose certificate the configured CA did not sign, or whose name does not match.

A private redis-server with TLS only (port 0, tls-port P) and throw-away CAs made by openssl.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.conftest import unavailable
from tests.support.services import ROOT, free_port, wait_until
from tests.support.services import test_env as dormant_environment

pytestmark = pytest.mark.integration

PROBE = """
import json
from tasks import app
from tasks.context import context
out = {}
def check(name, fn):
    try:
        fn()
        out[name] = "ok"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
def broker():
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
check("broker", broker)
check("backend", lambda: app.backend.client.ping())
check("state", lambda: context().store.redis.ping())
print(json.dumps(out))
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=cwd)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if not shutil.which("openssl") or not shutil.which("redis-server"):
        unavailable("openssl and redis-server are needed for the TLS test")
    pki = tmp_path_factory.mktemp("pki")
    _make_ca("ca", pki)
    _make_ca("other-ca", pki)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=pki)
    (pki / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt",
             cwd=pki)
    port = free_port()
    log = open(pki / "redis.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(pki)],
        cwd=pki, stdout=log, stderr=subprocess.STDOUT)

    def answers() -> bool:
        if process.poll() is not None:
            unavailable(f"redis-server without TLS support? {(pki / 'redis.log').read_text()}")
        try:
            return bool(redis.Redis(host="localhost", port=port, ssl=True,
                                    ssl_ca_certs=str(pki / "ca.crt")).ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, timeout=10, message="TLS redis-server")
        yield port, pki
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _urls(host: str, port: int) -> dict[str, str]:
    return {"DORMANT_BROKER_URL": f"rediss://{host}:{port}/0",
            "DORMANT_RESULT_BACKEND": f"rediss://{host}:{port}/1",
            "DORMANT_STATE_URL": f"rediss://{host}:{port}/2"}


def _probe(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_right_ca_connects_every_client(tls_redis, redis_clean, host_name):
    port, pki = tls_redis
    env = dormant_environment(redis_clean, host_name, **_urls("localhost", port),
                              DORMANT_TLS_CA=str(pki / "ca.crt"),
                              DORMANT_LIBVIRT_URI="test:///default")
    assert _probe(env) == {"broker": "ok", "backend": "ok", "state": "ok"}


@pytest.mark.parametrize(("host", "ca", "why"), [
    ("localhost", "other-ca.crt", "certificate verify failed"),  # not signed by our CA
    ("localhost", None, "certificate verify failed"),  # system CAs only
    ("127.0.0.1", "ca.crt", "match"),  # right CA, wrong name
])
def test_wrong_ca_or_name_is_refused_everywhere(tls_redis, redis_clean, host_name,
                                                host, ca, why):
    port, pki = tls_redis
    env = dormant_environment(redis_clean, host_name, **_urls(host, port),
                              DORMANT_LIBVIRT_URI="test:///default")
    if ca:
        env["DORMANT_TLS_CA"] = str(pki / ca)
    result = _probe(env)
    for part in ("broker", "backend", "state"):
        assert result[part] != "ok", (part, result)
        assert why in result[part].lower(), (part, result)


def test_worker_runs_transitions_over_tls(tls_redis, start_worker, host_name):
    port, pki = tls_redis
    ca = str(pki / "ca.crt")
    worker = start_worker(pool="threads", concurrency=2, wait=False,
                          env={**_urls("localhost", port), "DORMANT_TLS_CA": ca,
                               "DORMANT_LIBVIRT_URI": "test:///default"})
    tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": ca}
    client = Celery("client", broker=f"rediss://localhost:{port}/0",
                    backend=f"rediss://localhost:{port}/1")
    client.conf.update(broker_use_ssl=tls, redis_backend_use_ssl=tls, task_serializer="json",
                       accept_content=["json"], result_accept_content=["json"])
    try:
        def ready() -> bool:
            if not worker.alive():
                raise RuntimeError(worker.log()[-3000:])
            return bool(client.control.ping(destination=[worker.nodename], timeout=0.5))

        wait_until(ready, timeout=60, interval=0.2, message="TLS worker ping")
        result = client.send_task("dormant.suspend", args=["dormant-demo-batch"],
                                  queue=f"dormant.{host_name}").get(timeout=30)
    finally:
        client.close()
    assert result["outcome"] == "changed"
    assert result["state_after"].startswith("suspended")
