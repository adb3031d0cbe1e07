"""Hostile or mistaken input: each gets a typed CoordinationError that says what to fix,
and nothing is left held (a fresh coordinator can take every name afterwards)."""

from __future__ import annotations

import math
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
    LockAcquireFailed,
    LockCreationFailed,
    LockNameError,
    LockNotHeld,
    synchronized,
)

from ._servers import free_port
from .conftest import make_coordinator

SECRET = "pa55-w0rd-XYZ"


@dataclass
class Case:
    id: str
    error: type[CoordinationError]
    says: str  # a piece of the message that tells the user what to fix
    run: Callable[[Coordinator], Awaitable[object]]


async def _start(url: str) -> None:
    await Coordinator(settings=CoordinationSettings(backend_url=url)).start()


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
        "use one of",
        lambda _: _start(f"nosuch://u:{SECRET}@127.0.0.1:1"),
    ),
    Case(
        "unreachable host",
        BackendUnavailable,
        "cannot reach the backend",
        lambda _: _start(f"redis://u:{SECRET}@127.0.0.1:{free_port()}"),
    ),
    Case(
        "missing client library",
        ConfigurationError,
        "pip install",
        lambda _: _start("kubernetes://"),
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
    Case("release not held", LockNotHeld, "is not held", lambda c: c.get_lock("x").release()),
    Case("double release", LockNotHeld, "is not held", _release_twice),
    Case("use after stop", LockCreationFailed, "is not started", _use_after_stop),
    Case(
        "bad prefix",
        ConfigurationError,
        "prefix must be",
        lambda _: _async(lambda: Coordinator(prefix="a/b")),
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
    assert case.says in message, message
    shown = [message, repr(raised.value), *(str(entry) for entry in logs)]
    cause = raised.value.__cause__
    while cause is not None:  # chained errors are shown in tracebacks too
        shown.append(str(cause))
        cause = cause.__cause__
    assert not [text for text in shown if SECRET in text]


async def test_reentry_is_refused_not_a_hang(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator, coordinator.get_lock("r"):
        with pytest.raises(LockAcquireFailed, match="not reentrant"):
            await coordinator.get_lock("r").acquire()
