"""Database drivers of our own: one session holds a coordinator's locks, waiting is the server's.

PostgreSQL's advisory locks and MySQL's named locks (``GET_LOCK``) belong to the
database session that took them, and any one session can hold any number of them. So a
coordinator keeps one *main* session, on which every try and release runs and which
holds every lock a try takes, however many.

Waiting happens at the server, in its own queue, so that the server orders waiters of
every process and hands a released lock straight to the next one: a waiter borrows a
*waiter link* (a connection of its own; at most ``waiter_limit`` per coordinator, past
that waiters poll with tries on the main session) and blocks in ``pg_advisory_lock`` /
``GET_LOCK(name, slice)`` there, one server-side slice at a time. A lock granted on a
waiter link cannot move to another session (it belongs to the link's session), so the
link keeps holding it: the grant is parked for the waiter's next try, which takes it
without a round trip. A link that holds locks is never lent to a waiter (a release must
not queue behind a wait); it is lent again once it holds none (while every link holds
locks, new waiters poll). So a coordinator uses at most ``1 + waiter_limit``
connections, whatever it holds or waits for. The first waiter link is opened at start
(a first wait then needs no connect), and serves the dialect's check of the sessions (a
pooler that shares server sessions is refused).

A waiter that gives up cancels its server-side wait at once (a cancel request on
PostgreSQL, ``KILL QUERY`` on MySQL), so it never leaves the queue by taking the lock
and dropping it (which would make another process's ``blocking=False`` try fail).

Losing a session loses what it holds: each heartbeat asks the server, on the main
session, which of the coordinator's sessions still exist. A main session that does not
answer fails the heartbeat (every lock is lost; the coordinator reconnects); a waiter
link that is gone (``pg_terminate_backend``, ``KILL``) makes ``still_owner`` say "no"
for each lock it held.

The dialects (``postgresql.py``, ``mysql.py``) say how each step is written in SQL.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, final

from .._exceptions import UnsupportedOperation
from ._base import Capability, Driver, HolderRecord

T = TypeVar("T")

#: Keys a connection remembers having written into the names table.
_NAMED_KEPT = 10_000

__all__ = ["Dialect", "Link", "ServerLock", "SessionDriver", "WaiterLinks", "close_quietly"]


@final
class Link:
    """One server session (a connection) of a coordinator."""

    __slots__ = ("busy", "connection", "ended", "failed", "guard", "held", "id", "waiting")

    def __init__(self, connection: Any, session_id: int) -> None:
        self.connection = connection
        #: The server's id of the session: PostgreSQL's backend pid, MySQL's connection id.
        self.id = session_id
        #: Serialises the connection's use (neither client is safe to share mid-call).
        self.guard = threading.Lock()
        #: Keys held on this session (those of a waiter link make it not lendable).
        self.held: set[str] = set()
        #: Lent to a waiter.
        self.busy = False
        #: Blocked in a server-side wait now (then a cancel reaches it).
        self.waiting = False
        #: Why the session is no longer usable, once a call found out.
        self.failed: str | None = None
        #: The failure says the session ended at the server (killed, closed), so its
        #: locks were freed with it; not so for a call that got no answer in time.
        self.ended = False


@final
class ServerLock:
    """A lock name as the server knows it; what is held is kept by the driver, by key."""

    __slots__ = ("args", "ids", "key", "name", "shared")

    def __init__(
        self,
        key: str,
        name: bytes,
        args: tuple[Any, ...],
        ids: tuple[int, ...],
        shared: bool | None = None,
    ):
        self.key = key
        #: A read-write lock's reader (``True``) or writer (``False``); ``None``: a lock.
        #: The readers and the writer of one read-write lock share its server lock, each
        #: under a key of its own (``Capability.SHARES_LOCKS``).
        self.shared = shared
        #: The name as plain tooz hands it to its lock (bytes of the key).
        self.name = name
        #: The lock's arguments in SQL: (int4, int4) or (int8,) on PostgreSQL, (name,) on MySQL.
        self.args = args
        #: How the server's lock view shows it (PostgreSQL's pg_locks columns); () on MySQL.
        self.ids = ids


@final
class _Waiter:
    """One waiter's server-side wait on a borrowed link."""

    __slots__ = ("link", "stop")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.stop = threading.Event()


class Dialect(abc.ABC):
    """How one server's locks, sessions and records are written in SQL.

    Every method but ``cancel`` runs with the link's (or the main session's) guard held.

    Args:
        url: the backend URL.
        member_id: the coordinator's member id (PostgreSQL shows it as the sessions'
            ``application_name``).
        call_timeout: the longest a caller waits for one call.
        wait_slice: one server-side wait of a waiter link, in seconds.
    """

    #: The backend's scheme, for errors.
    scheme: ClassVar[str]

    def __init__(self, url: str, member_id: str, call_timeout: float, wait_slice: int) -> None:
        self.call_timeout = call_timeout
        self.wait_slice = wait_slice
        self.member_id = member_id

    # -- holders (the server knows which session holds a lock; the names table, which
    #    lock names there are, for listing) -------------------------------------------

    @abc.abstractmethod
    def name_lock(self, main: Link, lock: ServerLock) -> None:
        """Note ``lock``'s key in the names table (once per key and connection)."""

    @abc.abstractmethod
    def read_holder(self, main: Link, lock: ServerLock) -> HolderRecord | None:
        """Who holds ``lock``: the server's session, and what the session is known by."""

    @abc.abstractmethod
    def list_holders(self, main: Link, key_prefix: str) -> list[HolderRecord]:
        """The holders of the named locks under ``key_prefix`` held now."""

    @classmethod
    def key_problem(cls, key: str) -> str | None:
        """Why ``key`` cannot be locked on this server, or ``None``."""
        return None

    @abc.abstractmethod
    def lock_for(self, key: str) -> ServerLock:
        """The server's lock for ``key``."""

    @abc.abstractmethod
    def connect(self, waiter: bool) -> Link:
        """A new session: the main one, or a waiter link (which waits a slice at a time)."""

    @abc.abstractmethod
    def check_session(self, main: Link, other: Link) -> None:
        """Refuse sessions the server does not keep for us (a pooler in the way).

        ``other`` is a waiter link, to be left fit for use.
        """

    def usable(self, link: Link) -> bool:
        """Whether ``link``'s connection still works after an error."""
        return True

    @staticmethod
    def timed_out(exc: Exception) -> bool:
        """Whether ``exc`` is a call that got no answer in time (the session may live on)."""
        return "timed out" in str(exc)

    def failure(self, exc: Exception, call_timeout: float) -> str:
        """Why a session is broken, for the calls that come after ``exc`` broke it."""
        if self.timed_out(exc):
            return (
                f"the server gave no answer within {call_timeout:g} s "
                "(AIOTOOZ_CALL_TIMEOUT) on this session"
            )
        return f"the session failed: {type(exc).__name__}: {exc}"

    @abc.abstractmethod
    def try_lock(self, link: Link, lock: ServerLock) -> bool:
        """Take ``lock`` on ``link`` if it is free; never waits."""

    @abc.abstractmethod
    def unlock(self, link: Link, lock: ServerLock) -> bool:
        """Let go of ``lock`` on ``link``; whether it was held there."""

    def unlock_stray(self, link: Link, lock: ServerLock) -> bool:
        """After a cancelled wait: free ``lock`` if the grant raced the cancel.

        Returns:
            ``False`` if the statement failed (the lock may still be held).
        """
        try:
            self.unlock(link, lock)
        except Exception:
            return False
        return True

    @abc.abstractmethod
    def wait_lock(self, link: Link, lock: ServerLock) -> bool:
        """Wait at most ``wait_slice`` seconds in the server's queue; whether granted."""

    @abc.abstractmethod
    def cancel(self, main: Link | None, link: Link) -> None:
        """Cancel the wait ``link`` is blocked in (from another thread; no guard held)."""

    @abc.abstractmethod
    def alive(self, main: Link, ids: list[int]) -> set[int]:
        """Which of the sessions ``ids`` exist (asked on the main session)."""

    @abc.abstractmethod
    def waiting(self, main: Link, lock: ServerLock, ours: list[int]) -> int:
        """How many sessions other than ``ours`` wait for ``lock`` at the server."""

    @abc.abstractmethod
    def fence(self, main: Link, lock: ServerLock, holder: Link) -> int | None:
        """A new token, if ``holder`` still holds ``lock`` (asked on the main session)."""

    @abc.abstractmethod
    def publish(self, main: Link, lock: ServerLock, holder: Link, member_id: str) -> None:
        """Write the leader record naming ``holder``'s session."""

    @abc.abstractmethod
    def read_leader(self, main: Link, lock: ServerLock) -> str | None:
        """The record's member, if the session it names holds ``lock`` now."""

    @abc.abstractmethod
    def read_record(self, main: Link, lock: ServerLock) -> bytes | None:
        """The record kept beside ``lock``'s key, or ``None`` (``Capability.KEEPS_RECORDS``)."""

    @abc.abstractmethod
    def write_record(
        self, main: Link, lock: ServerLock, holder: Link, record: bytes, token: int
    ) -> bool:
        """Upsert the record if ``holder`` holds ``lock`` and no larger token is stored.

        One statement, asked on the main session. Returns whether it was written.
        """


@final
class WaiterLinks:
    """A coordinator's waiter links, and the waits and grants on them.

    Shares the driver's guard: ``grants`` and ``waits`` are read and changed under it.

    Args:
        sql: the server's dialect.
        guard: the driver's guard.
        limit: waiter links opened at most.
    """

    def __init__(self, sql: Dialect, guard: threading.Lock, limit: int) -> None:
        self.sql = sql
        self._guard = guard
        self.limit = limit
        #: The links (at most ``limit``), lent or idle or holding.
        self.links: list[Link] = []
        #: Links being opened now (they count towards the limit).
        self._opening = 0
        #: key -> the link a waiter's grant waits on for the waiter's next try.
        self.grants: dict[str, Link] = {}
        #: key -> the wait running for it.
        self.waits: dict[str, _Waiter] = {}
        #: Set once the driver stops: no link is opened or lent any more.
        self.closed = False

    @property
    def watchers(self) -> int:
        return len(self.waits)

    def arm(self, lock: ServerLock, fire: Callable[..., object]) -> bool:
        """Queue for ``lock`` on a link; ``True`` if a grant waits already (try now)."""
        key = lock.key
        with self._guard:
            if key in self.grants:
                return True
            if key in self.waits or self.closed:
                return False
            link = next((link for link in self.links if not link.busy and not link.held), None)
            if link is None:
                if len(self.links) + self._opening >= self.limit:
                    return False  # past the limit: the waiter polls
                self._opening += 1
            else:
                link.busy = True
        if link is None:
            try:
                link = self.sql.connect(waiter=True)
            finally:
                with self._guard:
                    self._opening -= 1
            link.busy = True
            with self._guard:
                if not self.closed:
                    self.links.append(link)
            if self.closed:  # stopped meanwhile
                close_quietly(link)
                return False
        waiter = _Waiter(link)
        with self._guard:
            self.waits[key] = waiter
        threading.Thread(
            target=self._wait_for, args=(lock, waiter, fire), name="aiotooz-waiter", daemon=True
        ).start()
        return False

    def disarm(self, lock: ServerLock, main: Link | None) -> None:
        """Stop the wait for ``lock`` at once; give back a grant nobody took."""
        with self._guard:
            waiter = self.waits.pop(lock.key, None)
            if waiter is not None:
                waiter.stop.set()
            link = self.grants.pop(lock.key, None)
        if waiter is None and link is None:
            return
        # Called on the event loop: the cancel and the unlock run in a thread.
        threading.Thread(
            target=self._give_back,
            args=(lock, waiter, link, main),
            name="aiotooz-cancel",
            daemon=True,
        ).start()

    def cancel(self, link: Link, main: Link | None) -> None:
        """Cancel the wait ``link`` is blocked in, if it is."""
        if link.waiting:
            try:
                self.sql.cancel(main, link)
            except Exception:
                pass

    def _give_back(
        self, lock: ServerLock, waiter: _Waiter | None, link: Link | None, main: Link | None
    ) -> None:
        if waiter is not None:
            self.cancel(waiter.link, main)
        if link is not None:
            try:
                with link.guard:
                    self.sql.unlock(link, lock)
            except Exception:
                pass  # a session in trouble: the heartbeat drops it
            finally:
                with self._guard:
                    link.held.discard(lock.key)

    def _wait_for(self, lock: ServerLock, waiter: _Waiter, fire: Callable[..., object]) -> None:
        """A waiter's thread: wait in the server's queue, slice by slice, until granted."""
        link = waiter.link
        broken = False
        try:
            while not waiter.stop.is_set():
                with link.guard:
                    if waiter.stop.is_set():
                        break
                    link.waiting = True
                    try:
                        granted = self.sql.wait_lock(link, lock)
                    except Exception:
                        if not self.sql.usable(link):
                            raise
                        granted = False  # cancelled (perhaps a cancel meant for another wait)
                    finally:
                        link.waiting = False
                    if waiter.stop.is_set():
                        # Given up while the grant came: the lock must not stay held.
                        # The cancel sent for the wait can land on this unlock instead
                        # (it was sent as the wait ended), which then fails and leaves
                        # the lock held for good: a reader of another coordinator waited
                        # forever behind it. The cancel hits one statement: try again.
                        for _attempt in range(3):
                            if self.sql.unlock_stray(link, lock):
                                break
                        break
                if granted:
                    self._granted(lock, waiter)
                    fire()
                    return
        except Exception:
            broken = True
            fire()  # trouble at the server: the waiter tries again (and polls)
        finally:
            with self._guard:
                if self.waits.get(lock.key) is waiter:
                    del self.waits[lock.key]
                link.busy = False
                # Dropped while it waited (its session found dead by a beat): drop()
                # left the closing to this thread, whether the wait broke or was stopped.
                dropped = link not in self.links
            if broken or dropped:
                self.drop(link)

    def _granted(self, lock: ServerLock, waiter: _Waiter) -> None:
        """Park the grant for the waiter's next try (or give it back: it left)."""
        link = waiter.link
        with self._guard:
            link.held.add(lock.key)
            parked = self.waits.get(lock.key) is waiter
            if parked:
                self.grants[lock.key] = link
        if not parked:
            try:
                with link.guard:
                    self.sql.unlock(link, lock)
            finally:
                with self._guard:
                    link.held.discard(lock.key)

    def drop(self, link: Link) -> None:
        """Forget a link whose session is gone: what it held is lost."""
        with self._guard:
            if link in self.links:
                self.links.remove(link)
            for key in [key for key, held_by in self.grants.items() if held_by is link]:
                del self.grants[key]
            busy = link.busy
        if not busy:
            close_quietly(link)  # else its waiter closes it when its wait fails

    def close(self, main: Link | None, within: float) -> None:
        """Stop every wait and close every link (each waits ``within`` for its wait to end)."""
        with self._guard:
            self.closed = True
            waits = list(self.waits.values())
            for waiter in waits:
                waiter.stop.set()
            links, self.links = self.links, []
            self.grants.clear()
        for waiter in waits:
            self.cancel(waiter.link, main)
        for link in links:
            # A wait still running must end (cancelled) before its connection closes.
            if link.guard.acquire(timeout=within):
                try:
                    close_quietly(link)
                finally:
                    link.guard.release()


def close_quietly(link: Link) -> None:
    try:
        link.connection.close()
    except Exception:
        pass


class SessionDriver(Driver):
    """The sessions, waiter links and bookkeeping both database drivers share.

    Args:
        sql: how the server's locks are written in SQL.
        call_timeout: the longest a caller waits for one call.
    """

    capabilities = frozenset(
        {
            Capability.FENCES,
            Capability.ARMS_WATCHES,
            Capability.NAMES_LEADER,
            Capability.KNOWS_OWNER,
            Capability.PARKS_GRANTS,
            Capability.KEEPS_RECORDS,
            Capability.NAMES_HOLDERS,
            Capability.LISTS_HOLDERS,
        }
    )
    #: Waiter links a coordinator opens at most (each is a connection and a thread).
    waiter_limit: ClassVar[int] = 4
    #: One server-side wait, in seconds: a waiter's stop is noticed within it even when
    #: its cancel gets lost (MySQL's GET_LOCK takes whole seconds).
    wait_slice: ClassVar[int] = 5

    def __init__(self, sql: Dialect, call_timeout: float) -> None:
        # No tooz coordinator: this driver is its own client of the server.
        self.sql = sql
        self.call_timeout = call_timeout
        self._main: Link | None = None
        #: key -> the link that holds it.
        self._holders: dict[str, Link] = {}
        #: The server lock of each key held -> that key (two keys may share one).
        self._held_args: dict[tuple[Any, ...], str] = {}
        #: The server locks a try on the main session is running for now.
        self._trying: set[tuple[Any, ...]] = set()
        self._guard = threading.Lock()
        self._waiters = WaiterLinks(sql, self._guard, self.waiter_limit)
        #: Keys this connection wrote into the names table (forgotten when it grows big).
        self._named: set[str] = set()

    @classmethod
    def load(cls, url: str, member_id: str, options: Any, call_timeout: float) -> SessionDriver:
        return cls(cls.dialect(url, member_id, call_timeout, cls.wait_slice), call_timeout)

    #: How this server's locks are written in SQL.
    dialect: ClassVar[type[Dialect]]

    # -- the connection ------------------------------------------------------------------

    def start(self) -> None:
        """Open the main session and a first waiter link, and check them.

        The waiter link is opened now, so that a first wait does not begin with a
        connect (40-80 ms on MySQL): a coordinator at rest has two sessions.
        """
        main = self.sql.connect(waiter=False)
        try:
            spare = self.sql.connect(waiter=True)
            try:
                self.sql.check_session(main, spare)
            except BaseException:
                close_quietly(spare)
                raise
        except BaseException:
            close_quietly(main)
            raise
        self._waiters.links.append(spare)
        self._main = main

    def stop(self) -> None:
        with self._guard:
            main, self._main = self._main, None
            self._holders.clear()
            self._held_args.clear()
        self._waiters.close(main, self.call_timeout)
        if main is not None:
            close_quietly(main)  # the server frees every lock the session holds

    @property
    def requires_beating(self) -> bool:
        return True  # the heartbeat is what finds a session that is gone

    def heartbeat(self) -> None:
        """Ask which of our sessions exist; the main one failing to answer raises."""
        main = self._live_main()
        with self._guard:
            links = list(self._waiters.links)
        alive = self._use(
            main, lambda: self.sql.alive(main, [main.id, *(link.id for link in links)])
        )
        if main.id not in alive:
            raise ConnectionError("the main session is gone at the server")
        for link in links:
            if link.id not in alive:
                self._waiters.drop(link)

    def _use(self, link: Link, call: Callable[[], T]) -> T:
        """Run ``call`` on ``link``'s session, alone; a session found broken stays so.

        Calls queued behind one that failed (a server that stopped answering, say) are
        told why at once, instead of each failing on the closed connection its own way.
        """
        with link.guard:
            if link.failed is not None:
                raise ConnectionError(link.failed)
            try:
                return call()
            except Exception as exc:
                if not self.sql.usable(link):
                    link.failed = self.sql.failure(exc, self.call_timeout)
                    link.ended = not self.sql.timed_out(exc)
                raise

    def _live_main(self) -> Link:
        main = self._main
        if main is None:
            raise ConnectionError("the connection is closed")
        return main

    # -- locks ---------------------------------------------------------------------------

    def get_lock(self, key: str) -> ServerLock:
        return self.sql.lock_for(key)

    @classmethod
    def key_problem(cls, key: str) -> str | None:
        return cls.dialect.key_problem(key)

    def take_grant(self, lock: Any) -> bool:
        """Take the grant a waiter link got for ``lock``, if one is parked (no I/O)."""
        with self._guard:
            link = self._waiters.grants.pop(lock.key, None)
            if link is None:
                return False
            self._hold(lock, link)
            return True

    def try_acquire(self, lock: Any, key: str) -> bool:
        """Take a grant a waiter link got, else try once on the main session."""
        if self.take_grant(lock):
            return True
        with self._guard:
            # A session's locks are re-entrant: a second try of one server lock while the
            # first is in flight (a try given up at its deadline runs on) would be granted
            # again, and the first one's release would let go of both.
            if key in self._waiters.waits or key in self._holders:
                return False  # in the server's queue, or ours
            if lock.shared is None:  # a read-write lock's keys share their server lock
                if lock.args in self._trying:
                    return False  # being tried now
                self._trying.add(lock.args)
        try:
            if lock.shared is None:
                self._refuse_collision(lock)
            main = self._live_main()
            if key not in self._named:
                self._name(main, lock)
            granted = self._use(main, lambda: self.sql.try_lock(main, lock))
            if granted:
                with self._guard:
                    main.held.add(key)
                    self._hold(lock, main)
        finally:
            if lock.shared is None:
                with self._guard:
                    self._trying.discard(lock.args)
        return granted

    def _name(self, main: Link, lock: ServerLock) -> None:
        """Write ``lock``'s key into the names table, before its first try here.

        Every grant, on the main session or a waiter link, follows a try of the key on
        this connection, so every lock it holds is named there: what ``holders()`` lists
        (the server's lock view has no names on PostgreSQL, none at all on MariaDB). A
        failure (no right to create tables, say) costs the listing only.
        """
        if len(self._named) >= _NAMED_KEPT:
            self._named.clear()
        self._named.add(lock.key)
        with contextlib.suppress(Exception):
            self._use(main, lambda: self.sql.name_lock(main, lock))

    def read_holder(self, key: str) -> HolderRecord | None:
        main = self._live_main()
        return self._use(main, lambda: self.sql.read_holder(main, self.sql.lock_for(key)))

    def list_holders(self, key_prefix: str) -> list[HolderRecord]:
        main = self._live_main()
        return self._use(main, lambda: self.sql.list_holders(main, key_prefix))

    def _refuse_collision(self, lock: ServerLock) -> None:
        """Refuse a key on the server lock of another key we hold (PostgreSQL's 2-byte keys).

        Our sessions would take it again (a session's locks are re-entrant) or wait for
        ourselves forever.
        """
        with self._guard:
            other = self._held_args.get(lock.args)
        if other is not None and other != lock.key:
            raise UnsupportedOperation(
                f"the {self.sql.scheme} backend cannot hold {lock.key!r} while this coordinator "
                f"holds {other!r}: both map to server lock {lock.args} (plain tooz's key "
                "space has only 65,536 of them), so waiting would never end; use other "
                "names, or keys=64 in the URL's query if no plain tooz process shares the locks"
            )

    def _hold(self, lock: ServerLock, link: Link) -> None:
        """Note that ``link`` holds ``lock`` (called under ``_guard``)."""
        self._holders[lock.key] = link
        if lock.shared is None:
            self._held_args[lock.args] = lock.key

    def release(self, lock: Any) -> bool:
        """Let go of ``lock``; ``False`` if it was not ours (the block raises ``LockLost``).

        Not ours: not held here, its session ended, or the server says that session does
        not hold it. A call that gets no answer raises instead: the lock may still be held.
        """
        with self._guard:
            link = self._holders.pop(lock.key, None)
            if link is None:
                return False
            if lock.shared is None:
                self._held_args.pop(lock.args, None)
            if link is not self._main and link not in self._waiters.links:
                link.held.discard(lock.key)
                return False  # its session is gone, and the lock with it
        try:
            return self._use(link, lambda: self.sql.unlock(link, lock))
        except Exception:
            if link.ended:
                return False  # the session ended: the server freed the lock with it
            raise
        finally:
            with self._guard:
                link.held.discard(lock.key)

    def still_owner(self, lock: Any) -> bool | None:
        """Whether the session holding ``lock`` still exists (as the last heartbeat saw)."""
        with self._guard:
            link = self._holders.get(lock.key)
            if link is None:
                return None
            return link is self._main or link in self._waiters.links

    def waiters_elsewhere(self, lock: Any) -> int:
        """Sessions of other coordinators waiting for ``lock`` at the server."""
        main = self._live_main()
        with self._guard:
            ours = [main.id, *(link.id for link in self._waiters.links)]
        return self._use(main, lambda: self.sql.waiting(main, lock, ours))

    # -- waiting at the server (``WaiterLinks``) ---------------------------------------

    @property
    def release_watchers(self) -> int:
        return self._waiters.watchers

    def arm_release_watch(self, lock: Any, fire: Callable[..., object]) -> bool:
        """Queue at the server for ``lock`` on a waiter link, if one is (or can be) had.

        Not while the main session is found broken: the coordinator is about to
        reconnect, and a grant on this connection's link would be lost with it.
        """
        main = self._main
        if main is None or main.failed is not None:
            return False
        return self._waiters.arm(lock, fire)

    def disarm_release_watch(self, lock: Any) -> None:
        """Stop the wait for ``lock`` at once; give back a grant nobody took."""
        self._waiters.disarm(lock, self._main)

    # -- fencing and leadership (asked on the main session about the holder's) -----------

    def _holder(self, lock: ServerLock) -> Link | None:
        with self._guard:
            return self._holders.get(lock.key)

    def fencing_token(self, lock: Any) -> int | None:
        holder = self._holder(lock)
        if holder is None:
            return None
        main = self._live_main()
        return self._use(main, lambda: self.sql.fence(main, lock, holder))

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        holder = self._holder(lock)
        if holder is None:
            return
        main = self._live_main()
        self._use(main, lambda: self.sql.publish(main, lock, holder, member_id))

    def read_leader(self, key: str) -> str | None:
        main = self._live_main()
        return self._use(main, lambda: self.sql.read_leader(main, self.sql.lock_for(key)))

    # -- records beside locks: a row, written only while the holder's session holds it ---

    def read_record(self, lock: Any) -> bytes | None:
        main = self._live_main()
        return self._use(main, lambda: self.sql.read_record(main, lock))

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        """Write the record, fenced; ``False`` if the lock is not ours or a token is larger.

        Asked on the main session, like a fencing token: one statement checks that the
        holder's session holds the lock and that no larger token is stored, and writes.
        """
        holder = self._holder(lock)
        if holder is None:
            return False  # released, or its session is gone
        main = self._live_main()
        return self._use(main, lambda: self.sql.write_record(main, lock, holder, record, token))
