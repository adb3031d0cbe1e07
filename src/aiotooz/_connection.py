"""One connection to a backend: a started tooz coordinator, its driver, its lock calls.

This, :mod:`aiotooz._calls` (how each call reaches the driver: worker lanes, inline or
native, and the translation of errors) and the driver layer (:mod:`aiotooz._drivers`)
are the only modules that touch tooz. Waiting is never done here: a try never waits
(waiting is done in async code by :mod:`aiotooz._locktable`, so no thread is ever
parked on a busy lock).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final, TypeVar, final

import anyio
import anyio.lowlevel

from ._bridge import CallTimedOut, Lane, Schedule, loop_scheduler, run_in_lane
from ._calls import Calls, translate
from ._drivers import (
    Capability,
    Driver,
    HolderRecord,
    driver_class,
    known_schemes,
    schemes_with,
)
from ._exceptions import (
    BackendUnavailable,
    ConfigurationError,
    UnsupportedOperation,
)
from ._names import split_rw_key
from ._tasks import running_on_asyncio
from ._urls import redact_url, scheme_of
from ._watch import Watch, open_watch

__all__ = [
    "Connection",
    "LockHandle",
    "open_connection",
    "rw_unsupported",
]

T = TypeVar("T")

#: How many recently used tooz lock objects a connection keeps, by key: making one costs
#: more than a try on some drivers (the file driver builds a path and a fasteners lock).
_LOCK_OBJECTS_KEPT: Final = 128


def rw_unsupported(scheme: str) -> str:
    """Why a read-write lock cannot be had on the ``scheme`` backend, and where it can."""
    able = ", ".join(schemes_with(Capability.SHARES_LOCKS))
    return (
        f"the {scheme!r} backend has no read-write locks (no shared locks to build them "
        f"on that every holder can see); RWLock works on: {able}. Use a Lock there, or "
        "one of those backends for this name"
    )


def _install_hint(driver: type[Driver], scheme: str, module: str | None) -> str:
    if driver.extra is not None:
        return f"pip install 'aiotooz[{driver.extra}]'"
    return f"pip install {module or scheme}"


def _load(url: str, member_id: str, call_timeout: float) -> Driver:
    """Create the driver for ``url`` (around a tooz coordinator, as a rule), not started."""
    scheme = scheme_of(url)
    shown = redact_url(url)
    if scheme not in known_schemes():
        raise ConfigurationError(
            f"unknown backend scheme {scheme!r} in {shown}; "
            f"use one of: {', '.join(known_schemes())}"
        )
    driver = driver_class(scheme)
    options: dict[str, Any] = driver.options(
        urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    )
    try:
        return driver.load(url, member_id, options, call_timeout)
    except ImportError as exc:
        raise ConfigurationError(
            f"the {scheme!r} backend needs a client library that is not installed "
            f"({exc}); install it with: {_install_hint(driver, scheme, exc.name)}"
        ) from exc
    except RuntimeError as exc:
        # stevedore's NoMatches: the driver is registered but failed to load.
        raise ConfigurationError(
            f"the {scheme!r} backend could not be loaded ({exc}); its client library "
            f"may be missing: {_install_hint(driver, scheme, None)}"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad backend URL {shown}: {exc}") from exc
    except Exception as exc:
        raise translate(exc, "loading the driver", url) from exc


@final
class _LockObjects(OrderedDict[str, Any]):
    """Recently used tooz lock objects by key, at most ``_LOCK_OBJECTS_KEPT`` of them.

    Touched on the event loop thread only, never by a worker.
    """

    def keep(self, key: str, tooz_lock: Any) -> None:
        self[key] = tooz_lock
        self.move_to_end(key)
        if len(self) > _LOCK_OBJECTS_KEPT:
            self.popitem(last=False)


@final
class LockHandle:
    """One backend lock for one key, as held (or tried) through one :class:`Connection`.

    ``held`` is true from the moment a try's grant reaches its caller until release. A
    grant that comes after its caller stopped waiting never reaches it: the worker
    thread releases that lock itself.
    """

    __slots__ = ("_tooz_lock", "connection", "held", "key", "shared", "woken")

    def __init__(self, connection: Connection, key: str) -> None:
        self.connection: Connection = connection
        self.key: str = key
        #: A key of a read-write lock (``aiotooz._names.rw_key``).
        self.shared: bool = split_rw_key(key) is not None
        self.held: bool = False
        #: How many waiters (of other processes, as a rule) the last release woke.
        self.woken: int = 0
        self._tooz_lock: Any = None

    def tooz_lock(self) -> Any:
        """The tooz lock object to use: the handle's, or a new one (no I/O on any driver)."""
        if self._tooz_lock is None:
            return self.connection.driver.get_lock(self.key)
        return self._tooz_lock

    # -- the record kept beside the lock (``Capability.KEEPS_RECORDS``) -----------------

    async def read_record(self) -> bytes | None:
        """The record kept beside this lock (held), or ``None`` if none was written.

        Raises:
            UnsupportedOperation: the backend keeps no records.
            BackendUnavailable: the backend failed or did not answer in time.
        """
        connection, tooz_lock = self._keeping_records(), self._tooz_lock
        read = lambda: connection.driver.read_record(tooz_lock)  # noqa: E731
        return await connection._calls.quick(f"reading the record of {self.key!r}", read)

    async def write_record(self, record: bytes, token: int) -> bool:
        """Replace the record beside this lock (held, fenced with ``token``).

        Returns ``False`` if nothing was written: the lock is no longer ours, or a later
        holder wrote a record with a larger token.

        Raises:
            UnsupportedOperation: the backend keeps no records.
            BackendUnavailable: the backend failed or did not answer in time.
        """
        connection, tooz_lock = self._keeping_records(), self._tooz_lock
        write = lambda: connection.driver.write_record(tooz_lock, record, token)  # noqa: E731
        return await connection._calls.quick(f"writing the record of {self.key!r}", write)

    def _keeping_records(self) -> Connection:
        if Capability.KEEPS_RECORDS not in self.connection.capabilities:
            raise UnsupportedOperation(
                f"the {self.connection.scheme!r} backend keeps no records beside locks "
                f"(needed for {self.key!r}): memcached may evict one at any time, which "
                "would let a window run twice; use file, ipc, redis, redis+cluster, "
                "zookeeper, etcd3+http, postgresql or mysql"
            )
        return self.connection


@final
@final
class Connection:
    """One started tooz coordinator, its driver, and the worker lanes that call it.

    Use :func:`open_connection` to make one. Every call waits at most ``call_timeout``
    seconds for the backend (and not at all once its caller is cancelled).
    """

    def __init__(self, driver: Driver, url: str, schedule: Schedule) -> None:
        self.driver = driver
        self.url = url
        self.call_timeout: float = driver.call_timeout
        self.scheme: str = scheme_of(url)
        self.capabilities: frozenset[Capability] = driver.capabilities
        self.requires_beating: bool = driver.requires_beating
        self.reserved_keys: frozenset[str] = driver.reserved_keys
        #: Seconds a held lock is guaranteed to outlive its last refresh; ``None`` where
        #: locks live as long as the connection (no ``Capability.EXPIRES``).
        self.lock_ttl: float | None = (
            driver.lock_ttl if Capability.EXPIRES in driver.capabilities else None
        )
        self._calls = Calls(
            url,
            driver.call_timeout,
            schedule,
            inline=Capability.LOCAL_CALLS in driver.capabilities,
            native=Capability.NATIVE_ASYNC in driver.capabilities
            and running_on_asyncio()
            and driver.native_async_ready(),
        )
        self._lock_objects = _LockObjects()
        self._parks_grants = Capability.PARKS_GRANTS in driver.capabilities
        #: Read-write locks (``Capability.SHARES_LOCKS``).
        self.shares_locks: bool = Capability.SHARES_LOCKS in driver.capabilities
        #: A grant's TTL counts from the last refresh, not its try (``SHARED_LEASE``).
        self.shared_lease: bool = Capability.SHARED_LEASE in driver.capabilities

    @property
    def threads(self) -> int:
        """How many worker threads of this connection are alive."""
        return self._calls.threads

    def lock(self, key: str) -> LockHandle:
        """A handle for ``key``; nothing is sent to the backend until :meth:`try_acquire`."""
        handle = LockHandle(self, key)
        handle._tooz_lock = self._lock_objects.get(key)
        return handle

    async def try_acquire(self, handle: LockHandle, wait: float | None = None) -> bool:
        """Try once to take ``handle``'s lock without waiting; ``True`` if it is now held.

        Args:
            handle: the handle to try.
            wait: seconds the caller can spend on this try at most (its deadline); past
                them the try counts as not granted, and if the backend grants it later,
                the lock is released again in the worker thread.

        Raises:
            UnsupportedOperation: the backend cannot lock this key.
            BackendUnavailable: the backend failed or did not answer in time.
        """
        if handle.shared and not self.shares_locks:
            raise UnsupportedOperation(rw_unsupported(self.scheme))
        problem = self.driver.key_problem(handle.key)
        if problem is not None:
            raise UnsupportedOperation(f"cannot lock key {handle.key!r}: {problem}")
        # The tooz lock object this try uses. A try given up may still be running in its
        # worker thread with it: the handle then gets a fresh one for its next try.
        tried: list[Any] = []

        def attempt() -> bool:
            tried.append(handle.tooz_lock())
            return self.driver.try_acquire(tried[0], handle.key)

        def release_late(granted: bool) -> None:
            if granted:
                self.driver.release(tried[0])

        action = f"acquiring {handle.key!r}"
        tooz_lock = handle.tooz_lock() if self._calls.native or self._parks_grants else None
        # A grant a waiter got at the backend is ours already: no I/O, no thread hop.
        if self._parks_grants and self.driver.take_grant(tooz_lock):
            tried.append(tooz_lock)
            granted = True
        elif self._calls.native:
            tried.append(tooz_lock)
            try:
                granted = await self._calls.natively_in_a_task(
                    action,
                    lambda: self.driver.try_acquire_async(tooz_lock, handle.key),
                    wait,
                    # Granted after its caller left, or perhaps granted: give it back.
                    undo=lambda granted: granted and self.driver.release(tooz_lock),
                    unknown=lambda: self.driver.release(tooz_lock),
                )
            except CallTimedOut:
                self._forget(handle)
                return False
            except BaseException:
                self._forget(handle)
                raise
        elif self._calls.inline:
            granted = await self._calls.on_loop(action, attempt)
        else:
            try:
                granted = await self._calls.in_lane(
                    self._calls.acquire_lane, action, attempt, wait=wait, abandoned=release_late
                )
            except CallTimedOut:
                self._forget(handle)
                return False
            except BaseException:
                # Cancelled or failed: the object may be in use, even if ``tried`` is still
                # empty (a worker can have started the try and not yet reached its first
                # line). Two tries on one object would leave the lock on a lease that is
                # not refreshed (see EtcdDriver.still_owner).
                self._forget(handle)
                raise
        handle._tooz_lock = tried[0]
        self._lock_objects.keep(handle.key, tried[0])
        handle.held = granted
        return granted

    def _forget(self, handle: LockHandle) -> None:
        """The handle's tooz lock object may still be in a worker's hands: never reuse it."""
        handle._tooz_lock = None
        self._lock_objects.pop(handle.key, None)

    async def fencing_token(self, handle: LockHandle) -> int | None:
        """A new fencing token for the lock ``handle`` holds; ``None`` if it is not ours.

        Raises:
            UnsupportedOperation: the driver gives no fencing tokens.
            BackendUnavailable: the backend failed or did not answer in time.
        """
        if Capability.FENCES not in self.capabilities:
            raise UnsupportedOperation(
                f"the {scheme_of(self.url)!r} backend gives no fencing tokens; every backend "
                "aiotooz knows does (file, ipc, redis, redis+cluster, memcached, zookeeper, "
                "etcd3+http, postgresql, mysql)"
            )
        tooz_lock = handle._tooz_lock
        fence = lambda: self.driver.fencing_token(tooz_lock)  # noqa: E731
        return await self._calls.quick(f"fencing {handle.key!r}", fence)

    async def publish_leader(self, handle: LockHandle, member_id: str, token: int) -> None:
        """Record ``member_id`` as the leader holding ``handle``'s lock (``NAMES_LEADER``)."""
        tooz_lock = handle._tooz_lock
        publish = lambda: self.driver.publish_leader(tooz_lock, member_id, token)  # noqa: E731
        await self._calls.in_control_lane(f"publishing leader of {handle.key!r}", publish)

    async def read_leader(self, key: str) -> str | None:
        """The member id that holds the leadership lock ``key`` now, or ``None``.

        Raises:
            UnsupportedOperation: the driver cannot name leaders.
            BackendUnavailable: the backend failed or did not answer in time.
        """
        read = lambda: self.driver.read_leader(key)  # noqa: E731
        return await self._calls.in_control_lane(f"reading leader of {key!r}", read)

    # -- holders (``NAMES_HOLDERS``, ``LISTS_HOLDERS``, ``BREAKS_LOCKS``) -------------

    def _require(self, capability: Capability, what: str) -> None:
        if capability not in self.capabilities:
            able = ", ".join(schemes_with(capability))
            raise UnsupportedOperation(f"the {self.scheme!r} backend cannot {what}; {able} can")

    async def read_holder(self, key: str) -> HolderRecord | None:
        """Who holds ``key`` now, or ``None`` (see ``Driver.read_holder``).

        Raises:
            UnsupportedOperation: the driver cannot name holders.
            BackendUnavailable: the backend failed or did not answer in time.
        """
        self._require(Capability.NAMES_HOLDERS, "say who holds a lock")
        read = lambda: self.driver.read_holder(key)  # noqa: E731
        return await self._calls.in_control_lane(f"reading the holder of {key!r}", read)

    async def list_holders(self, key_prefix: str) -> list[HolderRecord]:
        """The holders of the locks held under ``key_prefix`` (see ``Driver.list_holders``)."""
        self._require(Capability.LISTS_HOLDERS, "list the locks held")
        listing = lambda: self.driver.list_holders(key_prefix)  # noqa: E731
        return await self._calls.in_control_lane("listing held locks", listing)

    async def break_lock(self, key: str, name: str) -> HolderRecord | None:
        """Free ``key`` (the lock ``name``) whoever holds it; whom it was taken from.

        ``None``: nobody held it.

        Raises:
            UnsupportedOperation: the backend cannot free another process's lock; it
                names the holder (where the driver can tell) and what to do instead.
        """
        if Capability.BREAKS_LOCKS not in self.capabilities:
            holder = None
            whom = "by a holder this backend cannot name"
            if Capability.NAMES_HOLDERS in self.capabilities:
                holder = await self.read_holder(key)
                whom = "by nobody now" if holder is None else f"by {holder.member_id!r}"
            pid = "unknown" if holder is None or holder.pid is None else holder.pid
            host = "unknown" if holder is None or holder.host is None else holder.host
            session = "unknown" if holder is None or holder.session is None else holder.session
            raise UnsupportedOperation(
                f"cannot break {name!r} on the {self.scheme!r} backend (held {whom}): "
                f"{self.driver.break_refusal.format(pid=pid, host=host, session=session)}; "
                f"{', '.join(schemes_with(Capability.BREAKS_LOCKS))} can break locks"
            )
        breaking = lambda: self.driver.break_lock(key)  # noqa: E731
        return await self._calls.in_control_lane(f"breaking {name!r}", breaking)

    async def was_broken(self, handle: LockHandle) -> bool:
        """Whether ``handle``'s lock, found lost, was freed by a break (``BREAKS_LOCKS``)."""
        tooz_lock = handle._tooz_lock
        if Capability.BREAKS_LOCKS not in self.capabilities or tooz_lock is None:
            return False
        asking = lambda: self.driver.was_broken(tooz_lock)  # noqa: E731
        return await self._calls.in_control_lane(f"asking if {handle.key!r} broke", asking)

    async def release(self, handle: LockHandle, contended: bool = False) -> bool:
        """Release ``handle``'s lock; ``False`` if the backend says it was no longer ours.

        ``contended``: a waiter of this coordinator is next; the driver is asked how many
        wait elsewhere (``handle.woken``), so that it can step back for them.

        A caller that is cancelled, or waits longer than the call timeout, stops waiting;
        the release still runs (even if it was still queued), in its worker thread.

        Raises:
            BackendUnavailable: the backend failed or did not answer in time.
        """
        tooz_lock = handle._tooz_lock
        if not handle.held or tooz_lock is None:
            return False
        handle.held = False
        action = f"releasing {handle.key!r}"

        def release() -> bool:
            # Fairness: who waits elsewhere must be asked while we still hold the lock,
            # and only matters when a local waiter is next (``contended``); a hint,
            # never in the way of the release.
            waiting = 0
            if contended:
                with contextlib.suppress(Exception):
                    waiting = self.driver.waiters_elsewhere(tooz_lock)
            released = self.driver.release(tooz_lock)
            handle.woken = waiting if released else 0
            return released

        if self._calls.inline:
            # No checkpoint: a release must not be skipped by a cancellation, and like
            # anyio's and trio's own locks it does not need to be one (a try is).
            return self._calls.run_inline(action, release)
        try:
            if self._calls.native:
                told = await self._calls.natively(
                    action,
                    lambda: self.driver.release_async(tooz_lock),
                    None,
                    on_give_up=lambda: self.driver.release(tooz_lock),
                )
                handle.woken = max(told, 0)
                return told >= 0
            return await self._calls.in_lane(
                self._calls.control_lane, action, release, must_run=True
            )
        except BaseException:
            self._forget(handle)  # the release may still be running with the object
            raise

    async def watch(self, handle: LockHandle) -> Watch:
        """Start watching for releases of ``handle``'s key, before trying it again.

        See :func:`aiotooz._watch.open_watch`; the waiter polls where no watch serves.
        """
        return await open_watch(self.driver, self._calls, handle.key)

    async def heartbeat(self, handles: Sequence[LockHandle] = ()) -> list[bool | None]:
        """Send one heartbeat (refreshing TTL locks), then ask who owns ``handles``.

        A beat that returns normally proves nothing about the locks (tooz's redis and
        memcached drivers swallow a failed refresh, its etcd driver ignores one), so each
        is checked where the driver ``KNOWS_OWNER``, in as few round trips as the driver
        can (``Driver.beat``): a beat's cost must not grow with the locks held, or it
        outgrows the lease once a few thousand are held.

        Returns:
            For each handle: ``True`` still ours, ``False`` no longer ours, ``None`` the
            driver cannot tell.

        Raises:
            BackendUnavailable: the backend failed or did not answer in time.
        """
        locks = [handle._tooz_lock for handle in handles]
        return await self._calls.in_control_lane("heartbeat", lambda: self.driver.beat(locks))

    async def close(self) -> None:
        """Let the calls in flight end, then stop the tooz coordinator; errors are swallowed.

        Each step is bounded by the call timeout: a backend that does not answer is left
        behind (its stuck worker thread exits when the call returns).
        """
        await self._calls.end_loop_calls()
        with anyio.move_on_after(self.call_timeout, shield=True):
            with contextlib.suppress(Exception):
                await self.driver.close_async()
        # Calls given up on (a heartbeat cancelled by stop(), say) may still run: the
        # driver must not be stopped under them (a client checked out of a pool while
        # the pool closes is never closed). Every thread exits once its queue is done.
        await self._calls.close()
        lane = Lane(f"aiotooz-close {scheme_of(self.url)}", 1)
        try:
            with anyio.CancelScope(shield=True):
                await run_in_lane(lane, self._calls.schedule, self.driver.stop, self.call_timeout)
        except Exception:
            pass
        finally:
            lane.close(self._calls.schedule)


async def open_connection(url: str, member_id: str, call_timeout: float) -> Connection:
    """Create and start a tooz coordinator for ``url`` in a worker thread.

    Raises:
        ConfigurationError: the URL, scheme or client library is wrong.
        BackendUnavailable: the backend cannot be reached within ``call_timeout``.
    """
    url = driver_class(scheme_of(url)).prepare_url(url)

    def start() -> Driver:
        driver = _load(url, member_id, call_timeout)
        driver.configure()
        try:
            driver.start()
        except Exception as exc:
            raise translate(exc, "connecting", url) from exc
        return driver

    def stop_late(driver: Driver) -> None:
        driver.stop()  # connected after the caller gave up: nobody will use it

    # A lane of its own: connecting may hang for the client's connect timeout on an
    # unreachable host, and must not hold up releases while it does.
    lane = Lane(f"aiotooz-connect {scheme_of(url)}", 1)
    schedule = loop_scheduler()
    try:
        driver = await run_in_lane(lane, schedule, start, call_timeout, stop_late)
    except CallTimedOut:
        raise BackendUnavailable(
            f"connecting on {redact_url(url)}: no answer within {call_timeout:g} s "
            "(AIOTOOZ_CALL_TIMEOUT)"
        ) from None
    finally:
        lane.close(schedule)  # its thread exits once done; nobody needs to wait
    return Connection(driver, url, schedule)
