"""Plain helpers the tests share: no fixtures and no hooks here (those are in conftest.py).

Real backends only, never mocks: the file backend, a Redis server, and private servers
(tests/support/servers.py) for every other tooz backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import pytest

from aiotooz import CoordinationSettings, Coordinator, Lock
from aiotooz._names import backend_key

if TYPE_CHECKING:
    from aiotooz._connection import Connection

REDIS_URL = os.environ.get("AIOTOOZ_TEST_REDIS_URL", "redis://127.0.0.1:6379")

#: How much slower Python code runs here than plain: under coverage (the nox tests
#: sessions) every line is traced, which about doubles the cost of a lock cycle. Bounds
#: on event-loop lag are multiplied by it; bounds on waits for a backend or a process are
#: generous enough without.
SLOWDOWN = 3.0 if "coverage" in sys.modules else 1.0

#: Every tooz backend aiotooz supports, as the conformance suite's parameters.
ALL_BACKENDS = [
    "file",
    "ipc",
    "redis",
    "redis+cluster",
    "memcached",
    "zookeeper",
    "etcd3+http",
    "postgresql",
    "mysql",
]
#: Backends of aiotooz's own drivers, which plain tooz processes cannot use.
WITHOUT_PLAIN_TOOZ = frozenset({"redis+cluster"})
#: The private server a backend needs, where its name differs (tests/support/servers.py
#: SERVERS); file and ipc need none.
SERVER_OF = {"etcd3+http": "etcd", "redis+cluster": "redis-cluster"}

#: Cross-process hand-off latencies measured by the conformance suite (seconds), per
#: backend; conftest.py prints them at the end of the run (README's backend table quotes
#: them).
HANDOFF_LATENCIES: dict[str, list[float]] = {}
#: Seconds from SIGKILLing a leader to another process's term, per backend, measured by
#: tests/test_leadership.py; conftest.py prints them (docs/leadership.md quotes them).
FAILOVER_TIMES: dict[str, list[float]] = {}

#: Lock names that are hard on backends: separators, dots, reserved words, lengths,
#: non-ASCII and non-characters. Each must lock a key of its own on every backend.
HOSTILE_NAMES = [
    "volume-42",
    "ümlaut-ß-名前-🔒",
    "a/b",
    "a_b",
    "a b",
    "..",
    ".",
    "../x",
    "..%2Fx",
    "/etc/passwd",
    "x" * 1000,
    "x" * 999 + "y",
    "groups",
    "tmp",
    ".driver_lock",
    "{not-a-field}",
    "\x00nul",
    "\ud800",  # a lone surrogate is a str too
]

#: Where the wake-up tests push the waiters' poll (``slow_polls`` in conftest.py): seconds.
SLOW_POLL = 5.0
#: A hand-off that waited for the next poll takes nearly SLOW_POLL; a woken one, tens of
#: milliseconds. Half the poll tells them apart with room for a loaded machine (coverage,
#: other test processes on two cores), where a fixed 0.5 s left little.
WOKEN_WITHIN = SLOW_POLL / 2

#: The environment variable that fixes the seed of the tests' random draws (``rng``).
SEED_VARIABLE = "AIOTOOZ_TEST_SEED"


def require_all_backends() -> bool:
    """Under CI a missing backend fails the run instead of skipping."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or bool(
        os.environ.get("AIOTOOZ_REQUIRE_ALL_BACKENDS")
    )


def missing_backend(reason: str) -> None:
    """Skip the test for a backend this machine lacks (fail under CI)."""
    if require_all_backends():
        pytest.fail(f"{reason} (CI / AIOTOOZ_REQUIRE_ALL_BACKENDS requires every backend)")
    pytest.skip(reason)


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1):
            return True
    except OSError:
        return False


def make_coordinator(url: str, prefix: str, **settings: Any) -> Coordinator:
    """A coordinator (not started) on ``url`` with ``prefix`` and ``settings``."""
    return Coordinator(prefix=prefix, settings=CoordinationSettings(backend_url=url, **settings))


def connection_of(coordinator: Coordinator) -> Connection:
    """The started ``coordinator``'s connection (the tests look at its lanes and routes)."""
    connection = coordinator._lock_table.connection
    assert connection is not None
    return connection


def seed_for_this_run() -> int:
    """``AIOTOOZ_TEST_SEED`` if set (to reproduce a run), else a fresh random seed."""
    fixed = os.environ.get(SEED_VARIABLE, "").strip()
    return int(fixed, 0) if fixed else random.randrange(2**32)


class ServerPool:
    """Private servers for the whole test session, each started when a test first needs it."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._servers: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        """The running private server for backend ``name`` (tests/support/servers.py)."""
        from .servers import SERVERS  # servers imports missing_backend from here

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
    return str(pool.get(SERVER_OF.get(backend, backend)).url)


async def handoffs(url: str, prefix: str, rounds: int) -> list[float]:
    """Seconds from one coordinator's release to another's grant, per round."""
    latencies = []
    async with make_coordinator(url, prefix) as first, make_coordinator(url, prefix) as second:
        for number in range(rounds):
            holder = Lock("handed", coordinator=first)
            await holder.acquire()
            granted = anyio.Event()
            times: dict[str, float] = {}

            async def wait(times: dict[str, float] = times, granted: anyio.Event = granted) -> None:
                lock = Lock("handed", coordinator=second)
                await lock.acquire()
                times["granted"] = time.perf_counter()
                await lock.release()
                granted.set()

            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await anyio.sleep(0.05 + 0.01 * number)  # the waiter is waiting now
                times["released"] = time.perf_counter()
                await holder.release()
                with anyio.fail_after(20):
                    await granted.wait()
            latencies.append(times["granted"] - times["released"])
    return latencies


@contextlib.contextmanager
def etcd_client(url: str) -> Iterator[Any]:
    """A plain etcd3gw client for the etcd server behind ``url``, closed at the end (its
    HTTP session's sockets, left to the garbage collector, were a ResourceWarning
    charged to whichever test ran next)."""
    import etcd3gw

    parts = urlsplit(url)
    client = etcd3gw.client(host=parts.hostname or "127.0.0.1", port=parts.port or 2379)
    try:
        yield client
    finally:
        client.session.close()


def etcd_lock_key(prefix: str, name: str) -> bytes:
    """The key tooz's etcd3gw driver stores a lock under."""
    return b"/tooz/locks" + f"{prefix}{name}".encode()


def pg_advisory_key(key: str) -> bytes:
    """The advisory lock tooz's postgresql driver takes for ``key``."""
    return hashlib.md5(key.encode("ascii"), usedforsecurity=False).digest()[:2]


def prefix_without_pg_collisions(prefix: str, names: Iterable[str]) -> str:
    """``prefix`` and a number, under which ``names`` fall on distinct PostgreSQL locks.

    Plain tooz's key space has 65,536 advisory locks: with a random prefix, 30 names
    held at once share one in ~0.7 % of runs, and the second is refused (a clean-clone
    run failed so). Names held one at a time need none of this.
    """
    wanted = list(names)
    for number in range(1000):
        candidate = f"{prefix}{number}-"
        if len({pg_advisory_key(backend_key(candidate, name)) for name in wanted}) == len(wanted):
            return candidate
    raise AssertionError("no prefix found")


def take_away(backend: str, url: str, key: str) -> None:
    """From outside, with the backend's own client: ``key`` is no longer ours (another
    owner's token on it, our node deleted, our session killed)."""
    parts = urlsplit(url)
    if backend == "redis+cluster":  # several hosts: no one port
        import redis.cluster

        nodes = [
            redis.cluster.ClusterNode(host, int(port))  # type: ignore[no-untyped-call]
            for host, _, port in (node.rpartition(":") for node in parts.netloc.split(","))
        ]
        cluster = redis.cluster.RedisCluster(startup_nodes=nodes)
        # aiotooz's own driver: the key is its own hash tag (keys without braces).
        cluster.set(f"aiotooz:{{{key}}}:lock".encode(), b"someone-else", px=30_000)
        cluster.close()
        return
    host, port = parts.hostname or "127.0.0.1", parts.port
    if backend == "redis":
        import redis

        client = redis.Redis(host=host, port=port or 6379)
        client.set(f"_tooz_{key}_lock".encode(), b"someone-else", px=30_000)
        client.close()
    elif backend == "memcached":
        from pymemcache.client.base import Client

        memcached = Client((host, port or 11211))
        # flags=1: raw bytes, as tooz stores a member id.
        memcached.set(b"__TOOZ_LOCK_" + key.encode(), b"someone-else", 30, noreply=False, flags=1)
        memcached.close()
    elif backend == "etcd3+http":
        with etcd_client(url) as client:
            client.put(f"/tooz/locks{key}", "someone-else")
    elif backend == "zookeeper":
        from kazoo.client import KazooClient

        zookeeper = KazooClient(hosts=f"{host}:{port}")
        zookeeper.start(timeout=10)
        try:
            path = f"/tooz/locks/{key}"
            children = zookeeper.get_children(path)
            assert children
            for child in children:
                zookeeper.delete(f"{path}/{child}")
        finally:
            zookeeper.stop()
            zookeeper.close()
    else:
        kill_sql_sessions(backend, url, key, every=False)


async def close_zookeeper_session(coordinator: Coordinator) -> None:
    """End ``coordinator``'s ZooKeeper session from outside, as its expiry would.

    A client joins the session with its id and password, then closes it; kazoo makes a
    new session, and every lock node of the old one went with it.
    """
    from kazoo.client import KazooClient

    kazoo = connection_of(coordinator).driver.tooz._coord  # type: ignore[attr-defined]
    hosts = urlsplit(coordinator.settings.backend_url).netloc
    intruder = KazooClient(hosts=hosts, client_id=kazoo.client_id)
    await anyio.to_thread.run_sync(intruder.start)
    await anyio.to_thread.run_sync(intruder.stop)  # closes the holder's session
    await anyio.to_thread.run_sync(intruder.close)


def kill_sql_sessions(backend: str, url: str, key: str, every: bool) -> None:
    """From outside, as an operator or a reaper would: end the session holding ``key``
    (``pg_terminate_backend``, ``KILL``), or, with ``every``, every client session.

    The session is found by the server lock of ``key`` (plain tooz's advisory key on
    PostgreSQL, the name on MySQL): a coordinator's main session, which holds the locks
    it tried for, or the waiter connection a lock was granted on."""
    parts = urlsplit(url)
    if backend == "postgresql":
        import hashlib

        import psycopg

        advisory = tuple(hashlib.md5(key.encode(), usedforsecurity=False).digest()[:2])
        with psycopg.connect(url, autocommit=True) as connection:
            if every:
                rows = connection.execute(
                    "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                    " AND backend_type = 'client backend'"
                ).fetchall()
            else:
                rows = connection.execute(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND classid = %s AND objid = %s AND objsubid = 2",
                    advisory,
                ).fetchall()
            pids = [pid for (pid,) in rows]
            assert pids, "no session to kill"
            for pid in pids:
                connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
            query = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)"
            _wait_gone(connection.cursor(), query, pids)
        return
    import pymysql

    connection = pymysql.connect(
        host=parts.hostname, port=parts.port or 3306, user=parts.username or "root"
    )
    try:
        with connection.cursor() as cursor:
            if every:
                cursor.execute(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
                    " AND COMMAND NOT IN ('Daemon', 'Binlog Dump') AND USER = %s",
                    (parts.username or "root",),
                )
            else:
                cursor.execute("SELECT IS_USED_LOCK(%s)", (key,))
            ids = [row[0] for row in cursor.fetchall() if row[0] is not None]
            assert ids, "no session to kill"
            for session in ids:
                cursor.execute(f"KILL {int(session)}")
            ids_in = ", ".join(str(int(session)) for session in ids)
            query = f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ({ids_in})"
            _wait_gone(cursor, query, None)
    finally:
        connection.close()


def _wait_gone(cursor: Any, query: str, sessions: list[int] | None) -> None:
    """Wait until the killed sessions are gone (a kill is a signal: it takes a moment)."""
    deadline = time.monotonic() + 10
    while True:
        cursor.execute(query, None if sessions is None else (sessions,))
        if cursor.fetchone()[0] == 0:
            return
        assert time.monotonic() < deadline, "the killed sessions did not end"
        time.sleep(0.01)
