"""Fixtures and hooks only: real backends (the file backend, Redis, private servers for
every other tooz backend), never mocks. The plain helpers are in tests/helpers.py."""

from __future__ import annotations

import inspect
import json
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiotooz import Coordinator

from .helpers import (
    ALL_BACKENDS,
    FAILOVER_TIMES,
    HANDOFF_LATENCIES,
    REDIS_URL,
    SEED_VARIABLE,
    SERVER_OF,
    ServerPool,
    _reachable,
    make_coordinator,
    missing_backend,
    seed_for_this_run,
    url_for,
)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Mark every async test for anyio's pytest plugin, as its auto mode does.

    Auto mode (`anyio_mode`) needs anyio 4.11; the package supports anyio 4.5, and
    `nox -s tests_lowest` runs the tests there. This runs before the plugin's own hook,
    which then sees the mark.
    """
    if isinstance(collector, pytest.Class | pytest.Module) and collector.istestfunction(obj, name):
        inner = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)
        if inspect.iscoroutinefunction(inner):
            pytest.mark.anyio(obj)


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


@pytest.fixture
async def coordinator(backend_url: str, prefix: str) -> AsyncIterator[Coordinator]:
    async with make_coordinator(backend_url, prefix) as started:
        yield started


# -- random draws that a failed run can repeat ----------------------------------------------

_SEED = pytest.StashKey[int]()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of this test's random draws: ``AIOTOOZ_TEST_SEED`` if set, else a fresh one.

    Draw from ``random.Random(seed)``, never from ``random``'s global state. A failed
    test's report shows the seed (a "seed" section, see ``pytest_runtest_makereport``):
    rerun with ``AIOTOOZ_TEST_SEED=<seed>`` to draw the same. (Not ``record_property``:
    with the default xunit2 JUnit XML it warns, and warnings are errors here.)
    """
    value = seed_for_this_run()
    request.node.stash[_SEED] = value
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _SEED in item.stash:
        seed = item.stash[_SEED]
        report.sections.append(
            ("seed", f"random.Random({seed}); rerun with {SEED_VARIABLE}={seed}")
        )
    return report


# -- every backend, on private servers (the conformance suite) ---------------------------


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
        server = SERVERS[SERVER_OF.get(name, name)](tmp_path / f"server-{len(servers)}")
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


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest) -> str:
    """The backend's name; tests using it run once per tooz backend."""
    return str(request.param)


@pytest.fixture
def any_backend_url(any_backend: str, server_pool: ServerPool, tmp_path: Path) -> str:
    """Each test using this runs on every tooz backend, on private servers."""
    return url_for(any_backend, server_pool, tmp_path)


# Under pytest-xdist the figures are gathered in the test processes: each sends its own
# to the controlling process when it finishes, which prints them all.
_FIGURES = "aiotooz_figures"


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # a pytest-xdist test process
        output[_FIGURES] = json.dumps([HANDOFF_LATENCIES, FAILOVER_TIMES])


def pytest_testnodedown(node: Any, error: object) -> None:  # pytest-xdist's controller
    figures = getattr(node, "workeroutput", {}).get(_FIGURES)
    if figures is None:
        return
    handoffs, failovers = json.loads(figures)
    for mine, theirs in ((HANDOFF_LATENCIES, handoffs), (FAILOVER_TIMES, failovers)):
        for backend, samples in theirs.items():
            mine.setdefault(backend, []).extend(samples)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FAILOVER_TIMES:
        terminalreporter.section("leadership failover after SIGKILL (s)")
        for backend, samples in sorted(FAILOVER_TIMES.items()):
            shown = " ".join(f"{sample:.2f}" for sample in samples)
            terminalreporter.write_line(f"{backend:<12} {shown}")
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
