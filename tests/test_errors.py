"""Mistakes and hostile input: each gets a typed CoordinationError that says what to fix,
leaks no secret, and leaves nothing held (the coordinator can take every name afterwards)."""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from aiotooz import (
    BackendUnavailable,
    ConfigurationError,
    CoordinationError,
    CoordinationSettings,
    Coordinator,
    Lock,
    LockCreationFailed,
    LockNameError,
    LockNotHeld,
    get_default_coordinator,
    synchronized,
)

from .support.helpers import make_coordinator
from .support.servers import free_port

SECRET = "pa55-w0rd-XYZ"


@dataclass
class Case:
    id: str
    error: type[CoordinationError]
    says: str  # a pattern found in the message: the part that tells the user what to fix
    run: Callable[[Coordinator], Awaitable[object]]


async def _start(url: str) -> None:
    coordinator = Coordinator(settings=CoordinationSettings(backend_url=url))
    try:
        await coordinator.start()
    finally:
        assert not coordinator.is_started


async def _start_without(library: str, url: str) -> None:
    """Start on ``url`` whose tooz driver needs ``library``, which must be absent here."""
    if importlib.util.find_spec(library) is not None:
        pytest.fail(f"this case needs the {library} client library to be absent")
    await _start(url)


def _with_prefix(prefix: object) -> Callable[[Coordinator], Awaitable[object]]:
    async def build(_: Coordinator) -> object:
        return Coordinator(prefix=prefix, settings=CoordinationSettings())  # type: ignore[arg-type]

    return build


async def _release_twice(coordinator: Coordinator) -> None:
    lock = coordinator.get_lock("twice")
    await lock.acquire()
    await lock.release()
    await lock.release()


async def _use_after_stop(coordinator: Coordinator) -> None:
    other = make_coordinator(coordinator.settings.backend_url, coordinator.prefix)
    async with other:
        lock = other.get_lock("after-stop")
    await lock.acquire()


async def _missing_field(coordinator: Coordinator) -> None:
    @synchronized("{f_name}-{share.id}", coordinator=coordinator)
    async def resize(share: object) -> None:
        pass

    await resize(share={"id": 1})


def _settings(**values: object) -> Callable[[Coordinator], Awaitable[object]]:
    async def build(_: Coordinator) -> object:
        return CoordinationSettings(**values)

    return build


CASES = [
    Case("no scheme", ConfigurationError, "must be a URL", _settings(backend_url="redis-host")),
    Case(
        "file without path", ConfigurationError, "directory path", _settings(backend_url="file://")
    ),
    Case(
        "unknown scheme",
        ConfigurationError,
        r"unknown backend scheme 'nosuch'.*use one of: .*redis",
        lambda _: _start(f"nosuch://u:{SECRET}@127.0.0.1:1"),
    ),
    Case(  # tooz has a consul driver; aiotooz does not support it
        "scheme of tooz only",
        ConfigurationError,
        r"unknown backend scheme 'consul'.*use one of: .*redis",
        lambda _: _start("consul://127.0.0.1:8500"),
    ),
    Case(
        "unreachable host",
        BackendUnavailable,
        "cannot reach the backend",
        lambda _: _start(f"redis://u:{SECRET}@127.0.0.1:{free_port()}"),
    ),
    Case(  # tooz registers a kubernetes driver, whose client library is not installed here
        "missing client library",
        ConfigurationError,
        "pip install kubernetes",
        lambda _: _start_without("kubernetes", "kubernetes://"),
    ),
    Case("negative heartbeat", ConfigurationError, "heartbeat", _settings(heartbeat=-1)),
    Case(
        "NaN backoff",
        ConfigurationError,
        "initial_reconnect_backoff",
        _settings(initial_reconnect_backoff=math.nan),
    ),
    Case(
        "max below initial",
        ConfigurationError,
        "max_reconnect_backoff must be >=",
        _settings(initial_reconnect_backoff=2, max_reconnect_backoff=1),
    ),
    Case("non-string name", LockNameError, "must be a str", lambda c: _get_lock(c, 7)),
    Case(
        "empty name", LockNameError, "must not be empty", lambda c: _async(lambda: c.get_lock(""))
    ),
    Case("bytes name", LockNameError, "must be a str", lambda c: _get_lock(c, b"x")),
    Case(
        "missing data field",
        LockNameError,
        "'share'",
        lambda c: _acquire(Lock("{share}", {}, coordinator=c)),
    ),
    Case("missing call field", LockNameError, "resize", _missing_field),
    Case(
        "negative blocking",
        ConfigurationError,
        "blocking must be",
        lambda c: c.get_lock("x").acquire(blocking=-1),
    ),
    Case(
        "NaN blocking",
        ConfigurationError,
        "blocking must be",
        lambda c: c.get_lock("x").acquire(blocking=math.nan),
    ),
    Case(
        "blocking too large for a float",
        ConfigurationError,
        "blocking must be",
        lambda c: c.get_lock("x").acquire(blocking=10**400),
    ),
    Case("release not held", LockNotHeld, "is not held", lambda c: c.get_lock("x").release()),
    Case("double release", LockNotHeld, "is not held", _release_twice),
    Case("use after stop", LockCreationFailed, "is not started", _use_after_stop),
    *(
        Case(f"bad prefix {label}", ConfigurationError, "prefix must be", _with_prefix(bad))
        for label, bad in [
            ("with a slash", "a/b"),
            ("with a space", "has space"),
            ("going up", "../up"),
            ("non-ASCII", "é"),
            ("too long", "x" * 65),
            ("not a str", 7),
        ]
    ),
]


async def _acquire(lock: Lock) -> bool:
    return await lock.acquire()


async def _async(make: Callable[[], object]) -> object:
    return make()


async def _get_lock(coordinator: Coordinator, name: object) -> object:
    return coordinator.get_lock(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_bad_input_is_refused_cleanly(case: Case, file_url: str, prefix: str) -> None:
    with capture_logs() as logs:
        async with make_coordinator(file_url, prefix) as coordinator:
            with pytest.raises(case.error) as raised:
                await case.run(coordinator)
            stats = coordinator.statistics()
            assert stats.locks_held == 0 and stats.names_waited_for == 0
            for name in ("x", "twice", "after-stop"):
                async with coordinator.get_lock(name)(blocking=False):
                    pass
    message = str(raised.value)
    assert re.search(case.says, message), message
    shown = [message, repr(raised.value), *(str(entry) for entry in logs)]
    cause = raised.value.__cause__
    while cause is not None:  # chained errors are shown in tracebacks too
        shown.append(str(cause))
        cause = cause.__cause__
    assert not [text for text in shown if SECRET in text]


async def test_locks_need_a_started_coordinator(file_url: str, prefix: str) -> None:
    coordinator = make_coordinator(file_url, prefix)
    with pytest.raises(LockCreationFailed, match="is not started"):
        coordinator.get_lock("x")
    lock = Lock("x", coordinator=coordinator)
    with pytest.raises(LockCreationFailed, match="is not started"):
        await lock.acquire()
    assert not lock.locked()
    with pytest.raises(LockCreationFailed, match="no default coordinator"):
        get_default_coordinator()


def test_every_error_is_a_coordination_error() -> None:
    import aiotooz

    errors = [
        value
        for value in vars(aiotooz).values()
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert len(errors) >= 7
    assert all(issubclass(error, CoordinationError) for error in errors)
