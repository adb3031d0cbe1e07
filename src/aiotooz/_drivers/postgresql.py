"""PostgreSQL: session-level advisory locks through psycopg 3, one session per coordinator.

See ``_sessions`` for how sessions and waiter links share the work. Keys are plain
tooz's by default (two bytes of the name's MD5 as ``pg_advisory_lock(int4, int4)``), so
aiotooz and plain tooz processes exclude each other; ``keys=64`` in the URL's query
gives a 64-bit key space (``pg_advisory_lock(int8)``) for fleets with no plain tooz.
"""

from __future__ import annotations

import hashlib
import math
import urllib.parse
from typing import Any, ClassVar

from .._exceptions import ConfigurationError
from .._names import split_rw_key
from . import _options
from ._base import Capability, HolderRecord
from ._sessions import Dialect, Link, ServerLock, SessionDriver

__all__ = ["PostgreSQLDialect", "PostgreSQLDriver"]

#: Where pg_locks shows an advisory lock of this database (classid, objid, objsubid).
_MATCH = (
    "locktype = 'advisory'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid::int8 = %s AND objid::int8 = %s AND objsubid = %s"
)
_WAITING_SQL = f"SELECT count(*) FROM pg_locks WHERE NOT granted AND {_MATCH} AND NOT pid = ANY(%s)"
_FENCE_SQL = (
    f"SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks WHERE granted AND pid = %s AND {_MATCH})"
    " THEN nextval('aiotooz_fencing') END"
)
#: The leader records: one row per leadership key, naming the session that wrote it
#: (its pid and start time, so that a later session with the same pid is not it).
_FENCING_DDL = "CREATE SEQUENCE IF NOT EXISTS aiotooz_fencing"
_LEADERS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_leaders (key text PRIMARY KEY, member text NOT NULL,"
    " pid integer NOT NULL, backend_start timestamptz NOT NULL)"
)
_PUBLISH_SQL = (
    "INSERT INTO aiotooz_leaders SELECT %s, %s, pid, backend_start FROM pg_stat_activity"
    " WHERE pid = %s ON CONFLICT (key) DO UPDATE SET member = EXCLUDED.member,"
    " pid = EXCLUDED.pid, backend_start = EXCLUDED.backend_start"
)
#: The record's member, if the session that wrote it is alive and holds the lock.
_LEADER_SQL = (
    "SELECT r.member FROM aiotooz_leaders r"
    " JOIN pg_stat_activity a ON a.pid = r.pid AND a.backend_start = r.backend_start"
    f" JOIN pg_locks l ON l.pid = r.pid AND l.granted AND {_MATCH}"
    " WHERE r.key = %s"
)
#: The records kept beside locks (``Capability.KEEPS_RECORDS``): one row per key with the
#: fencing token that wrote it. Written only while the holder's session holds the lock,
#: and never over a larger token (a later holder's).
_RECORDS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_records (key text PRIMARY KEY, token bigint NOT NULL,"
    " record bytea NOT NULL)"
)
_READ_RECORD_SQL = "SELECT record FROM aiotooz_records WHERE key = %s"
_WRITE_RECORD_SQL = (
    "INSERT INTO aiotooz_records SELECT %s::text, %s::int8, %s::bytea"
    f" WHERE EXISTS (SELECT 1 FROM pg_locks WHERE granted AND pid = %s AND {_MATCH})"
    " ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, record = EXCLUDED.record"
    " WHERE aiotooz_records.token <= EXCLUDED.token"
)
#: Which lock names there are (``holders()``: pg_locks shows a name's hash only). One row
#: per name ever tried, with pg_locks' columns for it; rows may be deleted at any time.
_NAMES_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_names (key text PRIMARY KEY, classid int8 NOT NULL,"
    " objid int8 NOT NULL, objsubid int4 NOT NULL)"
)
_NAME_SQL = "INSERT INTO aiotooz_names VALUES (%s, %s, %s, %s) ON CONFLICT (key) DO NOTHING"
_NAMED_SQL = "SELECT key, classid, objid, objsubid FROM aiotooz_names WHERE left(key, %s) = %s"
#: The session holding a lock (its coordinator is in its application_name), and how
#: many sessions wait for it.
_HOLDER_SQL = (
    "SELECT a.application_name, coalesce(a.client_hostname, host(a.client_addr)), a.pid,"
    f" (SELECT count(*) FROM pg_locks WHERE NOT granted AND {_MATCH})"
    f" FROM pg_stat_activity a WHERE a.pid = (SELECT pid FROM pg_locks WHERE granted AND {_MATCH}"
    " LIMIT 1)"
)
#: What aiotooz puts before the member id in its sessions' application_name.
_APPLICATION = "aiotooz "
_POOLED = (
    "the PostgreSQL server is reached through a pooler in transaction or statement mode "
    "(two connections were served by one server session{detail}): advisory locks belong "
    "to a server session and would not exclude anything there; connect directly, or "
    "through session pooling (PgBouncer pool_mode = session)"
)
_KEY_SPACES = ("tooz", "64")


class PostgreSQLDialect(Dialect):
    """PostgreSQL's advisory locks in SQL, through psycopg 3."""

    scheme: ClassVar[str] = "postgresql"

    def __init__(self, url: str, member_id: str, call_timeout: float, wait_slice: int) -> None:
        import psycopg  # noqa: F401  (ImportError: the connection layer names the extra)

        super().__init__(url, member_id, call_timeout, wait_slice)
        parts = urllib.parse.urlsplit(url)
        query = {name: values[-1] for name, values in urllib.parse.parse_qs(parts.query).items()}
        keys = query.get("keys", "tooz")
        if keys not in _KEY_SPACES:
            raise ConfigurationError(
                f"keys={keys!r} in a postgresql URL: use keys=tooz (plain tooz's 65,536 "
                "keys, the default: aiotooz and plain tooz exclude each other) or keys=64 "
                "(a 64-bit key space, for fleets with no plain tooz process)"
            )
        #: Whether keys are 64-bit (``keys=64``), not plain tooz's two bytes of MD5.
        self.wide = keys == "64"
        self._args_sql = "%s::int8" if self.wide else "%s::int4, %s::int4"
        self._connect_args: dict[str, Any] = {
            "host": query.get("host") or parts.hostname,
            "port": query.get("port") or parts.port,
            "dbname": query.get("dbname") or parts.path[1:] or None,
            "user": urllib.parse.unquote(parts.username) if parts.username else None,
            "password": urllib.parse.unquote(parts.password) if parts.password else None,
            # libpq takes whole seconds, and at least 2.
            "connect_timeout": max(2, math.ceil(call_timeout)),
            "autocommit": True,  # session locks; a failed statement must not abort anything
            "prepare_threshold": None,
            # Which coordinator a session belongs to, in pg_stat_activity (63 bytes).
            "application_name": f"aiotooz {member_id}"[:63],
        }

    def lock_for(self, key: str) -> ServerLock:
        rw = split_rw_key(key)
        if rw is not None:
            return _rw_lock_for(key, *rw)
        name = key.encode("ascii")
        digest = hashlib.md5(name, usedforsecurity=False).digest()
        if self.wide:
            value = int.from_bytes(digest[:8], "big", signed=True)
            unsigned = value & 0xFFFFFFFFFFFFFFFF
            return ServerLock(key, name, (value,), (unsigned >> 32, unsigned & 0xFFFFFFFF, 1))
        # Plain tooz's key: the first two bytes of the MD5, as two int4.
        return ServerLock(key, name, (digest[0], digest[1]), (digest[0], digest[1], 2))

    # -- sessions ------------------------------------------------------------------------

    def connect(self, waiter: bool) -> Link:
        import psycopg

        connection = psycopg.connect(
            **{name: value for name, value in self._connect_args.items() if value is not None}
        )
        try:
            if waiter:
                # A wait leaves the queue after a slice (and tries again), so that a stop
                # whose cancel got lost is still noticed.
                connection.execute(f"SET lock_timeout = '{self.wait_slice}s'")
            row = connection.execute("SELECT pg_backend_pid()").fetchone()
        except BaseException:
            connection.close()
            raise
        assert row is not None
        return Link(connection, int(row[0]))

    def check_session(self, main: Link, other: Link) -> None:
        """Refuse transaction or statement pooling: it shares server sessions.

        The other connection, inside a transaction, asks its server session's pid: a
        pooler that hands server sessions out per transaction gives it the one the main
        connection's last statement used (the most recently freed one), or refuses the
        transaction (statement pooling).
        """
        import psycopg

        first = self._pid(main)
        try:
            with other.connection.transaction():
                theirs = self._pid(other)
                again = self._pid(main)
        except psycopg.Error as exc:
            raise ConfigurationError(_POOLED.format(detail=f", or refused: {exc}")) from exc
        if theirs == first or again != first or theirs != other.id:
            raise ConfigurationError(_POOLED.format(detail=f": pid {first}"))

    @staticmethod
    def _pid(link: Link) -> int:
        row = link.connection.execute("SELECT pg_backend_pid()").fetchone()
        return int(row[0])

    def usable(self, link: Link) -> bool:
        return not (link.connection.closed or link.connection.broken)

    # -- locks ---------------------------------------------------------------------------

    def _scalar(self, link: Link, sql: str, params: tuple[Any, ...]) -> Any:
        row = link.connection.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def _call(self, function: str, lock: ServerLock) -> str:
        """``SELECT function(args)`` for ``lock``: its ``_shared`` form for a reader."""
        if lock.shared is None:
            return f"SELECT {function}({self._args_sql})"
        return f"SELECT {function}{'_shared' if lock.shared else ''}(%s::int4, %s::int4)"

    def try_lock(self, link: Link, lock: ServerLock) -> bool:
        return bool(self._scalar(link, self._call("pg_try_advisory_lock", lock), lock.args))

    def unlock(self, link: Link, lock: ServerLock) -> bool:
        return bool(self._scalar(link, self._call("pg_advisory_unlock", lock), lock.args))

    def unlock_stray(self, link: Link, lock: ServerLock) -> bool:
        # Only if held: an unlock of a lock not held makes the server warn.
        sql = (
            self._call("pg_advisory_unlock", lock) + " FROM pg_locks"
            f" WHERE granted AND pid = pg_backend_pid() AND {_MATCH}"
        )
        if lock.shared is not None:  # once: other holders of this process may share it
            sql += " LIMIT 1"
        try:
            link.connection.execute(sql, (*lock.args, *lock.ids)).fetchall()
        except Exception:
            return False
        return True

    def wait_lock(self, link: Link, lock: ServerLock) -> bool:
        import psycopg.errors

        try:
            link.connection.execute(self._call("pg_advisory_lock", lock), lock.args)
        except psycopg.errors.LockNotAvailable:
            return False  # lock_timeout: one slice over
        return True

    def cancel(self, main: Link | None, link: Link) -> None:
        link.connection.cancel_safe(timeout=self.call_timeout)

    def alive(self, main: Link, ids: list[int]) -> set[int]:
        rows = main.connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (ids,)
        ).fetchall()
        return {int(row[0]) for row in rows}

    def waiting(self, main: Link, lock: ServerLock, ours: list[int]) -> int:
        return int(self._scalar(main, _WAITING_SQL, (*lock.ids, ours)) or 0)

    # -- fencing and leadership ----------------------------------------------------------

    def fence(self, main: Link, lock: ServerLock, holder: Link) -> int | None:
        """``nextval`` of one sequence, if the holder's session holds the lock now.

        A sequence never goes back, also across a server restart (it may skip values);
        one sequence for all names is strictly increasing for each name too.
        """
        params = (holder.id, *lock.ids)
        row = _execute_creating(main, _FENCE_SQL, params, _FENCING_DDL).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def publish(self, main: Link, lock: ServerLock, holder: Link, member_id: str) -> None:
        _execute_creating(main, _PUBLISH_SQL, (lock.key, member_id, holder.id), _LEADERS_DDL)

    def read_leader(self, main: Link, lock: ServerLock) -> str | None:
        import psycopg.errors

        try:
            member = self._scalar(main, _LEADER_SQL, (*lock.ids, lock.key))
        except psycopg.errors.UndefinedTable:
            return None  # nobody ever led here
        return None if member is None else str(member)

    def name_lock(self, main: Link, lock: ServerLock) -> None:
        _execute_creating(main, _NAME_SQL, (lock.key, *lock.ids), _NAMES_DDL)

    def read_holder(self, main: Link, lock: ServerLock) -> HolderRecord | None:
        return self._holder(main, lock.key, lock.ids)

    def _holder(self, main: Link, key: str, ids: tuple[int, ...]) -> HolderRecord | None:
        row = main.connection.execute(_HOLDER_SQL, (*ids, *ids)).fetchone()
        if row is None:
            return None
        application, host, session, waiters = row
        member = application[len(_APPLICATION) :] if application.startswith(_APPLICATION) else None
        return HolderRecord(
            key, member_id=member, host=host, waiters=int(waiters), session=int(session)
        )

    def list_holders(self, main: Link, key_prefix: str) -> list[HolderRecord]:
        import psycopg.errors

        try:
            named = main.connection.execute(_NAMED_SQL, (len(key_prefix), key_prefix)).fetchall()
        except psycopg.errors.UndefinedTable:
            return []  # nothing was ever locked here
        # Only this key space's rows: keys=64 and plain tooz's keys are told apart by objsubid.
        space = 1 if self.wide else 2
        holders = []
        for key, *ids in named:
            if ids[2] == space:
                holder = self._holder(main, key, tuple(ids))
                if holder is not None:
                    holders.append(holder)
        return holders

    def read_record(self, main: Link, lock: ServerLock) -> bytes | None:
        import psycopg.errors

        try:
            record = self._scalar(main, _READ_RECORD_SQL, (lock.key,))
        except psycopg.errors.UndefinedTable:
            return None  # nobody ever kept a record here
        return None if record is None else bytes(record)

    def write_record(
        self, main: Link, lock: ServerLock, holder: Link, record: bytes, token: int
    ) -> bool:
        params = (lock.key, token, record, holder.id, *lock.ids)
        cursor = _execute_creating(main, _WRITE_RECORD_SQL, params, _RECORDS_DDL)
        return bool(cursor.rowcount > 0)  # 0: not held by the holder's session, or a larger token


def _rw_lock_for(key: str, family: str, write: bool) -> ServerLock:
    """The server lock of a read-write lock's reader or writer: one per family.

    The two-``int4`` form, from eight bytes of the family's MD5; taken shared by
    readers, exclusive by writers. A space of its own in practice, with either key
    space: plain tooz's keys are two ``int4`` below 256 (a family falls there once in
    2**24), ``keys=64``'s are ``int8`` (another space of the server's). PostgreSQL
    queues a try behind the waiters it conflicts with, so a writer waiting at the
    server keeps new readers out.
    """
    digest = hashlib.md5(family.encode("ascii"), usedforsecurity=False).digest()
    first = int.from_bytes(digest[:4], "big", signed=True)
    second = int.from_bytes(digest[4:8], "big", signed=True)
    ids = (first & 0xFFFFFFFF, second & 0xFFFFFFFF, 2)
    return ServerLock(key, key.encode("ascii"), (first, second), ids, shared=not write)


def _execute_creating(link: Link, sql: str, params: tuple[Any, ...], ddl: str) -> Any:
    """Run ``sql``; where its table or sequence does not exist yet, make it and run again.

    Returns:
        psycopg's cursor of the statement.
    """
    import psycopg.errors

    try:
        return link.connection.execute(sql, params)
    except psycopg.errors.UndefinedTable:
        try:
            link.connection.execute(ddl)
        except psycopg.errors.UniqueViolation:
            pass  # made by another session at the same time
        return link.connection.execute(sql, params)


class PostgreSQLDriver(SessionDriver):
    """PostgreSQL advisory locks, all of a coordinator's held by one session."""

    extra = "postgresql"
    dialect = PostgreSQLDialect
    accepted_options = _options.POSTGRESQL
    capabilities = SessionDriver.capabilities | {Capability.SHARES_LOCKS}
    #: Plain tooz's keys: two bytes of each key's MD5.
    key_space: ClassVar[int | None] = 65_536
    break_refusal: ClassVar[str] = (
        "an advisory lock belongs to the server session that took it, which holds every "
        "lock of its coordinator; stop the holder's process (on {host}), or end its "
        "session with SELECT pg_terminate_backend({session}), which frees every lock that "
        "coordinator holds"
    )

    @classmethod
    def load(cls, url: str, member_id: str, options: Any, call_timeout: float) -> SessionDriver:
        sql = PostgreSQLDialect(url, member_id, call_timeout, cls.wait_slice)
        return (_WidePostgreSQLDriver if sql.wide else cls)(sql, call_timeout)


class _WidePostgreSQLDriver(PostgreSQLDriver):
    """``keys=64``: 2**64 advisory keys, so two keys in use never share one."""

    key_space = None
