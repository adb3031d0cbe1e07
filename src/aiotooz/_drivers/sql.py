"""The PostgreSQL and MySQL backends: locks of the database server, held by a session."""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import tooz.coordination

from .._exceptions import UnsupportedOperation
from . import _options
from ._base import Capability
from ._probes import ProbingDriver

#: One server-side wait of a probe, in seconds (MySQL's GET_LOCK takes whole seconds).
_SLICE = 1

__all__ = ["MySQLDriver", "PostgreSQLDriver"]

#: Whether another session holds the advisory lock tooz takes with two int4 keys.
_PG_HELD_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = %s AND objid = %s AND objsubid = 2)"
)

#: The leader records of both databases: one row per leadership key, naming the session
#: that wrote it (PostgreSQL: its pid and start time; MySQL: its connection id).
_PG_LEADERS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_leaders (key text PRIMARY KEY, member text NOT NULL,"
    " pid integer NOT NULL, backend_start timestamptz NOT NULL)"
)
_PG_PUBLISH_SQL = (
    "INSERT INTO aiotooz_leaders SELECT %s, %s, pid, backend_start FROM pg_stat_activity"
    " WHERE pid = pg_backend_pid() ON CONFLICT (key) DO UPDATE SET member = EXCLUDED.member,"
    " pid = EXCLUDED.pid, backend_start = EXCLUDED.backend_start"
)
#: The record's member, if the session that wrote it is alive and holds the advisory lock.
_PG_LEADER_SQL = (
    "SELECT r.member FROM aiotooz_leaders r"
    " JOIN pg_stat_activity a ON a.pid = r.pid AND a.backend_start = r.backend_start"
    " JOIN pg_locks l ON l.pid = r.pid AND l.locktype = 'advisory' AND l.granted"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid = %s AND l.objid = %s AND l.objsubid = 2"
    " WHERE r.key = %s"
)
_MYSQL_LEADERS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_leaders (name VARCHAR(64) PRIMARY KEY,"
    " conn_id BIGINT UNSIGNED NOT NULL, member VARCHAR(1024) NOT NULL) ENGINE=InnoDB"
)
_MYSQL_PUBLISH_SQL = (
    "INSERT INTO aiotooz_leaders VALUES (%s, CONNECTION_ID(), %s)"
    " ON DUPLICATE KEY UPDATE conn_id = VALUES(conn_id), member = VALUES(member)"
)
#: The record's member, if the connection that wrote it holds the named lock now.
_MYSQL_LEADER_SQL = (
    "SELECT member FROM aiotooz_leaders WHERE name = %s AND conn_id = IS_USED_LOCK(%s)"
)

#: The records kept beside locks (``Capability.KEEPS_RECORDS``) of both databases: one
#: row per lock key with the fencing token that wrote it, replaced only by a token at
#: least as large (a writer whose lock was taken over since is refused).
_PG_RECORDS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_records (key text PRIMARY KEY, token bigint NOT NULL,"
    " record bytea NOT NULL)"
)
_PG_READ_RECORD_SQL = "SELECT record FROM aiotooz_records WHERE key = %s"
_PG_WRITE_RECORD_SQL = (
    "INSERT INTO aiotooz_records VALUES (%s, %s, %s) ON CONFLICT (key) DO UPDATE"
    " SET token = EXCLUDED.token, record = EXCLUDED.record"
    " WHERE aiotooz_records.token <= EXCLUDED.token"
)
_MYSQL_RECORDS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_records (name VARCHAR(64) PRIMARY KEY,"
    " token BIGINT NOT NULL, record BLOB NOT NULL) ENGINE=InnoDB"
)
_MYSQL_READ_RECORD_SQL = "SELECT record FROM aiotooz_records WHERE name = %s"
#: MySQL assigns left to right: ``record`` is set while ``token`` still holds the stored one.
_MYSQL_WRITE_RECORD_SQL = (
    "INSERT INTO aiotooz_records VALUES (%s, %s, %s) ON DUPLICATE KEY UPDATE"
    " record = IF(token <= VALUES(token), VALUES(record), record),"
    " token = GREATEST(token, VALUES(token))"
)
_MYSQL_RECORD_TOKEN_SQL = "SELECT token FROM aiotooz_records WHERE name = %s"


class _SQLDriver(ProbingDriver):
    """What the two database drivers share: a look before each try, and probes.

    tooz's postgresql and mysql drivers open a connection for every try and close it when
    the try fails: a waiter polling every 50 ms would open 20 connections a second. The
    driver's own connection (opened at start, unused by locks) tells a taken lock without
    one; only a lock that looks free is tried. Any trouble with that connection means
    "not known", and the real try decides.

    A probe (``_probes``) waits with a connection of its own, one slice at a time, for
    the lock to come free (a shared advisory lock on PostgreSQL, ``GET_LOCK`` on MySQL)
    and gives back what it got at once.
    """

    #: MySQL's GET_LOCK waits whole seconds.
    probe_slice = _SLICE

    def __init__(self, coordinator: tooz.coordination.CoordinationDriver, call_timeout: float):
        super().__init__(coordinator, call_timeout)
        #: Serialises the driver's own connection, which is not thread-safe.
        self._look_guard = threading.Lock()
        #: The lock objects granted and not released: their sessions are closed on stop.
        self._granted: set[Any] = set()
        self._granted_guard = threading.Lock()

    # -- a lock lives as long as its session: the heartbeat checks the sessions ----------

    @property
    def requires_beating(self) -> bool:
        """Always: the heartbeat asks whether each held lock's session still holds it.

        The server frees a lock the moment its session ends (killed, reaped, failed over).
        """
        return True

    def heartbeat(self) -> None:
        """Nothing to refresh: the ownership check (:meth:`still_owners`) is the beat."""

    def still_owners(self, locks: Sequence[Any]) -> list[bool | None]:
        """Whether each lock's session is alive and holds it: one query for them all.

        Each lock has a session of its own (tooz opens a connection per lock); the
        question goes once per beat, on the driver's own connection, with the session
        ids of every held lock (PostgreSQL: backend pids, in ``pg_locks``, each asked
        once on its session at the first beat after its grant; MySQL: connection ids
        from the handshake, against ``IS_USED_LOCK``). A session our side knows is
        closed needs no question. The own connection is reopened and asked again once
        if it failed (it may have been killed on its own); a second failure is the
        server's.
        """
        sessions = [self._session_of(lock) for lock in locks]
        asked = [
            (lock, session)
            for lock, session in zip(locks, sessions, strict=True)
            if session is not None
        ]
        held: set[int] = set()
        if asked:
            driver: Any = self.tooz
            with self._look_guard:
                for attempt in range(2):
                    try:
                        self._reconnect_own(driver)
                        held = self._held_by_sessions(driver, asked)
                        break
                    except Exception:
                        if attempt:
                            raise
                        self._drop_own(driver)
        return [
            session is not None and id(lock) in held
            for lock, session in zip(locks, sessions, strict=True)
        ]

    @abc.abstractmethod
    def _session_of(self, lock: Any) -> int | None:
        """The server's id of the session holding ``lock``; ``None`` if it is gone."""

    @abc.abstractmethod
    def _held_by_sessions(self, driver: Any, asked: list[tuple[Any, int]]) -> set[int]:
        """Ask, in one query, which locks their sessions hold; their ``id()``s."""

    @staticmethod
    def _drop_own(driver: Any) -> None:
        """Close the driver's own connection, so that it is reopened."""
        with contextlib.suppress(Exception):
            driver._conn.close()

    def _granted_now(self, lock: Any) -> None:
        with self._granted_guard:
            self._granted.add(lock)

    def _released(self, lock: Any) -> None:
        with self._granted_guard:
            self._granted.discard(lock)

    def stop(self) -> None:
        """Stop, closing the sessions of the locks still held.

        tooz's stop leaves them open, holding their locks at the server (after a failed
        heartbeat, say, when the coordinator replaces this connection).
        """
        with self._granted_guard:
            granted, self._granted = list(self._granted), set()
        for lock in granted:
            lock.acquired = False
            connection = lock._conn
            if connection is not None:
                self._close_quietly(connection)
        super().stop()

    def waiters_elsewhere(self, lock: Any) -> int:
        """Other sessions waiting for ``lock`` at the server: other coordinators' probes."""
        with self._look_guard:
            try:
                return self._count_waiters(self.tooz, lock)
            except Exception:
                return 0

    @abc.abstractmethod
    def _count_waiters(self, driver: Any, lock: Any) -> int:
        """Ask on the driver's own connection how many sessions wait for ``lock``."""

    def taken(self, lock: Any) -> bool:
        """Whether the database shows ``lock`` taken (by any session)."""
        with self._look_guard:
            try:
                return self._look(self.tooz, lock)
            except Exception:
                return False

    @abc.abstractmethod
    def _look(self, driver: Any, lock: Any) -> bool:
        """Ask on the driver's own connection whether ``lock`` is taken."""

    # -- leadership: a row naming the session that holds the lock -------------------------

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """Write the record on the session that holds the lock, making the table if need be."""
        connection = lock._conn
        for attempt in range(2):
            try:
                with connection.cursor() as cursor:
                    self._publish(cursor, lock, member_id)
                connection.commit()
                return
            except Exception:
                connection.rollback()  # session locks survive a rollback
                if attempt:
                    raise
                try:
                    # Two sessions creating it at once: one may fail; the retry tells.
                    with connection.cursor() as cursor:
                        cursor.execute(self._leaders_ddl)
                    connection.commit()
                except Exception:
                    connection.rollback()

    # -- records beside locks: a row, on the session that holds the lock ------------------

    def read_record(self, lock: Any) -> bytes | None:
        connection = lock._conn
        try:
            with connection.cursor() as cursor:
                cursor.execute(self._read_record_sql, (lock.name.decode("ascii"),))
                row = cursor.fetchone()
            connection.commit()  # no transaction (or MySQL snapshot) left open
        except Exception as exc:
            connection.rollback()  # session locks survive a rollback
            if not self._no_table(exc):
                raise
            return None  # nobody ever kept a record
        return None if row is None else bytes(row[0])

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        """An upsert on the session that holds the lock, making the table if need be."""
        connection = lock._conn
        key = lock.name.decode("ascii")
        for attempt in range(2):
            try:
                with connection.cursor() as cursor:
                    cursor.execute(self._write_record_sql, (key, token, record))
                    written = self._record_written(cursor, key, token)
                connection.commit()
                return written
            except Exception:
                connection.rollback()
                if attempt:
                    raise
                try:
                    # Two sessions creating it at once: one may fail; the retry tells.
                    with connection.cursor() as cursor:
                        cursor.execute(self._records_ddl)
                    connection.commit()
                except Exception:
                    connection.rollback()
        raise AssertionError("unreachable")

    _records_ddl: str
    _read_record_sql: str
    _write_record_sql: str

    @abc.abstractmethod
    def _record_written(self, cursor: Any, key: str, token: int) -> bool:
        """Whether the upsert just run on ``cursor`` wrote the record."""

    def read_leader(self, key: str) -> str | None:
        """The record's member, if the session that wrote it holds the lock now."""
        lock = self.get_lock(key)
        with self._look_guard:
            driver: Any = self.tooz
            try:
                self._reconnect_own(driver)
                with driver._conn.cursor() as cursor:
                    self._read(cursor, lock, key)
                    row = cursor.fetchone()
            except Exception as exc:
                if not self._no_table(exc):
                    raise
                row = None
            finally:
                with contextlib.suppress(Exception):
                    driver._conn.commit()  # MySQL: no snapshot kept for the next read
        return None if row is None else str(row[0])

    _leaders_ddl: str

    @abc.abstractmethod
    def _publish(self, cursor: Any, lock: Any, member_id: str) -> None: ...

    @abc.abstractmethod
    def _read(self, cursor: Any, lock: Any, key: str) -> None: ...

    @abc.abstractmethod
    def _reconnect_own(self, driver: Any) -> None:
        """Reopen the driver's own connection if it was closed."""

    @staticmethod
    @abc.abstractmethod
    def _no_table(exc: Exception) -> bool:
        """Whether ``exc`` says there is no leader table yet (nobody ever led)."""


#: The advisory locks (tooz's two int4 keys) that the given sessions hold now.
_PG_SESSIONS_HOLDING_SQL = (
    "SELECT pid, classid, objid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND mode = 'ExclusiveLock' AND objsubid = 2 AND pid = ANY(%s)"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)

#: Sessions waiting for the shared advisory lock a probe takes on tooz's two int4 keys.
_PG_WAITING_SQL = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND mode = 'ShareLock'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = %s AND objid = %s AND objsubid = 2"
)

#: Sessions waiting in GET_LOCK for one name (those of the same user are visible); the
#: name is in the statement's text as a string or, sent as bytes, in hex (X'...').
_MYSQL_WAITING_SQL = (
    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE STATE = 'User lock'"
    " AND (INFO LIKE CONCAT('%%', %s, '%%') OR INFO LIKE CONCAT('%%', LOWER(HEX(%s)), '%%'))"
)


class PostgreSQLDriver(_SQLDriver):
    """PostgreSQL advisory locks (tooz maps each name to one of 65,536 of them)."""

    extra = "postgresql"
    accepted_options = _options.POSTGRESQL
    capabilities = frozenset(
        {
            Capability.KNOWS_OWNER,
            Capability.FENCES,
            Capability.WAKES_WAITERS,
            Capability.NAMES_LEADER,
            Capability.KEEPS_RECORDS,
        }
    )
    #: Two bytes of each key's MD5 (tooz's ``PostgresLock``).
    key_space = 65_536

    def _probe_connection(self) -> Any:
        driver: Any = self.tooz
        connection = driver.get_connection(driver._parsed_url, driver._options)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = '{_SLICE}s'")
        return connection

    def _ready_for_try(self, connection: Any) -> bool:
        try:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
            connection.autocommit = False  # as tooz's own connections are
        except Exception:
            return False
        return True

    def _wait_free(self, connection: Any, lock: Any) -> bool:
        import psycopg2.errors

        keys = tuple(lock.key)
        with connection.cursor() as cursor:
            try:
                # Shared: granted once the exclusive holder lets go, and never in the
                # way of another shared probe.
                cursor.execute("SELECT pg_advisory_lock_shared(%s, %s)", keys)
            except psycopg2.errors.LockNotAvailable:
                return False
            cursor.execute("SELECT pg_advisory_unlock_shared(%s, %s)", keys)
        return True

    def fencing_token(self, lock: Any) -> int | None:
        """``nextval`` of one sequence, on the session that holds the advisory lock.

        A sequence never goes back, also across a server restart (it may skip values);
        one sequence for all names is strictly increasing for each name too.
        """
        connection = lock._conn
        if connection is None or connection.closed:
            return None  # the session, and the lock with it, is gone
        for attempt in range(2):
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT nextval('aiotooz_fencing')")
                    row = cursor.fetchone()
                connection.commit()
                return int(row[0])
            except Exception:
                # Advisory locks are held by the session: a rollback keeps ours.
                connection.rollback()
                if attempt:
                    raise
                self._create_sequence(connection)
        raise AssertionError("unreachable")

    @staticmethod
    def _create_sequence(connection: Any) -> None:
        try:
            with connection.cursor() as cursor:
                # Two sessions creating it at once can fail with a unique violation.
                cursor.execute("CREATE SEQUENCE IF NOT EXISTS aiotooz_fencing")
            connection.commit()
        except Exception:
            connection.rollback()

    def __init__(self, coordinator: tooz.coordination.CoordinationDriver, call_timeout: float):
        super().__init__(coordinator, call_timeout)
        #: advisory lock (tooz's 2-byte key) -> our key held on it.
        self._held: dict[bytes, str] = {}
        self._held_guard = threading.Lock()

    _leaders_ddl = _PG_LEADERS_DDL
    _records_ddl = _PG_RECORDS_DDL
    _read_record_sql = _PG_READ_RECORD_SQL
    _write_record_sql = _PG_WRITE_RECORD_SQL

    def _record_written(self, cursor: Any, key: str, token: int) -> bool:
        return bool(cursor.rowcount > 0)  # 0: the guard refused the update

    def _publish(self, cursor: Any, lock: Any, member_id: str) -> None:
        cursor.execute(_PG_PUBLISH_SQL, (lock.name.decode("ascii"), member_id))

    def _read(self, cursor: Any, lock: Any, key: str) -> None:
        cursor.execute(_PG_LEADER_SQL, (*tuple(lock.key), key))

    def _reconnect_own(self, driver: Any) -> None:
        if driver._conn.closed:
            driver._conn = driver.get_connection(driver._parsed_url, driver._options)
        driver._conn.autocommit = True

    @staticmethod
    def _no_table(exc: Exception) -> bool:
        return type(exc).__name__ == "UndefinedTable"

    def _look(self, driver: Any, lock: Any) -> bool:
        self._reconnect_own(driver)
        with driver._conn.cursor() as cursor:
            cursor.execute(_PG_HELD_SQL, tuple(lock.key))
            row = cursor.fetchone()
        return bool(row and row[0])

    def _count_waiters(self, driver: Any, lock: Any) -> int:
        if driver._conn.closed:
            return 0
        with driver._conn.cursor() as cursor:
            cursor.execute(_PG_WAITING_SQL, tuple(lock.key))
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def _session_of(self, lock: Any) -> int | None:
        """The server's pid of the lock's session, asked once on that session.

        Not the pid the client was told at connect: behind a pooler (PgBouncer in
        session mode) that one is the pooler's, not the server's.
        """
        import psycopg2

        connection = lock._conn
        if not lock.acquired or connection is None or connection.closed:
            return None
        known = getattr(lock, "_aiotooz_session", None)
        if known is None or known[0] is not connection:
            try:
                # psycopg2 connections are thread-safe: a call of the holder's (a
                # fencing token, a leader record) waits for this one, or the reverse.
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    row = cursor.fetchone()
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                return None  # the session died: the server freed the lock with it
            known = lock._aiotooz_session = (connection, int(row[0]))
        return int(known[1])

    def _held_by_sessions(self, driver: Any, asked: list[tuple[Any, int]]) -> set[int]:
        with driver._conn.cursor() as cursor:
            cursor.execute(_PG_SESSIONS_HOLDING_SQL, ([pid for _, pid in asked],))
            rows = {(int(pid), int(classid), int(objid)) for pid, classid, objid in cursor}
        return {id(lock) for lock, pid in asked if (pid, *tuple(lock.key)) in rows}

    def try_acquire(self, lock: Any, key: str) -> bool:
        """One try, refusing a name that would wait for its own holder.

        tooz maps each name to one of only 65,536 advisory locks (2 bytes of its MD5).
        Two keys on one advisory lock exclude each other, and since tooz takes each lock
        on a connection of its own, a task holding one and asking for the other would
        wait for itself forever. Through one coordinator that is an error instead.
        """
        advisory = bytes(lock.key)
        with self._held_guard:
            other = self._held.get(advisory)
        if other is not None and other != key:
            raise UnsupportedOperation(
                f"the postgresql backend cannot hold {key!r} while this coordinator holds "
                f"{other!r}: tooz maps both to advisory lock {tuple(advisory)} (it has only "
                "65,536 of them), so waiting would never end; use other names or another "
                "backend"
            )
        if self.taken(lock):
            return False
        spare = self.take_spare(lock)
        if spare is not None:
            if lock._conn is None or lock._conn.closed:
                lock._conn = spare  # tooz's try then needs no connect of its own
            else:
                self._close_quietly(spare)
        granted = bool(lock.acquire(blocking=False))
        if granted:
            with self._held_guard:
                self._held[advisory] = key
            self._granted_now(lock)
        return granted

    def release(self, lock: Any) -> bool:
        """Unlock on the lock's session; ``False`` if that session no longer held it.

        tooz's release ignores what ``pg_advisory_unlock`` answers; a session that was
        killed (the server freed the lock then) fails the call instead.
        """
        import psycopg2

        with self._held_guard:
            self._held.pop(bytes(lock.key), None)
        self._released(lock)
        if not lock.acquired:
            return False
        lock.acquired = False
        connection = lock._conn
        if connection is None or connection.closed:
            return False  # the session is gone, and the lock with it
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s, %s)", tuple(lock.key))
                row = cursor.fetchone()
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            return False  # the session died: the server freed the lock with it
        finally:
            self._close_quietly(connection)
        return bool(row and row[0])


class MySQLDriver(_SQLDriver):
    """MySQL/MariaDB named locks (``GET_LOCK``), each on a connection of its own.

    tooz sets no read or write timeout on its PyMySQL connections, so a server that
    accepts but never answers would park the calling thread forever: every connection
    gets the call timeout as both. (psycopg2 has no such option: on PostgreSQL only the
    connection's call timeout bounds a call.)
    """

    extra = "mysql"
    accepted_options = _options.MYSQL
    capabilities = frozenset(
        {
            Capability.KNOWS_OWNER,
            Capability.FENCES,
            Capability.WAKES_WAITERS,
            Capability.NAMES_LEADER,
            Capability.KEEPS_RECORDS,
        }
    )

    def _probe_connection(self) -> Any:
        driver: Any = self.tooz
        connection = driver.get_connection(driver._parsed_url, driver._options)
        self._bound(connection)
        return connection

    def _wait_free(self, connection: Any, lock: Any) -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT GET_LOCK(%s, %s)", (lock.name, _SLICE))
            row = cursor.fetchone()
            if not row or row[0] != 1:
                return False
            cursor.execute("SELECT RELEASE_LOCK(%s)", (lock.name,))
        return True

    @classmethod
    def key_problem(cls, key: str) -> str | None:
        if len(key) <= 64:
            return None
        return (
            f"MySQL lock names are at most 64 characters and this one has {len(key)}; use a "
            "coordinator prefix of at most 7 characters (keys are at most len(prefix) + 57 "
            "characters)"
        )

    def start(self) -> None:
        super().start()
        self._bound(self.tooz._conn)  # type: ignore[attr-defined]

    def _bound(self, connection: Any) -> None:
        # PyMySQL applies these on every read and write of a connected socket.
        connection._read_timeout = connection._write_timeout = self.call_timeout

    def get_lock(self, key: str) -> Any:
        lock = super().get_lock(key)
        self._bound(lock._conn)
        return lock

    def fencing_token(self, lock: Any) -> int | None:
        """A counter row bumped on the session that holds the named lock.

        InnoDB keeps it across restarts; one counter for all names is strictly
        increasing for each name too.
        """
        connection = lock._conn
        if not connection.open:
            return None  # the session, and the lock with it, is gone
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS aiotooz_fencing "
                "(id TINYINT PRIMARY KEY, token BIGINT NOT NULL) ENGINE=InnoDB"
            )
            cursor.execute(
                "INSERT INTO aiotooz_fencing VALUES (1, LAST_INSERT_ID(1)) "
                "ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(token + 1)"
            )
            cursor.execute("SELECT LAST_INSERT_ID()")
            row = cursor.fetchone()
        connection.commit()
        return int(row[0])

    _leaders_ddl = _MYSQL_LEADERS_DDL
    _records_ddl = _MYSQL_RECORDS_DDL
    _read_record_sql = _MYSQL_READ_RECORD_SQL
    _write_record_sql = _MYSQL_WRITE_RECORD_SQL

    def _record_written(self, cursor: Any, key: str, token: int) -> bool:
        if cursor.rowcount > 0:
            return True
        # 0 rows changed: refused, or the same record written again with the same token.
        cursor.execute(_MYSQL_RECORD_TOKEN_SQL, (key,))
        row = cursor.fetchone()
        return row is not None and int(row[0]) == token

    def _publish(self, cursor: Any, lock: Any, member_id: str) -> None:
        cursor.execute(_MYSQL_PUBLISH_SQL, (lock.name.decode("ascii"), member_id))

    def _read(self, cursor: Any, lock: Any, key: str) -> None:
        cursor.execute(_MYSQL_LEADER_SQL, (key, lock.name))

    def _reconnect_own(self, driver: Any) -> None:
        if not driver._conn.open:
            driver._conn.connect()

    @staticmethod
    def _no_table(exc: Exception) -> bool:
        return bool(exc.args) and exc.args[0] == 1146  # ER_NO_SUCH_TABLE

    def _look(self, driver: Any, lock: Any) -> bool:
        self._reconnect_own(driver)
        with driver._conn.cursor() as cursor:
            cursor.execute("SELECT IS_FREE_LOCK(%s)", (lock.name,))
            row = cursor.fetchone()
        return row is not None and row[0] == 0

    def _count_waiters(self, driver: Any, lock: Any) -> int:
        if not driver._conn.open:
            return 0
        with driver._conn.cursor() as cursor:
            cursor.execute(_MYSQL_WAITING_SQL, (lock.name, lock.name))
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def try_acquire(self, lock: Any, key: str) -> bool:
        if self.taken(lock):
            return False
        spare = self.take_spare(lock)
        if spare is not None:
            if not lock._conn.open:
                lock._conn = spare  # tooz's try then needs no connect of its own
            else:
                self._close_quietly(spare)
        granted = super().try_acquire(lock, key)
        if granted:
            self._granted_now(lock)
        return granted

    def release(self, lock: Any) -> bool:
        """``RELEASE_LOCK`` on the lock's session; ``False`` if it no longer held it.

        It answers 0 (another session holds it) or NULL (nobody does); a session that
        was killed (the server freed the lock then) fails the call instead.
        """
        import pymysql

        self._released(lock)
        if not lock.acquired:
            return False
        lock.acquired = False
        connection = lock._conn
        if not connection.open:
            return False  # the session is gone, and the lock with it
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT RELEASE_LOCK(%s)", (lock.name,))
                row = cursor.fetchone()
        except (pymysql.OperationalError, pymysql.InterfaceError):
            return False  # the session died: the server freed the lock with it
        finally:
            self._close_quietly(connection)
        return row is not None and row[0] == 1

    def _session_of(self, lock: Any) -> int | None:
        connection = lock._conn
        if not lock.acquired or not connection.open:
            return None
        return int(connection.thread_id())  # from the handshake: no round trip

    def _held_by_sessions(self, driver: Any, asked: list[tuple[Any, int]]) -> set[int]:
        columns = ", ".join(["IS_USED_LOCK(%s)"] * len(asked))
        with driver._conn.cursor() as cursor:
            cursor.execute(f"SELECT {columns}", [lock.name for lock, _ in asked])
            row = cursor.fetchone()
        pairs = zip(asked, row, strict=True)
        return {id(lock) for (lock, session), holder in pairs if holder == session}

    def _ready_for_try(self, connection: Any) -> bool:
        return bool(connection.open)
