"""sentinel:// URLs: parsed as Celery and kombu spell them, with the master's name, the sentinels'
password and TLS from settings, for the state store, the broker and the result backend alike."""

from __future__ import annotations

import ssl

import pytest
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from worker.api.client import celery_client
from worker.core import settings
from worker.core.errors import ConfigurationError
from worker.store.connection import StateRedis, connect
from worker.store.sentinel import SentinelOptions, SentinelURL, parse

URL = "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2/2;sentinel://10.0.0.3:26380"


def test_a_url_names_every_sentinel_and_the_master_s_database_and_password() -> None:
    assert parse(URL) == SentinelURL(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)),
        db=2, username=None, password="s3cret")
    assert parse("sentinel://h") == SentinelURL(sentinels=(("h", 26379),), db=0)
    assert parse("sentinel://user:p%40ss@h:1/0").username == "user"
    assert parse("sentinel://user:p%40ss@h:1/0").password == "p@ss"


@pytest.mark.parametrize("bad", ["sentinel://", "sentinel://h:1/x", "sentinel://h:1;redis://h:2",
                                 "sentinel://h:port", ";"])
def test_a_malformed_url_is_refused_without_its_password(bad: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        parse(bad.replace("sentinel://h", "sentinel://:pw@h"))
    assert "pw" not in str(refused.value)


def test_settings_refuse_a_malformed_sentinel_url_naming_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="DORMANT_STATE_URL"):
        settings.load({"DORMANT_STATE_URL": "sentinel://h:1/db"})
    s = settings.load({"DORMANT_STATE_URL": URL, "DORMANT_SENTINEL_MASTER": "mymaster",
                       "DORMANT_SENTINEL_PASSWORD": "sp", "DORMANT_SENTINEL_TLS": "true",
                       "DORMANT_STATE_WAIT_REPLICAS": "1", "DORMANT_STATE_WAIT_TIMEOUT": "0.5"})
    assert SentinelOptions.from_settings(s) == SentinelOptions(master="mymaster", password="sp",
                                                               tls=True, ca="")
    assert (s.state_wait_replicas, s.state_wait_timeout) == (1, 0.5)
    with pytest.raises(ConfigurationError, match="DORMANT_STATE_WAIT_TIMEOUT"):
        settings.load({"DORMANT_STATE_WAIT_TIMEOUT": "0"})  # WAIT 0 would block for ever


def test_the_state_store_follows_the_master_the_sentinels_name() -> None:
    client = connect(URL, sentinel=SentinelOptions(master="mymaster", password="sp"))
    assert isinstance(client, StateRedis)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "s3cret"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26379, 26380]
    assert all(s.connection_pool.connection_kwargs["password"] == "sp" for s in sentinels)


def test_tls_to_the_master_and_to_the_sentinels_checks_certificates() -> None:
    options = SentinelOptions(tls=True, ca="/ca.pem")
    pool = connect(URL, sentinel=options).connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    sentinel_kwargs = options.sentinel_kwargs()
    assert sentinel_kwargs["ssl"] is True and sentinel_kwargs["ssl_check_hostname"] is True


def test_celery_gets_the_master_name_and_the_sentinels_for_broker_and_backend() -> None:
    s = settings.Settings(broker_url=URL.replace("/2", "/0"), result_backend=URL,
                          sentinel_master="mymaster", sentinel_tls=True, tls_ca="/ca.pem")
    app = celery_client(s)
    for options in (app.conf.broker_transport_options,
                    app.conf.result_backend_transport_options):
        assert options["master_name"] == "mymaster"
        assert options["sentinel_kwargs"]["ssl_ca_certs"] == "/ca.pem"
    assert app.conf.broker_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert app.conf.redis_backend_use_ssl["ssl_ca_certs"] == "/ca.pem"
    plain = celery_client(settings.Settings())
    assert "master_name" not in plain.conf.broker_transport_options

