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
not queue behind a wait); it is lent again once it holds none. So a coordinator uses at
most ``1 + waiter_limit`` connections, whatever it holds or waits for.

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
import threading
from collections.abc import Callable
from typing import Any, ClassVar, final

from .._exceptions import UnsupportedOperation
from ._base import Capability, Driver

__all__ = ["Link", "ServerLock", "SessionDriver"]


@final
class Link:
    """One server session (a connection) of a coordinator."""

    __slots__ = ("busy", "connection", "guard", "held", "id", "waiting")

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


@final
class ServerLock:
    """A lock name as the server knows it; what is held is kept by the driver, by key."""

    __slots__ = ("args", "ids", "key", "name")

    def __init__(self, key: str, name: bytes, args: tuple[Any, ...], ids: tuple[int, ...]):
        self.key = key
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


class SessionDriver(Driver):
    """The sessions, waiter links and bookkeeping both database drivers share.

    Args:
        url: the backend URL.
        call_timeout: the longest a caller waits for one call.
    """

    capabilities = frozenset(
        {
            Capability.FENCES,
            Capability.WAKES_WAITERS,
            Capability.NAMES_LEADER,
            Capability.KNOWS_OWNER,
        }
    )
    #: Waiter links a coordinator opens at most (each is a connection and a thread).
    waiter_limit: ClassVar[int] = 4
    #: One server-side wait, in seconds: a waiter's stop is noticed within it even when
    #: its cancel gets lost (MySQL's GET_LOCK takes whole seconds).
    wait_slice: ClassVar[int] = 5

    def __init__(self, url: str, call_timeout: float) -> None:
        # No tooz coordinator: this driver is its own client of the server.
        self.url = url
        self.call_timeout = call_timeout
        self._main: Link | None = None
        #: Waiter links (at most ``waiter_limit``), lent or idle or holding.
        self._links: list[Link] = []
        #: Links being opened for waiters now (they count towards the limit).
        self._opening = 0
        #: key -> the link that holds it.
        self._holders: dict[str, Link] = {}
        #: The server lock of each key held -> that key (two keys may share one).
        self._held_args: dict[tuple[Any, ...], str] = {}
        #: key -> the link a waiter's grant waits on for the waiter's next try.
        self._grants: dict[str, Link] = {}
        #: key -> the wait running for it.
        self._waits: dict[str, _Waiter] = {}
        self._guard = threading.Lock()

    @classmethod
    def load(cls, url: str, member_id: str, options: Any, call_timeout: float) -> SessionDriver:
        cls.import_client()  # ImportError: the connection layer names the extra to install
        return cls(url, call_timeout)

    # -- what each dialect says ----------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def import_client(cls) -> None:
        """Import the client library (``ImportError`` if it is missing)."""

    @abc.abstractmethod
    def lock_for(self, key: str) -> ServerLock:
        """The server's lock for ``key``."""

    @abc.abstractmethod
    def _connect(self, waiter: bool) -> Link:
        """A new session: the main one, or a waiter link (which waits a slice at a time)."""

    @abc.abstractmethod
    def _check_session(self, main: Link) -> None:
        """Refuse a main session the server does not keep for us (a pooler in the way)."""

    @abc.abstractmethod
    def _try(self, link: Link, lock: ServerLock) -> bool:
        """Take ``lock`` on ``link`` if it is free; never waits."""

    @abc.abstractmethod
    def _unlock(self, link: Link, lock: ServerLock) -> bool:
        """Let go of ``lock`` on ``link``; whether it was held there."""

    @abc.abstractmethod
    def _wait(self, link: Link, lock: ServerLock) -> bool:
        """Wait at most ``wait_slice`` seconds in the server's queue; whether granted."""

    @abc.abstractmethod
    def _cancel(self, link: Link) -> None:
        """Cancel the wait ``link`` is blocked in (from another thread)."""

    @abc.abstractmethod
    def _alive(self, main: Link, ids: list[int]) -> set[int]:
        """Which of the sessions ``ids`` exist (asked on the main session)."""

    @abc.abstractmethod
    def _waiting(self, main: Link, lock: ServerLock, ours: list[int]) -> int:
        """How many sessions other than ``ours`` wait for ``lock`` at the server."""

    @abc.abstractmethod
    def _fence(self, main: Link, lock: ServerLock, holder: Link) -> int | None:
        """A new token, if ``holder`` still holds ``lock`` (asked on the main session)."""

    @abc.abstractmethod
    def _publish(self, main: Link, lock: ServerLock, holder: Link, member_id: str) -> None:
        """Write the leader record naming ``holder``'s session."""

    @abc.abstractmethod
    def _read_leader(self, main: Link, lock: ServerLock) -> str | None:
        """The record's member, if the session it names holds ``lock`` now."""

    @staticmethod
    def _close(link: Link) -> None:
        link.connection.close()

    # -- the connection ------------------------------------------------------------------

    def start(self) -> None:
        main = self._connect(waiter=False)
        try:
            self._check_session(main)
        except BaseException:
            self._close_quietly(main)
            raise
        self._main = main

    def stop(self) -> None:
        with self._guard:
            waits = list(self._waits.values())
            for waiter in waits:
                waiter.stop.set()
            links, self._links = self._links, []
            main, self._main = self._main, None
            self._holders.clear()
            self._held_args.clear()
            self._grants.clear()
        for waiter in waits:
            self._cancel_quietly(waiter.link)
        if main is not None:
            self._close_quietly(main)  # the server frees every lock the session holds
        for link in links:
            # A wait still running must end (cancelled) before its connection closes.
            if link.guard.acquire(timeout=self.call_timeout):
                try:
                    self._close_quietly(link)
                finally:
                    link.guard.release()

    @property
    def requires_beating(self) -> bool:
        return True  # the heartbeat is what finds a session that is gone

    def heartbeat(self) -> None:
        """Ask which of our sessions exist; the main one failing to answer raises."""
        main = self._live_main()
        with self._guard:
            links = list(self._links)
        with main.guard:
            alive = self._alive(main, [main.id, *(link.id for link in links)])
        if main.id not in alive:
            raise ConnectionError("the main session is gone at the server")
        for link in links:
            if link.id not in alive:
                self._drop(link)

    def _live_main(self) -> Link:
        main = self._main
        if main is None:
            raise ConnectionError("the connection is closed")
        return main

    def _drop(self, link: Link) -> None:
        """Forget a waiter link whose session is gone: what it held is lost."""
        with self._guard:
            if link in self._links:
                self._links.remove(link)
            for key in [key for key, held_by in self._grants.items() if held_by is link]:
                del self._grants[key]
        if not link.busy:
            self._close_quietly(link)  # a waiter on it closes it when its wait fails

    def _close_quietly(self, link: Link) -> None:
        try:
            self._close(link)
        except Exception:
            pass

    def _cancel_quietly(self, link: Link) -> None:
        if link.waiting:
            try:
                self._cancel(link)
            except Exception:
                pass

    # -- locks ---------------------------------------------------------------------------

    def get_lock(self, key: str) -> ServerLock:
        return self.lock_for(key)

    def try_acquire(self, lock: Any, key: str) -> bool:
        """Take a grant a waiter link got, else try once on the main session."""
        with self._guard:
            link = self._grants.pop(key, None)
            if link is not None:
                self._hold(lock, link)
                return True
            if key in self._waits or key in self._holders:
                return False  # in the server's queue (a try would not pass it), or ours
        self._refuse_collision(lock)
        main = self._live_main()
        with main.guard:
            granted = self._try(main, lock)
        if granted:
            with self._guard:
                main.held.add(key)
                self._hold(lock, main)
        return granted

    def _refuse_collision(self, lock: ServerLock) -> None:
        """Refuse a key on the server lock of another key we hold (PostgreSQL's 2-byte keys).

        Our sessions would take it again (a session's locks are re-entrant) or wait for
        ourselves forever.
        """
        with self._guard:
            other = self._held_args.get(lock.args)
        if other is not None and other != lock.key:
            raise UnsupportedOperation(
                f"the {self.scheme} backend cannot hold {lock.key!r} while this coordinator "
                f"holds {other!r}: both map to server lock {lock.args} (plain tooz's key "
                "space has only 65,536 of them), so waiting would never end; use other "
                "names, or keys=64 in the URL's query if no plain tooz process shares the locks"
            )

    #: The backend's scheme, for errors.
    scheme: ClassVar[str]

    def _hold(self, lock: ServerLock, link: Link) -> None:
        """Note that ``link`` holds ``lock`` (called under ``_guard``)."""
        self._holders[lock.key] = link
        self._held_args[lock.args] = lock.key

    def release(self, lock: Any) -> bool:
        with self._guard:
            link = self._holders.pop(lock.key, None)
            if link is None:
                return False
            self._held_args.pop(lock.args, None)
        try:
            with link.guard:
                return self._unlock(link, lock)
        finally:
            with self._guard:
                link.held.discard(lock.key)

    def still_owner(self, lock: Any) -> bool | None:
        """Whether the session holding ``lock`` still exists (as the last heartbeat saw)."""
        with self._guard:
            link = self._holders.get(lock.key)
            if link is None:
                return None
            return link is self._main or link in self._links

    def waiters_elsewhere(self, lock: Any) -> int:
        """Sessions of other coordinators waiting for ``lock`` at the server."""
        main = self._live_main()
        with self._guard:
            ours = [main.id, *(link.id for link in self._links)]
        with main.guard:
            return self._waiting(main, lock, ours)

    # -- waiting at the server -----------------------------------------------------------

    @property
    def release_watchers(self) -> int:
        return len(self._waits)

    def arm_release_watch(self, lock: Any, fire: Callable[..., object]) -> bool:
        """Queue at the server for ``lock`` on a waiter link, if one is (or can be) had."""
        key = lock.key
        with self._guard:
            if key in self._grants:
                return True  # granted already: the next try takes it
            if key in self._waits or self._main is None:
                return False
            link = next((link for link in self._links if not link.busy and not link.held), None)
            if link is None:
                if len(self._links) + self._opening >= self.waiter_limit:
                    return False  # past the limit: the waiter polls
                self._opening += 1
            else:
                link.busy = True
        if link is None:
            try:
                link = self._connect(waiter=True)
            finally:
                with self._guard:
                    self._opening -= 1
            link.busy = True
            with self._guard:
                if self._main is None:  # stopped meanwhile
                    self._close_quietly(link)
                    return False
                self._links.append(link)
        waiter = _Waiter(link)
        with self._guard:
            self._waits[key] = waiter
        threading.Thread(
            target=self._wait_for, args=(lock, waiter, fire), name="aiotooz-waiter", daemon=True
        ).start()
        return False

    def disarm_release_watch(self, lock: Any) -> None:
        """Stop the wait for ``lock`` at once; give back a grant nobody took."""
        with self._guard:
            waiter = self._waits.pop(lock.key, None)
            if waiter is not None:
                waiter.stop.set()
            link = self._grants.pop(lock.key, None)
        if waiter is None and link is None:
            return
        # Called on the event loop: the cancel and the unlock run in a thread.
        threading.Thread(
            target=self._give_back, args=(lock, waiter, link), name="aiotooz-cancel", daemon=True
        ).start()

    def _give_back(self, lock: ServerLock, waiter: _Waiter | None, link: Link | None) -> None:
        if waiter is not None:
            self._cancel_quietly(waiter.link)
        if link is not None:
            try:
                with link.guard:
                    self._unlock(link, lock)
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
                        granted = self._wait(link, lock)
                    except Exception:
                        if not self._usable(link):
                            raise
                        granted = False  # cancelled (perhaps a cancel meant for another wait)
                    finally:
                        link.waiting = False
                    if waiter.stop.is_set():
                        # Given up while the grant came: the lock must not stay held.
                        self._unlock_stray(link, lock)
                        break
                if granted:
                    with self._guard:
                        link.held.add(lock.key)
                        if self._waits.get(lock.key) is waiter:
                            self._grants[lock.key] = link
                            taken = True
                        else:
                            taken = False
                    if not taken:
                        with link.guard:
                            self._unlock(link, lock)
                        with self._guard:
                            link.held.discard(lock.key)
                    fire()
                    return
        except Exception:
            broken = True
            fire()  # trouble at the server: the waiter tries again (and polls)
        finally:
            with self._guard:
                if self._waits.get(lock.key) is waiter:
                    del self._waits[lock.key]
                link.busy = False
            if broken:
                self._drop(link)

    def _unlock_stray(self, link: Link, lock: ServerLock) -> None:
        """After a cancelled wait: free the lock if the grant raced the cancel."""
        try:
            self._unlock(link, lock)
        except Exception:
            pass

    def _usable(self, link: Link) -> bool:
        """Whether ``link``'s connection still works after an error."""
        return True

    # -- fencing and leadership (asked on the main session about the holder's) -----------

    def _holder(self, lock: ServerLock) -> Link | None:
        with self._guard:
            return self._holders.get(lock.key)

    def fencing_token(self, lock: Any) -> int | None:
        holder = self._holder(lock)
        if holder is None:
            return None
        main = self._live_main()
        with main.guard:
            return self._fence(main, lock, holder)

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        holder = self._holder(lock)
        if holder is None:
            return
        main = self._live_main()
        with main.guard:
            self._publish(main, lock, holder, member_id)

    def read_leader(self, key: str) -> str | None:
        main = self._live_main()
        with main.guard:
            return self._read_leader(main, self.lock_for(key))
