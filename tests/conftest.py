"""Shared fixtures: real backends (the file backend and a Redis server), never mocks."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiotooz import CoordinationSettings, Coordinator

REDIS_URL = os.environ.get("AIOTOOZ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
TESTS = Path(__file__).parent


def require_all_backends() -> bool:
    """Under CI a missing backend fails the run instead of skipping."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or bool(
        os.environ.get("AIOTOOZ_REQUIRE_ALL_BACKENDS")
    )


def missing_backend(reason: str) -> None:
    if require_all_backends():
        pytest.fail(f"{reason} (CI / AIOTOOZ_REQUIRE_ALL_BACKENDS requires every backend)")
    pytest.skip(reason)


def _reachable(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1):
            return True
    except OSError:
        return False


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    return (tmp_path / "locks").as_uri()


@pytest.fixture
def redis_url() -> str:
    if not _reachable(REDIS_URL):
        missing_backend(f"no Redis server at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(params=["file", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on the embedded file backend and on Redis."""
    fixture = "file_url" if request.param == "file" else "redis_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def prefix() -> str:
    """A prefix of this test's own, so tests never share keys on a shared server."""
    return f"t{uuid.uuid4().hex[:8]}-"


def make_coordinator(url: str, prefix: str, **settings: Any) -> Coordinator:
    return Coordinator(prefix=prefix, settings=CoordinationSettings(backend_url=url, **settings))


@pytest.fixture
async def coordinator(backend_url: str, prefix: str) -> AsyncIterator[Coordinator]:
    async with make_coordinator(backend_url, prefix) as started:
        yield started


@pytest.fixture
def worker_cmd() -> Iterator[list[str]]:
    """The command line that runs tests/worker.py in a fresh interpreter."""
    yield [sys.executable, str(TESTS / "worker.py")]
