"""MySQL/MariaDB: named locks (``GET_LOCK``) through PyMySQL, one session per coordinator.

See ``_sessions`` for how sessions and waiter links share the work. A name is the same
server-side lock plain tooz takes (the key's bytes, at most 64 characters), so aiotooz
and plain tooz processes exclude each other. One session holding many named locks needs
MySQL 5.7.5 or MariaDB 10.0.2 (older servers let one session hold one).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Any, ClassVar

from . import _options
from ._base import HolderRecord
from ._sessions import Dialect, Link, ServerLock, SessionDriver

__all__ = ["MySQLDialect", "MySQLDriver"]

_ER_NO_SUCH_TABLE = 1146

#: Sessions waiting in GET_LOCK for one name (those of the same user are visible); the
#: name is in the statement's text as a string or, sent as bytes, in hex (X'...').
_WAITING_SQL = (
    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE STATE = 'User lock'"
    " AND (INFO LIKE CONCAT('%%', %s, '%%') OR INFO LIKE CONCAT('%%', LOWER(HEX(%s)), '%%'))"
    " AND ID NOT IN %s"
)
_FENCING_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_fencing "
    "(id TINYINT PRIMARY KEY, token BIGINT NOT NULL) ENGINE=InnoDB"
)
_FENCE_SQL = (
    "INSERT INTO aiotooz_fencing VALUES (1, LAST_INSERT_ID(1)) "
    "ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(token + 1)"
)
#: The leader records: one row per name, naming the connection that wrote it.
_LEADERS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_leaders (name VARCHAR(64) PRIMARY KEY,"
    " conn_id BIGINT UNSIGNED NOT NULL, member VARCHAR(1024) NOT NULL) ENGINE=InnoDB"
)
_PUBLISH_SQL = (
    "INSERT INTO aiotooz_leaders VALUES (%s, %s, %s)"
    " ON DUPLICATE KEY UPDATE conn_id = VALUES(conn_id), member = VALUES(member)"
)
#: The record's member, if the connection that wrote it holds the named lock now.
_LEADER_SQL = "SELECT member FROM aiotooz_leaders WHERE name = %s AND conn_id = IS_USED_LOCK(%s)"
#: The records kept beside locks (``Capability.KEEPS_RECORDS``): one row per name with the
#: fencing token that wrote it, written only while the holder's connection holds the
#: lock and never over a larger token. MySQL assigns left to right: ``record`` is set
#: while ``token`` still holds the stored one.
_RECORDS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_records (name VARCHAR(64) PRIMARY KEY,"
    " token BIGINT NOT NULL, record BLOB NOT NULL) ENGINE=InnoDB"
)
_READ_RECORD_SQL = "SELECT record FROM aiotooz_records WHERE name = %s"
_WRITE_RECORD_SQL = (
    "INSERT INTO aiotooz_records (name, token, record) SELECT %s, %s, %s FROM DUAL"
    " WHERE IS_USED_LOCK(%s) = %s ON DUPLICATE KEY UPDATE"
    " record = IF(aiotooz_records.token <= VALUES(token), VALUES(record), aiotooz_records.record),"
    " token = GREATEST(aiotooz_records.token, VALUES(token))"
)
#: After a write that changed no row: whether it was refused, or wrote what was there.
_RECORD_KEPT_SQL = (
    "SELECT COUNT(*) FROM aiotooz_records WHERE name = %s AND token = %s AND IS_USED_LOCK(%s) = %s"
)
#: Which lock names there are (``holders()``: MariaDB has no list of named locks). One
#: row per name ever tried; rows may be deleted at any time.
_NAMES_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_names (name VARBINARY(64) PRIMARY KEY) ENGINE=InnoDB"
)
#: Which coordinator each connection serves: written once per connection, replacing an
#: earlier connection's row with the same id.
_SESSIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS aiotooz_sessions (conn_id BIGINT UNSIGNED PRIMARY KEY,"
    " member VARCHAR(1024) NOT NULL, pid BIGINT NOT NULL, host VARCHAR(255) NOT NULL)"
    " ENGINE=InnoDB"
)
_SESSION_SQL = "REPLACE INTO aiotooz_sessions VALUES (CONNECTION_ID(), %s, %s, %s)"
_HOLDER_SQL = "SELECT member, pid, host FROM aiotooz_sessions WHERE conn_id = %s"
#: The TLS options plain tooz takes from the URL's query (``ssl_<name>``).
_SSL_OPTIONS = ("ca", "capath", "cert", "key", "cipher", "verify_mode")


def _no_table(exc: Exception) -> bool:
    return bool(exc.args) and exc.args[0] == _ER_NO_SUCH_TABLE


def _execute_creating(cursor: Any, sql: str, params: tuple[Any, ...] | None, ddl: str) -> None:
    """Run ``sql`` on ``cursor``; where its table does not exist yet, make it and run again."""
    import pymysql

    try:
        cursor.execute(sql, params)
    except pymysql.MySQLError as exc:
        if not _no_table(exc):
            raise
        cursor.execute(ddl)
        cursor.execute(sql, params)


class MySQLDialect(Dialect):
    """MySQL's named locks in SQL, through PyMySQL.

    Every connection reads and writes with a timeout (the call timeout; a wait's slice
    on top for a waiter link), so a server that accepts and never answers cannot
    park a thread forever.
    """

    scheme: ClassVar[str] = "mysql"

    def __init__(self, url: str, member_id: str, call_timeout: float, wait_slice: int) -> None:
        import pymysql  # noqa: F401  (ImportError: the connection layer names the extra)

        super().__init__(url, member_id, call_timeout, wait_slice)
        parts = urllib.parse.urlsplit(url)
        query = {name: values[-1] for name, values in urllib.parse.parse_qs(parts.query).items()}
        ssl: dict[str, Any] = {
            name: query[f"ssl_{name}"] for name in _SSL_OPTIONS if query.get(f"ssl_{name}")
        }
        if "ssl_check_hostname" in query:
            ssl["check_hostname"] = query["ssl_check_hostname"].lower() in ("1", "true", "yes")
        self._connect_args: dict[str, Any] = {
            "host": parts.hostname,
            "port": parts.port or 3306,
            "user": urllib.parse.unquote(parts.username) if parts.username else None,
            "password": urllib.parse.unquote(parts.password) if parts.password else "",
            "database": parts.path[1:] or None,
            "unix_socket": query.get("unix_socket"),
            "ssl": ssl or None,
            "connect_timeout": call_timeout,
            "autocommit": True,
        }

    @classmethod
    def key_problem(cls, key: str) -> str | None:
        if len(key) <= 64:
            return None
        return (
            f"MySQL lock names are at most 64 characters and this one has {len(key)}; use a "
            "coordinator prefix of at most 7 characters (keys are at most len(prefix) + 57 "
            "characters)"
        )

    def lock_for(self, key: str) -> ServerLock:
        name = key.encode("ascii")
        return ServerLock(key, name, (name,), ())

    # -- sessions ------------------------------------------------------------------------

    def connect(self, waiter: bool) -> Link:
        import pymysql

        timeout = self.call_timeout + (self.wait_slice if waiter else 0)
        connection = pymysql.connect(
            **{name: value for name, value in self._connect_args.items() if value is not None},
            read_timeout=timeout,
            write_timeout=timeout,
        )
        try:
            # Which coordinator this session serves, for holder(): a failure (no right to
            # create tables, say) costs only the member's name there.
            with connection.cursor() as cursor:
                params = (self.member_id, os.getpid(), socket.gethostname())
                _execute_creating(cursor, _SESSION_SQL, params, _SESSIONS_DDL)
        except pymysql.MySQLError:
            pass
        return Link(connection, int(connection.thread_id()))

    def check_session(self, main: Link, other: Link) -> None:
        """Nothing to check: ProxySQL keeps a client on its server session after GET_LOCK."""

    def usable(self, link: Link) -> bool:
        return bool(link.connection.open)

    def _scalar(self, link: Link, sql: str, params: tuple[Any, ...]) -> Any:
        with link.connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        return None if row is None else row[0]

    # -- locks ---------------------------------------------------------------------------

    def try_lock(self, link: Link, lock: ServerLock) -> bool:
        return bool(self._scalar(link, "SELECT GET_LOCK(%s, 0)", lock.args) == 1)

    def unlock(self, link: Link, lock: ServerLock) -> bool:
        return bool(self._scalar(link, "SELECT RELEASE_LOCK(%s)", lock.args) == 1)

    def wait_lock(self, link: Link, lock: ServerLock) -> bool:
        # 1: granted; 0: the slice is over; NULL: interrupted (KILL QUERY).
        granted = self._scalar(link, "SELECT GET_LOCK(%s, %s)", (*lock.args, self.wait_slice))
        return bool(granted == 1)

    def cancel(self, main: Link | None, link: Link) -> None:
        if main is None or not main.guard.acquire(timeout=self.call_timeout):
            return
        try:
            with main.connection.cursor() as cursor:
                cursor.execute("KILL QUERY %s", (link.id,))
        finally:
            main.guard.release()

    def alive(self, main: Link, ids: list[int]) -> set[int]:
        with main.connection.cursor() as cursor:
            cursor.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE ID IN %s", (ids,))
            return {int(row[0]) for row in cursor.fetchall()}

    def waiting(self, main: Link, lock: ServerLock, ours: list[int]) -> int:
        return int(self._scalar(main, _WAITING_SQL, (lock.name, lock.name, ours)) or 0)

    # -- fencing and leadership ----------------------------------------------------------

    def fence(self, main: Link, lock: ServerLock, holder: Link) -> int | None:
        """A counter row bumped if the holder's session holds the named lock now.

        InnoDB keeps it across restarts; one counter for all names is strictly
        increasing for each name too.
        """
        if self._scalar(main, "SELECT IS_USED_LOCK(%s)", lock.args) != holder.id:
            return None
        with main.connection.cursor() as cursor:
            _execute_creating(cursor, _FENCE_SQL, None, _FENCING_DDL)
            cursor.execute("SELECT LAST_INSERT_ID()")
            row = cursor.fetchone()
        return int(row[0])

    def publish(self, main: Link, lock: ServerLock, holder: Link, member_id: str) -> None:
        with main.connection.cursor() as cursor:
            params = (lock.name, holder.id, member_id)
            _execute_creating(cursor, _PUBLISH_SQL, params, _LEADERS_DDL)

    def read_leader(self, main: Link, lock: ServerLock) -> str | None:
        import pymysql

        try:
            member = self._scalar(main, _LEADER_SQL, (lock.key, lock.name))
        except pymysql.MySQLError as exc:
            if not _no_table(exc):
                raise
            return None  # nobody ever led here
        return None if member is None else str(member)

    def name_lock(self, main: Link, lock: ServerLock) -> None:
        with main.connection.cursor() as cursor:
            _execute_creating(
                cursor, "INSERT IGNORE INTO aiotooz_names VALUES (%s)", lock.args, _NAMES_DDL
            )

    def read_holder(self, main: Link, lock: ServerLock) -> HolderRecord | None:
        import pymysql

        session = self._scalar(main, "SELECT IS_USED_LOCK(%s)", lock.args)
        if session is None:
            return None
        waiters = int(self._scalar(main, _WAITING_SQL, (lock.name, lock.name, (0,))) or 0)
        try:
            with main.connection.cursor() as cursor:
                cursor.execute(_HOLDER_SQL, (session,))
                row = cursor.fetchone()
        except pymysql.MySQLError as exc:
            if not _no_table(exc):
                raise
            row = None
        if row is None:  # not an aiotooz session (plain tooz), or one that could not say
            return HolderRecord(lock.key, waiters=waiters, session=int(session))
        member, pid, host = row
        return HolderRecord(
            lock.key, str(member), int(pid), str(host), waiters=waiters, session=int(session)
        )

    def list_holders(self, main: Link, key_prefix: str) -> list[HolderRecord]:
        import pymysql

        sql = "SELECT name FROM aiotooz_names WHERE LEFT(name, %s) = %s"
        try:
            with main.connection.cursor() as cursor:
                cursor.execute(sql, (len(key_prefix), key_prefix.encode("ascii")))
                names = [bytes(row[0]).decode("ascii") for row in cursor.fetchall()]
        except pymysql.MySQLError as exc:
            if not _no_table(exc):
                raise
            return []  # nothing was ever locked here
        holders = []
        for key in names:
            holder = self.read_holder(main, self.lock_for(key))
            if holder is not None:
                holders.append(holder)
        return holders

    def read_record(self, main: Link, lock: ServerLock) -> bytes | None:
        import pymysql

        try:
            record = self._scalar(main, _READ_RECORD_SQL, (lock.key,))
        except pymysql.MySQLError as exc:
            if not _no_table(exc):
                raise
            return None  # nobody ever kept a record here
        return None if record is None else bytes(record)

    def write_record(
        self, main: Link, lock: ServerLock, holder: Link, record: bytes, token: int
    ) -> bool:
        params = (lock.key, token, record, *lock.args, holder.id)
        with main.connection.cursor() as cursor:
            _execute_creating(cursor, _WRITE_RECORD_SQL, params, _RECORDS_DDL)
            if cursor.rowcount > 0:
                return True
        # No row changed: refused, or the same record written again with the same token.
        kept = self._scalar(main, _RECORD_KEPT_SQL, (lock.key, token, *lock.args, holder.id))
        return bool(kept)


class MySQLDriver(SessionDriver):
    """MySQL/MariaDB named locks, all of a coordinator's held by one session."""

    extra = "mysql"
    dialect = MySQLDialect
    break_refusal: ClassVar[str] = (
        "a named lock belongs to the server session that took it, which holds every lock "
        "of its coordinator; stop the holder's process (pid {pid} on {host}), or end its "
        "session with KILL {session}, which frees every lock that coordinator holds"
    )
    accepted_options = _options.MYSQL
