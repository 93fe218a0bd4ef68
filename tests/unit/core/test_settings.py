"""settings.load: defaults, typed conversion, and refusal of unknown or malformed variables."""

from __future__ import annotations

import socket

import pytest

from worker.core import settings
from worker.core.errors import ConfigurationError


def test_defaults_match_the_contract() -> None:
    s = settings.load({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.result_backend == "redis://127.0.0.1:6379/1"
    assert s.state_url == "redis://127.0.0.1:6379/2"
    assert s.libvirt_uri == "qemu:///system"  # never the fake test driver by default
    assert s.host == socket.gethostname()
    assert s.host_queue == f"dormant.{socket.gethostname()}"
    assert (s.visibility_timeout, s.max_retries, s.retry_backoff, s.retry_backoff_max) == (
        3600, 6, 2, 60)
    assert (s.lock_ttl, s.lock_wait, s.verify_timeout) == (30, 60.0, 30.0)
    assert (s.sample_interval, s.idle_window, s.idle_min_samples) == (300, 86400, 12)
    assert (s.log_json, s.log_level, s.metrics_port) == (False, "INFO", 0)


def test_unrelated_variables_are_ignored() -> None:
    assert settings.load({"PATH": "/bin", "DORMANTX": "1", "dormant_host": "x"}).host != "x"


def test_typed_conversion() -> None:
    s = settings.load({
        "DORMANT_HOST": "hv-7",
        "DORMANT_MAX_RETRIES": "3",
        "DORMANT_LOCK_WAIT": "2.5",
        "DORMANT_VERIFY_TIMEOUT": "7",
        "DORMANT_LOG_JSON": "true",
        "DORMANT_RECLAIM_ENABLED": "0",
        "DORMANT_IDLE_CPU_PERCENT": "1.5",
        "DORMANT_LIBVIRT_URI": "qemu:///system",
    })
    assert s.host == "hv-7" and s.host_queue == "dormant.hv-7"
    assert s.max_retries == 3 and isinstance(s.max_retries, int)
    assert s.lock_wait == 2.5 and isinstance(s.lock_wait, float)
    assert s.verify_timeout == 7.0 and isinstance(s.verify_timeout, float)
    assert s.log_json is True and s.reclaim_enabled is False
    assert s.idle_cpu_percent == 1.5
    assert s.libvirt_uri == "qemu:///system"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), (" on ", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_booleans(raw: str, expected: bool) -> None:
    assert settings.load({"DORMANT_RECLAIM_DRY_RUN": raw}).reclaim_dry_run is expected


def test_unknown_variable_is_rejected_by_name() -> None:
    with pytest.raises(ConfigurationError) as info:
        settings.load({"DORMANT_LOCK_TTL": "30", "DORMANT_LOCK_TIMEOUT": "5"})
    message = str(info.value)
    assert "DORMANT_LOCK_TIMEOUT" in message.split(";")[0]
    assert "DORMANT_LOCK_TTL" in message  # the known names are listed to help fix the typo


def test_every_unknown_variable_is_named() -> None:
    with pytest.raises(ConfigurationError, match="DORMANT_A, DORMANT_B"):
        settings.load({"DORMANT_B": "1", "DORMANT_A": "1"})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("DORMANT_MAX_RETRIES", "three"),
        ("DORMANT_MAX_RETRIES", "2.5"),
        ("DORMANT_LOCK_TTL", ""),
        ("DORMANT_LOCK_WAIT", "soon"),
        ("DORMANT_LOG_JSON", "maybe"),
        ("DORMANT_RECLAIM_ENABLED", "2"),
        # numbers that parse but make no sense
        ("DORMANT_LOCK_TTL", "-1"),
        ("DORMANT_LOCK_TTL", "0"),  # a lock that never lasts: Redis refuses PX 0
        ("DORMANT_RESULT_TTL", "0"),
        ("DORMANT_VISIBILITY_TIMEOUT", "0"),
        ("DORMANT_MAX_RETRIES", "-3"),
        ("DORMANT_LOCK_WAIT", "nan"),
        ("DORMANT_VERIFY_TIMEOUT", "inf"),
        ("DORMANT_VERIFY_TIMEOUT", "-2"),
        # ranges of their own: checked at start-up, not when the nightly run first uses them
        ("DORMANT_IDLE_CPU_QUANTILE", "1.5"),
        ("DORMANT_IDLE_NET_QUANTILE", "0"),
        ("DORMANT_IDLE_MIN_SPAN_FRACTION", "1.01"),
        ("DORMANT_IDLE_MIN_SAMPLES", "0"),
        ("DORMANT_SAMPLE_INTERVAL", "0"),
        ("DORMANT_REGISTRY_INTERVAL", "0"),
        ("DORMANT_RECLAIM_HOST_CAP", "0"),
        ("DORMANT_RECLAIM_HOUR", "24"),
        ("DORMANT_RECLAIM_MINUTE", "60"),
        ("DORMANT_METRICS_PORT", "65536"),
        ("DORMANT_RECLAIM_TIMEZONE", "Mars/Olympus_Mons"),
        ("DORMANT_RECLAIM_TIMEZONE", ""),
        ("DORMANT_LOG_LEVEL", "LOUD"),
    ],
)
def test_malformed_values_are_rejected(name: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        settings.load({name: raw})
    assert name in str(info.value)


def test_the_range_is_named_in_the_message() -> None:
    with pytest.raises(ConfigurationError, match=r"DORMANT_IDLE_CPU_QUANTILE=1\.5 is out of "
                       r"range: it must be greater than 0 and at most 1"):
        settings.load({"DORMANT_IDLE_CPU_QUANTILE": "1.5"})
    with pytest.raises(ConfigurationError, match=r"DORMANT_RECLAIM_HOUR=24 .* from 0 to 23"):
        settings.Settings(reclaim_hour=24)  # built directly: checked all the same


def test_every_setting_default_is_in_range_and_the_policy_accepts_it() -> None:
    from worker.reclaim.idle import IdlePolicy

    IdlePolicy.from_settings(settings.Settings())
    s = settings.load({"DORMANT_IDLE_CPU_QUANTILE": "1", "DORMANT_LOG_LEVEL": "debug",
                       "DORMANT_RECLAIM_TIMEZONE": "Europe/Paris"})
    assert (s.idle_cpu_quantile, s.log_level) == (1.0, "debug")


def test_zero_is_fine_where_it_means_off() -> None:
    s = settings.load({"DORMANT_METRICS_PORT": "0", "DORMANT_LOCK_WAIT": "0",
                       "DORMANT_RECLAIM_HOUR": "0"})
    assert (s.metrics_port, s.lock_wait, s.reclaim_hour) == (0, 0.0, 0)


def test_get_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    settings.get.cache_clear()
    monkeypatch.setenv("DORMANT_HOST", "from-env")
    try:
        first = settings.get()
        monkeypatch.setenv("DORMANT_HOST", "changed")
        assert settings.get() is first and first.host == "from-env"
    finally:
        settings.get.cache_clear()


def test_queue_names() -> None:
    assert settings.queue_for_host("hv1") == "dormant.hv1"
    assert settings.CONTROL_QUEUE == "dormant.control"


def test_tls_options_are_defined_once_for_worker_and_client() -> None:
    import ssl

    from worker.api.client import celery_client

    plain = settings.Settings()
    assert settings.celery_tls(plain) == {}
    secure = settings.Settings(broker_url="rediss://b.example:6380/0", tls_ca="/ca.pem")
    tls = settings.celery_tls(secure)
    assert tls == {"broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                      "ssl_check_hostname": True, "ssl_ca_certs": "/ca.pem"}}
    client = celery_client(secure)
    assert client.conf.broker_use_ssl == tls["broker_use_ssl"]
    assert not client.conf.redis_backend_use_ssl
