"""Fixtures and hooks only: real backends (the file backend, Redis, private servers for
every other tooz backend), never mocks. The plain helpers are in tests/support/helpers.py."""

from __future__ import annotations

import ast
import inspect
import json
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from aiotooz import Coordinator
from aiotooz import _tries as tries

from .support.helpers import (
    ALL_BACKENDS,
    FAILOVER_TIMES,
    HANDOFF_LATENCIES,
    REDIS_URL,
    SEED_VARIABLE,
    SERVER_OF,
    SLOW_POLL,
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


def _functions_of(module: Path) -> set[str]:
    """The names of every function in a module's source (its own, nested ones too)."""
    tree = ast.parse(module.read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    names = {node.name for node in ast.walk(tree) if isinstance(node, kinds)}
    return names | {"<genexpr>", "<lambda>", "<listcomp>", "<setcomp>", "<dictcomp>"}


#: Where a blocking call on the event loop is allowed: (a file, the functions of that
#: file on the call's stack) and why. Any of blockbuster's checked calls is allowed there.
ALLOWED_TO_BLOCK: list[tuple[str, set[str], str]] = [
    (
        "aiotooz/_drivers/file.py",
        {"prepare_url", "get_lock", "try_acquire", "_mark_waiting", "waiters_elsewhere"}
        | {"fencing_token", "publish_leader", "read_leader", "release"}
        | {"read_record", "write_record", "_watch_rw", "_unwatch_rw"},
        "the file backend's deliberate inline calls: one try, release (with its leader "
        "record's removal), waiting marker (a read-write lock's writer mark), fencing "
        "counter or window record on a local "
        "file (open, stat, mkdir, rename, fcntl: microseconds); three slow calls (a "
        "network file system) move them to worker threads",
    ),
    (
        "aiotooz/_settings.py",
        {"__init__"},
        "pydantic-settings looks for the .env file once, as CoordinationSettings is made",
    ),
    (
        "aiotooz/_logging.py",
        {"_emit"},
        "stdlib logging writes the event to the application's handlers, synchronously "
        "by design (aiotooz logs nothing until the application configures logging)",
    ),
    (
        "redis/utils.py",
        {"get_lib_version"},
        "redis-py (5 and later) reads its version from the installed metadata as its "
        "asyncio client opens a connection (pooled: rarely); not aiotooz's to change",
    ),
    (
        "fastapi/routing.py",
        {"_extract_endpoint_context"},
        "FastAPI reads the endpoint's source file (for error context) at its first request",
    ),
    (
        "tests/support/procs.py",
        {"run_worker", "__init__", "send", "readline", "expect", "end_input", "finish"}
        | {"_communicate", "wait", "kill", "close"},
        "the tests' worker processes: a test that starts or ends one, or waits for its "
        "answer, blocks its loop for that on purpose (moving these helpers to threads "
        "would be a change of its own)",
    ),
    (
        "tests/test_semaphore.py",
        {"one_task", "_peak", "test_limit_3_under_4_processes_of_5_tasks"},
        "the test's own log of entries and exits: one-byte O_APPEND writes, in the order "
        "they happen, are what the test checks",
    ),
    (
        "tests/support/rwmix.py",
        {"run_mix", "reader", "writer"},
        "the read-write test's own log of entries and exits: short O_APPEND writes, in "
        "the order they happen, are what the test checks",
    ),
    (
        "tests/test_rwlock.py",
        {"test_three_processes_never_let_a_writer_overlap_anyone"},
        "the read-write test's own log of entries and exits: short O_APPEND writes, in "
        "the order they happen, are what the test checks",
    ),
    (
        "tests/test_leadership.py",
        {"read_terms"},
        "the test reads the workers' record of terms (a small local file) as it polls",
    ),
    (
        "tests/test_semaphore.py",
        {"test_a_lost_slot_without_cancel_on_loss_lets_the_body_run"},
        "a plain redis-py client deletes a slot's key from outside (one command)",
    ),
    (
        "tests/test_rwlock.py",
        {"test_redis_keys_taken_away_are_a_loss"},
        "a plain redis-py client deletes a read-write lock's keys from outside (one command)",
    ),
    (
        "tests/test_leadership.py",
        {"test_leader_names_nobody_once_the_term_is_lost"},
        "a plain redis-py client deletes the leader's key from outside (one command)",
    ),
    (
        "tests/drivers/test_etcd.py",
        {"leases", "_etcd_revision", "<setcomp>"}
        | {"test_etcd_lock_taken_away_from_outside_is_lost"}
        | {"test_etcd_locks_share_one_lease_and_a_revoked_lease_loses_every_one"},
        "plain clients (HTTP to etcd) count the server's leases, take a held lock away "
        "from outside, or list and revoke a lease, with one command each: the faults and "
        "counts these tests are about",
    ),
    (
        "tests/test_lock_loss.py",
        {"test_a_taken_over_lock_cancels_the_body", "test_cancel_on_loss_false_lets_the_body_run"}
        | {"job", "leases", "_told_before_the_key_goes"}
        | {"test_etcd_lock_whose_lease_was_swapped_is_lost"},
        "plain clients (redis-py, HTTP to etcd) take a held lock away from outside, or look "
        "at its key, with one command each: the faults these tests are about",
    ),
    (
        "tests/drivers/test_sql.py",
        {"_admin", "_rows", "_sessions", "_kill", "_holder", "_waiting_at_server"}
        | {"connections"},
        "a plain PostgreSQL or MySQL client counts, finds or kills the coordinator's "
        "sessions at the server, or counts its connections before and after waiting (a "
        "query each): what these tests check",
    ),
    (
        "tests/test_lock_loss.py",
        {"test_a_stalled_event_loop_is_told_by_the_lease_rule"},
        "the test stalls the event loop on purpose (the lease rule must notice)",
    ),
    (
        "tests/drivers/test_memcached.py",
        {"test_memcached_lease_rule_counts_from_the_earliest_expiry"},
        "the test stalls the event loop on purpose (the lease rule must notice)",
    ),
    (
        "tests/test_fencing.py",
        {"test_a_corrupt_counter_is_a_clear_error_and_leaves_nothing_held"}
        | {"test_a_counter_of_many_digits_never_goes_back"},
        "the test writes a corrupt or huge fencing counter into the backend's directory "
        "from outside (a small local file), the fault it is about",
    ),
    (
        "tests/test_fencing.py",
        {"test_a_stale_holder_has_a_smaller_token_than_its_successor"},
        "the test stalls the event loop past the TTL on purpose (a stale holder)",
    ),
    (
        "tests/test_fencing.py",
        {"test_fencing_costs_nothing_without_it"},
        "a plain redis-py client counts the server's commands (one query each side)",
    ),
    (
        "tests/test_coalescing.py",
        {"_calls"},
        "a plain redis-py client counts the server's commands (one query)",
    ),
    (
        "tests/test_once_per.py",
        {"read_runs", "job"},
        "the test reads the runs its workers logged (a small local file), and plain "
        "clients look at the record from outside",
    ),
    (
        "tests/test_lock_loss.py",
        {"_take_from_outside", "<setcomp>"}
        | {"test_a_loss_that_cut_the_body_short_is_raised_after_a_release_inside"},
        "plain clients take held locks away from outside, or list a lease's keys, with "
        "one command each: the faults these tests are about",
    ),
    (
        "tests/test_lock_loss.py",
        {"test_a_block_that_outlives_its_lease_without_an_await_raises_lock_lost"},
        "the body blocks the event loop past its lease on purpose (the fault reported)",
    ),
    (
        "tests/test_settings.py",
        {"test_the_path_of_a_redis_url_selects_the_database"},
        "plain redis-py clients look for the key in databases 0 and 2 (one command each)",
    ),
    (
        "tests/test_telemetry.py",
        {"test_a_raising_sdk_never_changes_locking"},
        "a plain redis-py client takes the held lock away from outside (one command)",
    ),
    (
        "tests/test_semaphore.py",
        {"test_a_slot_found_lost_at_its_release_raises_lock_lost"},
        "a plain redis-py client takes a held slot away from outside (one command)",
    ),
    (
        "tests/test_leadership.py",
        {"wait_for"},
        "the test polls the workers' record of terms (a small local file)",
    ),
    (
        "tests/support/helpers.py",
        {"get"},
        "the first test to ask for a backend's shared private server starts it",
    ),
    (
        "tests/test_telemetry.py",
        {"test_a_loss_is_counted_and_marked_on_the_holders_span"},
        "a plain redis-py client takes the held lock away from outside (one command)",
    ),
    (
        "tests/support/servers.py",
        _functions_of(Path(__file__).parent / "support" / "servers.py"),
        "a test's private server is found, started or stopped (a subprocess and its port)",
    ),
    (
        "tests/conftest.py",
        {"start"},
        "private_server: a test starts a private server of its own",
    ),
]


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """A blocking call on the event loop fails the test, as in anyio's own tests.

    Calls made from aiotooz or from the tests themselves are checked; the checks see
    asyncio's running loop only (on trio the same code runs unchecked). Exceptions are
    in ALLOWED_TO_BLOCK, each with its reason.
    """
    with blockbuster_ctx(["aiotooz", "tests"]) as buster:
        for filename, callers, _reason in ALLOWED_TO_BLOCK:
            for function in buster.functions.values():
                function.can_block_in(filename, callers)
        yield buster


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
def slow_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls every 5 s at best: only a wake-up hands a lock over quickly."""
    monkeypatch.setattr(tries, "_POLL_FIRST", SLOW_POLL)
    monkeypatch.setattr(tries, "_POLL_CAP", SLOW_POLL)


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
    up for the other tests); closed when the test ends. Names: see tests/support/servers.py.
    """
    from .support.servers import SERVERS

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
    """A private redis-server of this test's own (tests/support/servers.py PrivateRedis)."""
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
