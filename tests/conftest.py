"""Shared fixtures: real backends (the file backend and a Redis server), never mocks."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
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


# -- every backend, on private servers (the conformance suite) ---------------------------

#: Every tooz backend aiotooz supports, as the conformance suite's parameters.
ALL_BACKENDS = [
    "file",
    "ipc",
    "redis",
    "memcached",
    "zookeeper",
    "etcd3+http",
    "postgresql",
    "mysql",
]
#: The private server each backend needs (tests/_servers.py); file and ipc need none.
_SERVER_OF = {"etcd3+http": "etcd"}


class ServerPool:
    """Private servers for the whole test session, each started when a test first needs it."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._servers: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        """The running private server for backend ``name`` (tests/_servers.py)."""
        from ._servers import SERVERS

        server = self._servers.get(name)
        if server is None:
            workdir = self._root / name
            workdir.mkdir(parents=True, exist_ok=True)
            server = SERVERS[name](workdir)  # skips (fails under CI) without the binary
            self._servers[name] = server
        if not server.running:
            server.start()
        return server

    def close(self) -> None:
        for server in self._servers.values():
            server.close()


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """Start a private server of this test's own: ``private_server("etcd")``.

    For tests that kill, pause or restart it (the session's shared servers must stay
    up for the other tests); closed when the test ends. Names: see tests/_servers.py.
    """
    from ._servers import SERVERS

    servers: list[Any] = []

    def start(name: str) -> Any:
        server = SERVERS[_SERVER_OF.get(name, name)](tmp_path / f"server-{len(servers)}")
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def private_redis(private_server: Callable[[str], Any]) -> Any:
    """A private redis-server of this test's own (tests/_servers.py PrivateRedis)."""
    return private_server("redis")


def url_for(backend: str, pool: ServerPool, tmp_path: Path) -> str:
    """The URL of ``backend``: a temporary directory, ``ipc://``, or a private server."""
    if backend == "file":
        return (tmp_path / "locks").as_uri()
    if backend == "ipc":
        try:
            import sysv_ipc  # noqa: F401
        except ImportError:
            missing_backend("sysv_ipc is not installed (pip install 'aiotooz[ipc]')")
        return "ipc://"
    return str(pool.get(_SERVER_OF.get(backend, backend)).url)


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest) -> str:
    """The backend's name; tests using it run once per tooz backend."""
    return str(request.param)


@pytest.fixture
def any_backend_url(any_backend: str, server_pool: ServerPool, tmp_path: Path) -> str:
    """Each test using this runs on every tooz backend, on private servers."""
    return url_for(any_backend, server_pool, tmp_path)


#: Cross-process hand-off latencies measured by the conformance suite (seconds), per
#: backend; printed at the end of the run (README's backend table quotes them).
HANDOFF_LATENCIES: dict[str, list[float]] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not HANDOFF_LATENCIES:
        return
    terminalreporter.section("cross-process hand-off latency (ms)")
    terminalreporter.write_line(f"{'backend':<12} {'n':>3} {'median':>8} {'max':>8}")
    for backend, samples in sorted(HANDOFF_LATENCIES.items()):
        ordered = sorted(samples)
        median = ordered[len(ordered) // 2] * 1000
        terminalreporter.write_line(
            f"{backend:<12} {len(ordered):>3} {median:>8.1f} {ordered[-1] * 1000:>8.1f}"
        )
