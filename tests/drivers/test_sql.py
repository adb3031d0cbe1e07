"""PostgreSQL and MySQL: one session per coordinator, waiting at the server, loss, poolers,
killed sessions, and what each cannot do (names on one advisory lock, keys over 64
characters).

Sessions are counted and killed at the server itself (``pg_stat_activity`` and
``pg_terminate_backend``; the process list and ``KILL``), through a connection of the
test's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from aiotooz import ConfigurationError, Coordinator, Lock, LockLost, UnsupportedOperation
from aiotooz._lock import held_handle

from ..support.helpers import (
    ServerPool,
    kill_sql_sessions,
    make_coordinator,
    pg_advisory_key,
    prefix_without_pg_collisions,
    url_for,
)
from ..support.procs import holding_process, run_worker
from ..support.servers import PrivatePgBouncer

BACKENDS = ["postgresql", "mysql"]
#: Waiter links a coordinator opens at most (SessionDriver.waiter_limit).
WAITER_LIMIT = 4


@contextlib.contextmanager
def _admin(backend: str, url: str) -> Iterator[Any]:
    """A connection of the test's own to the server behind ``url`` (autocommit)."""
    if backend == "postgresql":
        import psycopg

        with psycopg.connect(url.split("?")[0], autocommit=True) as connection:
            yield connection
    else:
        from urllib.parse import urlsplit

        import pymysql

        parts = urlsplit(url)
        connection = pymysql.connect(
            host=parts.hostname, port=parts.port, user=parts.username, autocommit=True
        )
        try:
            yield connection
        finally:
            connection.close()


def _rows(connection: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    cursor = connection.cursor()
    try:
        cursor.execute(sql, params)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _sessions(backend: str, url: str) -> set[int]:
    """The client sessions the server has now, but the one asking."""
    with _admin(backend, url) as connection:
        if backend == "postgresql":
            sql = (
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND pid <> pg_backend_pid()"
            )
        else:
            sql = (
                "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
                " AND COMMAND <> 'Daemon' AND USER <> 'system user'"
            )
        return {int(row[0]) for row in _rows(connection, sql)}


def _kill(backend: str, url: str, sessions: set[int]) -> None:
    with _admin(backend, url) as connection:
        for session in sessions:
            if backend == "postgresql":
                _rows(connection, "SELECT pg_terminate_backend(%s)", (session,))
            else:
                with contextlib.suppress(Exception):  # gone already
                    _rows(connection, f"KILL {int(session)}")


def _holder(backend: str, url: str, key: str) -> int | None:
    """The session that holds ``key``'s lock at the server (plain tooz's key mapping)."""
    with _admin(backend, url) as connection:
        if backend == "mysql":
            rows = _rows(connection, "SELECT IS_USED_LOCK(%s)", (key,))
        else:
            digest = hashlib.md5(key.encode(), usedforsecurity=False).digest()
            rows = _rows(
                connection,
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid = %s AND objid = %s AND objsubid = 2",
                (digest[0], digest[1]),
            )
    return int(rows[0][0]) if rows and rows[0][0] is not None else None


def _waiting_at_server(backend: str, url: str, key: str) -> int:
    """Sessions queued at the server for ``key``'s lock."""
    with _admin(backend, url) as connection:
        if backend == "mysql":
            sql = (
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                " WHERE STATE = 'User lock' AND (INFO LIKE %s OR INFO LIKE %s)"
            )
            # A bytes name (as plain tooz and aiotooz send it) is in the statement in hex
            # (X'...', PyMySQL >= 1.1) or as text (_binary'...', older PyMySQL).
            return int(_rows(connection, sql, (f"%{key}%", f"%{key.encode().hex()}%"))[0][0])
        digest = hashlib.md5(key.encode(), usedforsecurity=False).digest()
        sql = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND classid = %s AND objid = %s AND objsubid = 2"
        )
        return int(_rows(connection, sql, (digest[0], digest[1]))[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_thousand_locks_and_ten_waiters_use_at_most_one_plus_the_waiter_cap(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """tooz took a connection per held lock: 1,000 locks were 1,000 connections (past
    the server's max_connections). One coordinator now uses its session and at most
    WAITER_LIMIT waiter links, and every waiter still gets its lock."""
    url = url_for(backend, server_pool, tmp_path)
    if backend == "postgresql":
        url += "?keys=64"  # 1,010 names in plain tooz's 65,536 keys: some would collide
    async with make_coordinator(url, prefix) as other:
        busy = [Lock(f"busy-{number}", coordinator=other) for number in range(10)]
        for lock in busy:
            await lock.acquire()
        before = _sessions(backend, url)
        async with make_coordinator(url, prefix) as coordinator:
            held = [Lock(f"held-{number}", coordinator=coordinator) for number in range(1000)]
            for lock in held:
                assert await lock.acquire(blocking=False)
            got: list[str] = []

            async def wait_for(name: str) -> None:
                async with Lock(name, coordinator=coordinator):
                    got.append(name)

            async with anyio.create_task_group() as group:
                for lock in busy:
                    group.start_soon(wait_for, lock.name)
                await anyio.sleep(1.0)  # every waiter has tried and queued (or polls)
                assert coordinator.statistics().release_watchers <= WAITER_LIMIT
                used = _sessions(backend, url) - before
                assert 1 <= len(used) <= 1 + WAITER_LIMIT, used
                assert not got
                for lock in busy:
                    await lock.release()
                with anyio.fail_after(20):
                    while len(got) < len(busy):
                        await anyio.sleep(0.05)
            assert len(_sessions(backend, url) - before) <= 1 + WAITER_LIMIT
            for lock in held:
                await lock.release()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_killed_session_loses_every_lock_on_it_and_the_coordinator_reconnects(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """Killing a waiter link loses the lock it got for its waiter, and only that one;
    killing the main session loses every lock; each holder is told within the
    heartbeat interval (and the call timeout), and later acquires work."""
    url = url_for(backend, server_pool, tmp_path)
    prefix = prefix_without_pg_collisions(prefix, [*(f"k{n}" for n in range(20)), "contested"])
    heartbeat = 0.2
    async with make_coordinator(url, prefix) as other:
        async with make_coordinator(url, prefix, heartbeat=heartbeat) as coordinator:
            main_locks = [Lock(f"k{n}", coordinator=coordinator) for n in range(20)]
            for lock in main_locks:
                assert await lock.acquire(blocking=False)
            # One lock granted through the server's queue, on a waiter link.
            contested = Lock("contested", coordinator=other)
            await contested.acquire()
            waited = Lock("contested", coordinator=coordinator)
            async with anyio.create_task_group() as group:
                group.start_soon(waited.acquire)
                with anyio.fail_after(10):
                    while _waiting_at_server(backend, url, prefix + "contested") == 0:
                        await anyio.sleep(0.02)
                await contested.release()
            main = _holder(backend, url, prefix + "k0")
            link = _holder(backend, url, prefix + "contested")
            assert main is not None and link is not None and link != main

            _kill(backend, url, {link})
            killed = anyio.current_time()
            with anyio.fail_after(10):
                await waited.wait_lost()
            told = anyio.current_time() - killed
            assert not any(lock.lost for lock in main_locks)

            _kill(backend, url, {main})
            killed = anyio.current_time()
            with anyio.fail_after(10):
                for lock in main_locks:
                    await lock.wait_lost()
            told = max(told, anyio.current_time() - killed)
            # A heartbeat, and the early one a failed call asks for; generous for a
            # loaded machine.
            assert told < heartbeat + 3.0, told

            with anyio.fail_after(20):
                async with Lock("after", coordinator=coordinator):
                    assert _holder(backend, url, prefix + "after") not in (None, main, link)
            assert coordinator.statistics().reconnects >= 1
            for lock in main_locks:
                with contextlib.suppress(Exception):
                    await lock.release()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_record_is_written_only_while_the_holders_session_holds_the_lock(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """The record beside a lock (``@once_per``'s) is written on the main session for the
    session that holds the lock: once that session is gone (a waiter link killed before
    any beat could tell), the write is refused; a write of the same record again, with
    the same token, is no refusal."""
    url = url_for(backend, server_pool, tmp_path)
    async with (
        make_coordinator(url, prefix) as other,
        make_coordinator(url, prefix, heartbeat=30) as coordinator,
    ):
        kept = Lock("kept", coordinator=coordinator, fencing=True)
        async with kept:
            handle = held_handle(kept)
            first = kept.fencing_token
            assert first is not None
            assert await handle.write_record(b"one", first)
            assert await handle.write_record(b"one", first)  # unchanged, still ours
            assert await handle.read_record() == b"one"
        contested = Lock("contested", coordinator=other)
        await contested.acquire()
        waited = Lock("contested", coordinator=coordinator, fencing=True)
        async with anyio.create_task_group() as group:
            group.start_soon(waited.acquire)
            with anyio.fail_after(10):
                while _waiting_at_server(backend, url, prefix + "contested") == 0:
                    await anyio.sleep(0.02)
            await contested.release()
        handle = held_handle(waited)
        token = waited.fencing_token
        assert token is not None
        link = _holder(backend, url, prefix + "contested")
        async with Lock("on-main", coordinator=coordinator):
            main = _holder(backend, url, prefix + "on-main")
        assert link is not None and main is not None and link != main
        assert await handle.write_record(b"granted", token)
        _kill(backend, url, {link})
        with anyio.fail_after(10):
            while _holder(backend, url, prefix + "contested") is not None:
                await anyio.sleep(0.02)
        assert not await handle.write_record(b"too late", token + 1)
        assert await handle.read_record() == b"granted"
        with contextlib.suppress(Exception):
            await waited.release()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_waiter_that_gives_up_leaves_the_servers_queue_at_once(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """Its wait is cancelled at the server, not left to run out its 5 s slice."""
    url = url_for(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix) as other, make_coordinator(url, prefix) as waiter:
        async with Lock("queue", coordinator=other):
            lock = Lock("queue", coordinator=waiter)
            async with anyio.create_task_group() as group:
                group.start_soon(lock.acquire, 1.0)
                with anyio.fail_after(10):
                    while _waiting_at_server(backend, url, prefix + "queue") == 0:
                        await anyio.sleep(0.02)
            gave_up = anyio.current_time()
            with anyio.fail_after(2):  # the slice is 5 s
                while _waiting_at_server(backend, url, prefix + "queue") > 0:
                    await anyio.sleep(0.02)
            assert anyio.current_time() - gave_up < 2
            assert not lock.locked()
        # No grant was left behind on the waiter's side: a third coordinator gets it.
        async with make_coordinator(url, prefix) as third:
            taken = Lock("queue", coordinator=third)
            assert await taken.acquire(blocking=False)
            await taken.release()


async def test_64_bit_keys_are_a_url_option(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """keys=64 takes pg_advisory_lock(int8); an unknown key space is refused. Only
    plain tooz's keys may share a lock (semaphores skip their larger-limit check)."""
    url = url_for("postgresql", server_pool, tmp_path)
    async with make_coordinator(url, prefix) as coordinator:
        assert not coordinator._lock_table.keys_distinct
    async with make_coordinator(f"{url}?keys=64", prefix) as coordinator:
        assert coordinator._lock_table.keys_distinct
        async with Lock("wide", coordinator=coordinator):
            with _admin("postgresql", url) as connection:
                rows = _rows(
                    connection,
                    "SELECT objsubid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND pid IN (SELECT pid FROM pg_stat_activity WHERE application_name"
                    " = %s)",
                    (f"aiotooz {coordinator.member_id}"[:63],),
                )
            assert [row[0] for row in rows] == [1]  # 1: one int8 key; 2: two int4
    with pytest.raises(ConfigurationError, match=r"keys='32'.* must be tooz"):
        async with make_coordinator(f"{url}?keys=32", prefix):
            pass


@pytest.mark.parametrize(("pool_mode", "works"), [("session", True), ("transaction", False)])
async def test_pgbouncer_session_pooling_works_and_transaction_pooling_is_refused(
    pool_mode: str, works: bool, tmp_path: Path, prefix: str
) -> None:
    """Behind transaction pooling advisory locks silently stop excluding: refused."""
    bouncer = PrivatePgBouncer(tmp_path / "pgbouncer", pool_mode)
    await anyio.to_thread.run_sync(bouncer.start)
    try:
        coordinator = make_coordinator(bouncer.url, prefix)
        if not works:
            with pytest.raises(ConfigurationError, match="pool_mode = session"):
                await coordinator.start()
            return
        async with coordinator, make_coordinator(bouncer.url, prefix) as other:
            async with Lock("bounced", coordinator=coordinator):
                assert not await Lock("bounced", coordinator=other).acquire(blocking=False)
            assert await _acquire_and_release(other)
    finally:
        await anyio.to_thread.run_sync(bouncer.close)


async def _acquire_and_release(coordinator: Coordinator) -> bool:
    lock = Lock("bounced", coordinator=coordinator)
    granted = await lock.acquire(blocking=5)
    if granted:
        await lock.release()
    return granted


# -- a lock lives as long as its session: sessions killed from outside -------------------


def _queued_at_server(backend: str, url: str, key: str) -> bool:
    """Whether a session waits for ``key`` in the server's queue."""
    return _waiting_at_server(backend, url, key) > 0


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
async def test_a_killed_sql_session_is_a_lost_lock(
    server_pool: ServerPool, tmp_path: Path, prefix: str, backend: str
) -> None:
    """The server frees a lock the moment its session ends: the holder went on, never
    told, while another process took the lock. Here the lock was granted through the
    server's queue, on a waiter connection of its own (the coordinator's main session
    holds the rest): killing that session loses that lock, and the coordinator keeps
    its connection."""
    url = url_for(backend, server_pool, tmp_path)
    heartbeat = 0.5
    async with (
        make_coordinator(url, prefix) as other,
        make_coordinator(url, prefix, heartbeat=heartbeat) as coordinator,
    ):
        held = coordinator.get_lock("kept")
        await held.acquire()
        taken = other.get_lock("killed")
        await taken.acquire()
        async with anyio.create_task_group() as group:
            group.start_soon(_wait_then_release, backend, url, f"{prefix}killed", taken)
            with pytest.raises(LockLost, match="the session that held it ended"):
                async with coordinator.get_lock("killed"):
                    await anyio.to_thread.run_sync(
                        kill_sql_sessions, backend, url, f"{prefix}killed", False
                    )
                    killed = anyio.current_time()
                    try:
                        await anyio.sleep(30)
                    finally:
                        noticed = anyio.current_time() - killed
        # A beat or two, and slack for a loaded machine.
        assert noticed < 2 * heartbeat + 2, noticed
        assert coordinator.statistics().reconnects == 0  # the lock's loss, not the connection's
        assert not held.lost  # held by the main session, which lives on
        # Another process can take it, and so can this coordinator.
        outcome = await anyio.to_thread.run_sync(run_worker, "try", url, prefix, "killed")
        assert outcome == "acquired"
        with anyio.fail_after(10):
            async with coordinator.get_lock("killed"):
                pass
        await held.release()


async def _wait_then_release(backend: str, url: str, key: str, lock: Any) -> None:
    """Release ``lock`` once another session waits for it in the server's queue."""
    with anyio.fail_after(10):
        while not await anyio.to_thread.run_sync(_queued_at_server, backend, url, key):
            await anyio.sleep(0.02)
    await lock.release()


@pytest.mark.parametrize("every", [False, True], ids=["its session", "every session"])
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
async def test_a_killed_main_sql_session_loses_its_locks_and_reconnects(
    server_pool: ServerPool, tmp_path: Path, prefix: str, backend: str, every: bool
) -> None:
    """The coordinator's main session holds every lock it took with a try: killing it
    (alone, or with every session) loses them all, each holder is told, and the
    coordinator reconnects."""
    url = url_for(backend, server_pool, tmp_path)
    heartbeat = 0.5
    async with make_coordinator(url, prefix, heartbeat=heartbeat) as coordinator:
        with pytest.raises(LockLost, match="the connection to the backend failed"):
            async with coordinator.get_lock("killed"):
                await anyio.to_thread.run_sync(
                    kill_sql_sessions, backend, url, f"{prefix}killed", every
                )
                killed = anyio.current_time()
                try:
                    await anyio.sleep(30)
                finally:
                    noticed = anyio.current_time() - killed
        # A beat or two, and slack for a loaded machine.
        assert noticed < 2 * heartbeat + 2, noticed
        # Another process can take it, and so can this coordinator (reconnected).
        outcome = await anyio.to_thread.run_sync(run_worker, "try", url, prefix, "killed")
        assert outcome == "acquired"
        with anyio.fail_after(10):
            async with coordinator.get_lock("killed"):
                pass
        assert coordinator.statistics().reconnects >= 1


# -- what PostgreSQL and MySQL cannot do, and what waiting costs -------------------------


def _colliding_names(prefix: str) -> tuple[str, str]:
    seen: dict[bytes, str] = {}
    for number in range(100_000):
        name = f"n{number}"
        advisory = pg_advisory_key(prefix + name)
        if advisory in seen:
            return seen[advisory], name
        seen[advisory] = name
    raise AssertionError("no collision found")


async def test_postgresql_names_on_one_advisory_lock_are_an_error(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """tooz has 65,536 advisory locks for all names; holding two that share one would
    deadlock the holder, so aiotooz says so instead of waiting for itself."""
    url = url_for("postgresql", server_pool, tmp_path)
    first, second = _colliding_names(prefix)
    async with make_coordinator(url, prefix) as coordinator:
        async with coordinator.get_lock(first):
            with pytest.raises(UnsupportedOperation, match="65,536"):
                await coordinator.get_lock(second).acquire(blocking=False)
            with anyio.fail_after(10), pytest.raises(UnsupportedOperation, match=first):
                await coordinator.get_lock(second).acquire()  # an error, not a hang
        async with coordinator.get_lock(second):  # fine once the first is released
            pass


async def test_mysql_keys_longer_than_64_characters_are_an_error(
    server_pool: ServerPool, tmp_path: Path
) -> None:
    url = url_for("mysql", server_pool, tmp_path)
    long_prefix = f"svc-{uuid.uuid4().hex[:12]}-"  # 17 characters: mapped keys reach 74
    async with make_coordinator(url, long_prefix) as coordinator:
        with pytest.raises(UnsupportedOperation, match="at most 64 characters"):
            await coordinator.get_lock("ümlaut-" + "x" * 30).acquire(blocking=False)
        async with coordinator.get_lock("x" * (64 - len(long_prefix))):  # exactly 64
            pass


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_waiting_on_a_database_opens_no_connection_per_try(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """tooz opens a connection per try and closes it when the try fails; aiotooz first
    asks on the driver's own connection, so waiting costs no new connection."""
    url = url_for(backend, server_pool, tmp_path)
    port = server_pool.get(backend).port

    def connections() -> int:
        if backend == "mysql":
            import pymysql

            with pymysql.connect(host="127.0.0.1", port=port, user="root") as conn:
                with conn.cursor() as cursor:
                    cursor.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
                    row = cursor.fetchone()
            assert row is not None
            return int(row[1])
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_force_next_flush()")
            row = conn.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = 'postgres'"
            ).fetchone()
        assert row is not None
        return int(row[0])

    async def wait_in_vain() -> int:
        async with make_coordinator(url, prefix) as coordinator:
            before = connections()
            assert await coordinator.get_lock("conns").acquire(blocking=1.0) is False
            return connections() - before

    with holding_process("hold", url, prefix, "conns"):
        # Some 20 tries: tooz alone would open 20 connections. Counted: the counting
        # connection itself (mysql) and a stray one or two.
        assert anyio.run(wait_in_vain) <= 3
