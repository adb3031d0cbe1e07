"""Mistakes get a typed CoordinationError that says what to fix, and nothing stays held."""

from __future__ import annotations

import pytest

from aiotooz import (
    BackendUnavailable,
    ConfigurationError,
    CoordinationError,
    CoordinationSettings,
    Coordinator,
    Lock,
    LockCreationFailed,
    get_default_coordinator,
)

from ._servers import free_port
from .conftest import make_coordinator


async def test_unknown_scheme_lists_the_known_ones(prefix: str) -> None:
    coordinator = make_coordinator("consul://127.0.0.1:8500", prefix)
    with pytest.raises(ConfigurationError, match=r"unknown backend scheme 'consul'.*redis"):
        await coordinator.start()
    assert not coordinator.is_started


async def test_missing_client_library_says_what_to_install(prefix: str) -> None:
    # tooz registers a kubernetes driver, whose client library is not installed here.
    pytest.importorskip("tooz")
    try:
        import kubernetes  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.fail("this test needs the kubernetes client library to be absent")
    coordinator = make_coordinator("kubernetes://", prefix)
    with pytest.raises(ConfigurationError, match="pip install kubernetes"):
        await coordinator.start()


async def test_unreachable_server_is_backend_unavailable(prefix: str) -> None:
    coordinator = make_coordinator(f"redis://127.0.0.1:{free_port()}", prefix)
    with pytest.raises(BackendUnavailable, match="cannot reach the backend"):
        await coordinator.start()
    assert not coordinator.is_started


@pytest.mark.parametrize("bad", ["has space", "../up", "é", "x" * 65, 7])
def test_bad_prefix(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="prefix must be"):
        Coordinator(prefix=bad, settings=CoordinationSettings())  # type: ignore[arg-type]


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
