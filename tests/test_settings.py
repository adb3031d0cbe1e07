"""Settings: environment, .env, validation that names the field, secrets redacted."""

from __future__ import annotations

import math
import urllib.parse
from pathlib import Path

import pytest
import redis
import tooz.drivers.redis
from structlog.testing import capture_logs

from aiotooz import (
    BackendUnavailable,
    ConfigurationError,
    CoordinationError,
    CoordinationSettings,
    Coordinator,
)
from aiotooz._drivers import driver_class

from .support.helpers import make_coordinator
from .support.servers import free_port


def test_defaults_use_the_embedded_file_backend() -> None:
    settings = CoordinationSettings()
    assert settings.backend_url.startswith("file:///")
    assert settings.heartbeat == 1.0
    assert settings.initial_reconnect_backoff == 0.1
    assert settings.max_reconnect_backoff == 60.0


def test_environment_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("AIOTOOZ_HEARTBEAT=2.5\nAIOTOOZ_MAX_RECONNECT_BACKOFF=9\n")
    monkeypatch.setenv("AIOTOOZ_BACKEND_URL", "redis://127.0.0.1:6379")
    monkeypatch.setenv("AIOTOOZ_INITIAL_RECONNECT_BACKOFF", "0.5")
    settings = CoordinationSettings()
    assert settings.backend_url == "redis://127.0.0.1:6379"
    assert settings.heartbeat == 2.5
    assert settings.initial_reconnect_backoff == 0.5
    assert settings.max_reconnect_backoff == 9
    assert CoordinationSettings(heartbeat=3).heartbeat == 3  # arguments win


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"heartbeat": -1}, "heartbeat"),
        ({"heartbeat": 0}, "heartbeat"),
        ({"heartbeat": math.nan}, "heartbeat"),
        ({"heartbeat": math.inf}, "heartbeat"),
        ({"heartbeat": "often"}, "heartbeat"),
        ({"initial_reconnect_backoff": 0}, "initial_reconnect_backoff"),
        ({"initial_reconnect_backoff": 5, "max_reconnect_backoff": 1}, "max_reconnect_backoff"),
        ({"backend_url": "localhost:6379"}, "backend_url"),
        ({"backend_url": "file://"}, "backend_url"),
        ({"backend_url": ""}, "backend_url"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(
    values: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigurationError, match=field) as raised:
        CoordinationSettings(**values)
    assert isinstance(raised.value, CoordinationError)
    assert isinstance(raised.value, ValueError)


def test_a_bad_environment_value_is_reported_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOTOOZ_HEARTBEAT", "-3")
    with pytest.raises(ConfigurationError, match="heartbeat"):
        CoordinationSettings()


def test_passwords_are_redacted_everywhere() -> None:
    url = "redis://user:hunter2@127.0.0.1:6379?db=1"
    settings = CoordinationSettings(backend_url=url)
    assert settings.backend_url == url  # the real value is still there for the driver
    for text in (repr(settings), str(settings), settings.redacted_backend_url):
        assert "hunter2" not in text
    assert "redis://user:***@127.0.0.1:6379?db=1" in repr(settings)
    with pytest.raises(ConfigurationError) as raised:
        CoordinationSettings(backend_url="nonsense-with-hunter2", heartbeat=-1)
    assert "hunter2" not in str(raised.value)


def test_settings_are_immutable() -> None:
    settings = CoordinationSettings()
    with pytest.raises(Exception, match="frozen"):
        settings.heartbeat = 5


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://127.0.0.1:26379?sentinel=mymaster&sentinel_password=s3cr3t", "s3cr3t"),
        ("zookeeper://127.0.0.1:2181?use_ssl=true&keyfile_password=k3yp4ss", "k3yp4ss"),
        ("memcached://127.0.0.1:11211?ssl_key_password=m3mp4ss&timeout=2", "m3mp4ss"),
        ("etcd3+https://127.0.0.1:2379?cert_key=t0k3n", "t0k3n"),
        ("mysql://root:pw%40x@127.0.0.1/test?ssl_key=c0d3", "c0d3"),
    ],
)
async def test_secrets_in_the_query_string_are_redacted(url: str, secret: str) -> None:
    settings = CoordinationSettings(backend_url=url)
    coordinator = Coordinator(settings=settings)
    shown = [repr(settings), str(settings), settings.redacted_backend_url, repr(coordinator)]
    for text in shown:
        assert secret not in text, text
        assert "***" in text
    assert "pw%40x" not in settings.redacted_backend_url
    # Parameters that hold no secret are still shown, to help debugging.
    assert str(urllib.parse.urlsplit(url).hostname) in settings.redacted_backend_url


async def test_secrets_are_redacted_from_backend_errors() -> None:
    """Connecting to nothing: the error names the URL, without its secrets."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}?sentinel_password=s3cr3t&socket_connect_timeout=0.2"
    with capture_logs() as logs, pytest.raises(BackendUnavailable) as raised:
        async with Coordinator(settings=CoordinationSettings(backend_url=url)):
            pass  # pragma: no cover
    assert "s3cr3t" not in str(raised.value)
    assert "sentinel_password=***" in str(raised.value)
    assert "s3cr3t" not in repr(logs)


@pytest.mark.parametrize(
    "url", ["redis://[::1", "redis://127.0.0.1:port", "redis://user:pw@[::1:6379"]
)
def test_an_unparsable_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="backend_url: is not a parsable URL") as raised:
        CoordinationSettings(backend_url=url)
    assert "pw" not in str(raised.value).replace("parsable", "")


def test_a_zookeeper_connect_string_of_several_servers_is_a_url() -> None:
    """kazoo takes 'a:2181,b:2181,c:2181'; the check refused its first port as unparsable."""
    url = "zookeeper://127.0.0.11:2181,127.0.0.12:2181,127.0.0.13:2181?timeout=2"
    assert CoordinationSettings(backend_url=url).backend_url == url
    with pytest.raises(ConfigurationError, match="is not a parsable URL"):
        CoordinationSettings(backend_url="zookeeper://127.0.0.11:2181,127.0.0.12:port")


# -- driver options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "option", "known"),
    [
        ("redis://127.0.0.1:6379?lock_timout=5", "lock_timout", "lock_timeout"),
        ("redis://127.0.0.1:6379?decode_responses=True", "decode_responses", "socket_timeout"),
        ("memcached://127.0.0.1:11211?timeout=2&lock_ttl=5", "lock_ttl", "lock_timeout"),
        ("zookeeper://127.0.0.1:2181?session_timeout=5", "session_timeout", "timeout"),
        ("etcd3+http://127.0.0.1:2379?lease=5", "lease", "lock_timeout"),
        ("file:///tmp/locks?lock_timeout=5", "lock_timeout", "timeout"),
        ("ipc://?lock_timeout=5", "lock_timeout", "executor"),
        ("postgresql://u@127.0.0.1/test?sslmode=require", "sslmode", "dbname"),
        ("mysql://u@127.0.0.1/test?ssl=1", "ssl", "ssl_ca"),
        ("zookeeper://127.0.0.1:2181?connection_retry=5", "connection_retry", "timeout"),
    ],
)
def test_an_unknown_driver_option_is_refused_naming_the_known_ones(
    url: str, option: str, known: str
) -> None:
    """tooz ignores options it does not read: a misspelt lock_timout left the TTL at 30 s."""
    with pytest.raises(ConfigurationError, match=f"takes no option '{option}'") as raised:
        CoordinationSettings(backend_url=url)
    assert "backend_url" in str(raised.value)
    assert known in str(raised.value).partition("it takes:")[2]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379?socket_timeout=abc", "socket_timeout='abc'"),
        ("redis://127.0.0.1:6379?lock_timeout=2.5", "a whole number of seconds > 0"),
        ("redis://127.0.0.1:6379?lock_timeout=", "lock_timeout=''"),
        ("redis://127.0.0.1:6379?db=-1", "a whole number >= 0"),
        ("redis://127.0.0.1:6379?ssl=maybe", "true or false"),
        ("zookeeper://127.0.0.1:2181?timeout=0", "timeout='0'"),
        ("zookeeper://127.0.0.1:2181?handler=eventlet", "one of threading"),
        ("memcached://127.0.0.1:11211?max_pool_size=0", "a whole number > 0"),
        ("etcd3+http://127.0.0.1:2379?timeout=-1", "a whole number of seconds > 0"),
        ("etcd3+http://127.0.0.1:2379?executor=fast", "one of threaded"),
        ("file:///tmp/locks?timeout=nan", "a whole number of seconds > 0"),
        ("postgresql://u@127.0.0.1/test?port=99999", "a port number"),
        (
            "postgresql://u@127.0.0.1/test?keys=32",
            "keys='32' of the postgresql:// backend must be tooz",
        ),
        ("mysql://u@127.0.0.1/test?ssl_check_hostname=perhaps", "true or false"),
        ("redis://127.0.0.1:6379/two", "selects the database"),
        ("redis://127.0.0.1:6379/2?db=3", "two databases"),
    ],
)
def test_a_bad_driver_option_value_is_a_configuration_error(url: str, message: str) -> None:
    """They failed at connect time, as BackendUnavailable (or, for ZooKeeper's timeout=0,
    a connection that could never be made)."""
    with pytest.raises(ConfigurationError, match="backend_url") as raised:
        CoordinationSettings(backend_url=url)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379?lock_timeout=10&socket_timeout=0.5&socket_keepalive=yes"
        "&health_check_interval=0&db=3&namespace=x&membership_timeout=2.5",
        "redis://127.0.0.1:26379?sentinel=m&sentinel_fallback=a:1&sentinel_fallback=b:2",
        "redis://127.0.0.1:6379/2?db=2",
        "redis:///run/redis.sock?lock_timeout=5",
        "memcached://127.0.0.1:11211?timeout=2&lock_timeout=4&use_ssl=False",
        "zookeeper://a:2181,b:2181?timeout=2&hosts=c:2181&randomize_hosts=false",
        "etcd3+https://127.0.0.1:2379?lock_timeout=30&timeout=2&api_version=v3",
        "file:///tmp/locks?timeout=10",
        "postgresql://u@127.0.0.1:5432/test?port=5433",
        "postgresql://u@127.0.0.1:5432/test?keys=64&dbname=test",
        "mysql://u@127.0.0.1/test?ssl_check_hostname=true",
    ],
)
def test_the_options_tooz_reads_are_taken(url: str) -> None:
    assert CoordinationSettings(backend_url=url).backend_url == url


def test_every_option_tooz_hands_to_the_redis_client_is_taken() -> None:
    """tooz lists them (CLIENT_ARGS): a tooz upgrade that adds one shows here."""
    accepted = driver_class("redis").accepted_options
    assert accepted is not None
    assert set(tooz.drivers.redis.RedisDriver.CLIENT_ARGS) <= set(accepted)


async def test_the_path_of_a_redis_url_selects_the_database(redis_url: str, prefix: str) -> None:
    """redis://host:6379/2 used database 0: tooz reads the database from db= only. The
    key must be in database 2, through the blocking client (trio) and the asyncio one."""
    key = f"_tooz_{prefix}in-db-2_lock".encode()
    db0 = redis.Redis.from_url(redis_url, db=0)
    db2 = redis.Redis.from_url(redis_url, db=2)
    try:
        async with make_coordinator(f"{redis_url}/2?lock_timeout=5", prefix) as coordinator:
            async with coordinator.get_lock("in-db-2"):
                assert db2.exists(key) == 1
                assert db0.exists(key) == 0
            assert db2.exists(key) == 0
            async with coordinator.get_lock("in-db-2"), coordinator.leadership("led"):
                assert db2.exists(key) == 1
    finally:
        db2.delete(key)
        db0.close()
        db2.close()
