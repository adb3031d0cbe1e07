"""The thread bridge: the only module that imports tooz.

Every blocking tooz call runs in a worker thread, on one of two lanes with threads of
their own, so that releases and heartbeats never queue behind lock attempts:

* the *acquire* lane runs short, non-blocking tries (never a wait: waiting is done in
  async code by :mod:`aiotooz._lock`, so no thread is ever parked on a busy lock);
* the *control* lane runs release, heartbeat and stop (connect gets a thread of its own).

A lane is up to two threads of the Backend's own, fed by a queue; a worker hands the
outcome back by scheduling ``Event.set`` on the caller's event loop (asyncio's
``call_soon_threadsafe``, trio's ``run_sync_soon``). That round trip measured ~25-50 us
on a 2-core machine, against ~75-140 us for ``anyio.to_thread.run_sync``. Lanes never use
anyio's default thread limiter, so aiotooz never competes with the application's own
``to_thread`` calls, and their threads exit when the Backend closes (or after
``_IDLE_EXIT`` idle seconds if it never does).

The one exception: on the file backend a non-blocking try and a release are ``fcntl``
calls of microseconds on a local file, cheaper than any thread hop, so they run on the
event loop itself (until they prove slow: see ``_INLINE_TRY_SCHEMES``).

Per-driver quirks are normalised here and every tooz or client-library exception is
translated, once, into the :mod:`aiotooz._exceptions` tree.
"""

from __future__ import annotations

import importlib.metadata
import queue
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast, final

import anyio
import anyio.from_thread
import anyio.lowlevel
import tooz
import tooz.coordination
import tooz.locking

from ._exceptions import (
    BackendUnavailable,
    ConfigurationError,
    CoordinationError,
    UnsupportedOperation,
)
from ._settings import redact_url

__all__ = ["Backend", "BackendLock", "known_schemes"]

T = TypeVar("T")

#: The ``pip install aiotooz[<extra>]`` that provides each scheme's client library.
_EXTRAS: Final = {
    "redis": "redis",
    "memcached": "memcached",
    "zookeeper": "zookeeper",
    "kazoo": "zookeeper",
    "etcd3+http": "etcd",
    "etcd3+https": "etcd",
    "postgresql": "postgresql",
    "mysql": "mysql",
    "ipc": "ipc",
}

#: Driver options aiotooz sets unless the URL's query sets them: bounded socket waits, so
#: that a dead or hung server is noticed in seconds rather than tooz's defaults (30 s).
_DEFAULT_OPTIONS: Final[dict[str, dict[str, str]]] = {
    "redis": {"socket_timeout": "2", "socket_connect_timeout": "2"},
    "memcached": {"timeout": "2"},
    "etcd3+http": {"timeout": "2"},
    "etcd3+https": {"timeout": "2"},
}

#: memcached's and etcd's drivers also derive their TTLs from ``timeout``; when aiotooz
#: sets ``timeout``, the TTLs the URL leaves unset keep tooz's default of 30 s.
_TTL_OPTIONS: Final = ("lock_timeout", "membership_timeout", "leader_timeout")


def _driver_defaults(scheme: str, query: dict[str, list[str]]) -> dict[str, str]:
    """The options aiotooz adds to a URL's own (which always win)."""
    defaults = {
        option: value
        for option, value in _DEFAULT_OPTIONS.get(scheme, {}).items()
        if option not in query
    }
    if scheme != "redis" and "timeout" in defaults:
        defaults.update({option: "30" for option in _TTL_OPTIONS if option not in query})
    return defaults


#: Lock keys the file driver keeps for itself (its group and tmp directories).
_FILE_RESERVED: Final = frozenset({"groups", "tmp"})

# tooz's file driver creates per-path barriers with a non-atomic setdefault: two threads
# calling get_lock() for one path at once can get different barriers and both "hold"
# the lock. Creating lock objects under one process-wide lock closes that race.
_GET_LOCK = threading.Lock()

# The file driver locks with fcntl.lockf, and POSIX drops *all* of a process's locks on
# a file when *any* of its descriptors for that file is closed. Two tooz lock objects
# for one path (two coordinators on one directory) would each open the file, and
# closing the idle one would silently free the other's lock. So this process keeps one
# tooz lock object per lock file, shared by every coordinator on that directory.
_FILE_LOCKS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

# Exceptions that mean "not acquired within the time given" on some drivers
# (tenacity.RetryError on memcached and etcd3gw, kazoo's LockTimeout on zookeeper).
_NOT_ACQUIRED_NAMES: Final = frozenset({"RetryError", "LockTimeout"})


def known_schemes() -> list[str]:
    """The backend URL schemes tooz has drivers for in this environment."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group="tooz.backends"))


def _lock_ttl(driver: tooz.coordination.CoordinationDriver, scheme: str) -> float | None:
    if scheme in {"redis", "memcached", "etcd3+http", "etcd3+https"}:
        return float(driver.lock_timeout)  # type: ignore[attr-defined]
    if scheme in {"zookeeper", "kazoo"}:
        return float(driver.timeout)  # type: ignore[attr-defined]
    return None


def _file_try(file_lock: Any) -> bool:
    """One non-blocking try of tooz's file lock, mending two of its flaws.

    The whole try holds the path's barrier condition (re-entrant: tooz's acquire takes
    it again), so no other thread of this process can slip in between its steps.

    * A try that loses to another process still counts a reference in tooz (``ref``),
      so after the next acquire and release the lock object believes it is held and
      never closes its file: the count is put back.
    * fasteners keeps the lock file open after a failed try; closing it here is safe
      because no thread of this process holds the path (see _FILE_LOCKS).
    """
    barrier = file_lock._barrier
    with barrier.cond:
        if barrier.owner is not None:
            return False  # held in this process, by another coordinator
        references = file_lock.ref
        if file_lock.acquire(blocking=False):
            return True
        file_lock.ref = references
        file_lock._lock._do_close()
        return False


#: MySQL's GET_LOCK refuses names longer than this.
_MYSQL_MAX_KEY: Final = 64

#: Whether another session holds the advisory lock tooz takes with two int4 keys.
_PG_HELD_SQL: Final = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = %s AND objid = %s AND objsubid = 2)"
)


def _ipc_try(ipc_lock: Any) -> bool:
    """One non-blocking try of tooz's ipc lock, which tooz itself cannot do here.

    tooz's ipc driver refuses anything but a wait forever when ``sysv_ipc`` lacks
    semaphore timeouts (it does on Linux builds). This is tooz's own algorithm, on the
    same semaphore key, with ``IPC_NOWAIT`` instead of a timeout, so plain tooz ipc
    users and aiotooz exclude each other; tooz's ``release()`` then works unchanged.
    """
    import sysv_ipc

    while True:
        try:
            semaphore = sysv_ipc.Semaphore(ipc_lock.key, flags=sysv_ipc.IPC_CREX, initial_value=1)
        except sysv_ipc.ExistentialError:
            try:
                semaphore = sysv_ipc.Semaphore(ipc_lock.key)
            except sysv_ipc.ExistentialError:
                continue  # removed by its holder's release in between: start over
        semaphore.undo = True  # the kernel gives it back if this process dies
        semaphore.block = False  # IPC_NOWAIT: BusyError instead of a wait
        try:
            semaphore.acquire()
        except sysv_ipc.BusyError:
            return False
        except sysv_ipc.ExistentialError:
            continue
        ipc_lock._lock = semaphore
        return True


def _etcd_try(driver: Any, etcd_lock: Any) -> bool:
    """One non-blocking try on etcd that leaks no lease.

    tooz grants a new lease (``lock_timeout`` long, 30 s by default) on every try and
    never revokes the ones that lose: a waiter polling a busy lock would pile up
    hundreds of live leases. A key that exists is busy without asking for a lease, and
    the lease of a try that loses the race is revoked at once.
    """
    if driver.client.get(etcd_lock._key):
        return False
    if etcd_lock.acquire(blocking=False):
        return True
    etcd_lock._lease.revoke()
    return False


def _drop_redis_client_retries(driver: tooz.coordination.CoordinationDriver) -> None:
    """Bound how long a dead Redis takes to notice; tooz has no option for it.

    redis-py retries a failed command 10 times with backoff, and tooz retries that 15
    times: a dead Redis surfaced after ~55 s, on heartbeats and on connects alike
    (measured). tooz's own 15 quick retries still ride over a stale pooled connection,
    so the client's retries are dropped, from the moment the driver makes its client.
    """
    import redis.backoff
    import redis.retry

    make_client = driver._make_client  # type: ignore[attr-defined]

    def make_client_without_retries(*args: Any, **kwargs: Any) -> Any:
        client = make_client(*args, **kwargs)
        client.set_retry(redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        return client

    driver._make_client = make_client_without_retries  # type: ignore[attr-defined]


def _install_hint(scheme: str, module: str | None) -> str:
    extra = _EXTRAS.get(scheme)
    if extra is not None:
        return f"pip install 'aiotooz[{extra}]'"
    return f"pip install {module or scheme}"


def _translate(exc: BaseException, action: str, url: str) -> CoordinationError:
    """Map a tooz or client-library exception to ours (the one place this happens)."""
    where = f"{action} on {redact_url(url)}"
    if isinstance(exc, CoordinationError):
        return exc
    if isinstance(exc, tooz.NotImplemented):
        return UnsupportedOperation(f"{where}: the backend does not support this ({exc})")
    if isinstance(exc, tooz.coordination.ToozConnectionError):
        return BackendUnavailable(f"{where}: cannot reach the backend ({exc})")
    if isinstance(exc, tooz.ToozError):
        return BackendUnavailable(f"{where}: the backend failed ({exc})")
    # Raw client-library and OS errors that tooz lets through (kazoo, etcd3gw, OSError).
    return BackendUnavailable(f"{where}: {type(exc).__name__}: {exc}")


#: A lane's idle worker thread exits after this many seconds; all exit when the Backend
#: closes. The bound is for a Backend that is dropped without being closed.
_IDLE_EXIT: Final = 10.0

#: Schemes whose non-blocking try and release are local system calls of microseconds
#: (``fcntl`` on a local file): they run on the event loop itself. Measured on 2 cores:
#: 155 -> 57 us per uncontended acquire+release (inlining the try alone: 132 us), and
#: loop lag within its target (see benchmarks/).
_INLINE_TRY_SCHEMES: Final = frozenset({"file"})
#: An inline call slower than this (seconds) counts as slow; after
#: ``_INLINE_TRY_STRIKES`` slow calls in a row (a lock directory on a slow or network file
#: system) the Backend sends its calls back to the worker lanes for good.
_INLINE_TRY_LIMIT: Final = 0.002
_INLINE_TRY_STRIKES: Final = 3

_QUEUED: Final = 0
_RUNNING: Final = 1
_WITHDRAWN: Final = 2


def _loop_scheduler() -> Callable[[Callable[[], object]], object]:
    """How a worker thread runs a callback on the current event loop, without waiting.

    asyncio's ``loop.call_soon_threadsafe`` or trio's ``TrioToken.run_sync_soon``: the
    worker is free again at once. (``anyio.from_thread.run_sync``, the fallback, makes it
    wait for the loop: ~35 us a round trip here against ~25 us.)
    """
    token = anyio.lowlevel.current_token()
    native = getattr(token, "native_token", token)  # anyio < 4.11 returns it as is
    for name in ("call_soon_threadsafe", "run_sync_soon"):
        schedule = getattr(native, name, None)
        if schedule is not None:
            return cast("Callable[[Callable[[], object]], object]", schedule)
    return lambda callback: anyio.from_thread.run_sync(callback, token=token)


class _LaneClosed(Exception):
    """The lane's Backend is closed: no call can start any more."""


@final
class _Job:
    """One call into a worker thread, and its outcome."""

    __slots__ = ("done", "error", "func", "result", "schedule", "state")

    def __init__(
        self,
        func: Callable[[], object] | None,
        schedule: Callable[[Callable[[], object]], object],
    ) -> None:
        #: ``None`` is the order for the worker that takes it to exit.
        self.func = func
        self.schedule = schedule
        self.state = _QUEUED
        self.result: object = None
        self.error: BaseException | None = None
        self.done = anyio.Event()

    def finish(self) -> None:
        """From the worker: wake the caller on its event loop."""
        try:
            self.schedule(self.done.set)
        except RuntimeError:
            pass  # the event loop is gone (trio's RunFinishedError too): nobody waits


@final
class _Lane:
    """Up to ``size`` worker threads of one Backend, fed by a FIFO queue.

    Threads start when calls queue up and none is idle, and exit after ``_IDLE_EXIT``
    idle seconds or when :meth:`close` orders them to.
    """

    __slots__ = ("_closed", "_idle", "_jobs", "_mutex", "_threads", "name", "size")

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._mutex = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._closed = False

    @property
    def threads(self) -> frozenset[threading.Thread]:
        """The worker threads alive now."""
        with self._mutex:
            return frozenset(self._threads)

    def submit(self, job: _Job) -> None:
        with self._mutex:
            if self._closed:
                raise _LaneClosed
            self._jobs.put(job)
            if self._idle < self._jobs.qsize() and len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._threads.add(thread)
                thread.start()

    def withdraw(self, job: _Job) -> bool:
        """Take back a job no worker has started; ``False`` if one has."""
        with self._mutex:
            if job.state != _QUEUED:
                return False
            job.state = _WITHDRAWN
            return True

    def close(self, schedule: Callable[[Callable[[], object]], object]) -> list[_Job]:
        """Refuse new calls; order every thread to exit once the queue before it is done.

        Returns the exit orders: each is done when its thread has left its loop.
        """
        with self._mutex:
            if self._closed:
                return []
            self._closed = True
            orders = [_Job(None, schedule) for _ in self._threads]
            for order in orders:
                self._jobs.put(order)
            return orders

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._mutex:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=_IDLE_EXIT)
            except queue.Empty:
                with self._mutex:
                    self._idle -= 1
                    # close() queues one exit order per thread under this mutex: if the
                    # queue is empty now, none is meant for this thread.
                    if self._jobs.empty():
                        self._threads.discard(me)
                        return
                continue
            with self._mutex:
                self._idle -= 1
                if job.state == _WITHDRAWN:
                    continue
                job.state = _RUNNING
                if job.func is None:
                    self._threads.discard(me)
            if job.func is None:
                job.finish()
                return
            try:
                job.result = job.func()
            except BaseException as exc:
                job.error = exc
            job.finish()


async def _run_in_lane(
    lane: _Lane,
    schedule: Callable[[Callable[[], object]], object],
    func: Callable[[], T],
) -> T:
    """Run ``func`` in one of ``lane``'s threads; never blocks the event loop.

    A caller cancelled while its call is still queued withdraws it (it never runs). A
    caller cancelled while its call runs waits, shielded, for the call to end before the
    cancellation goes on, so the outcome is never lost: a lock granted in the worker
    thread is recorded in ``BackendLock.held`` for the caller's cleanup to release.

    Raises:
        _LaneClosed: the lane's Backend is closed.
    """
    job = _Job(func, schedule)
    lane.submit(job)
    try:
        await job.done.wait()
    except BaseException:
        if lane.withdraw(job):
            raise
        while not job.done.is_set():
            try:
                with anyio.CancelScope(shield=True):
                    await job.done.wait()
            except BaseException:  # a native asyncio cancel pierces the shield
                pass
        raise
    error = job.error
    if error is not None:
        job.error = None  # no reference cycle through the traceback
        raise error
    return cast("T", job.result)


@final
class BackendLock:
    """One backend lock for one key, as held (or tried) through one :class:`Backend`.

    ``held`` is set by the worker thread itself the moment tooz grants the lock, so an
    async caller that was cancelled while the try ran can still see that it must release.
    """

    __slots__ = ("_tooz_lock", "backend", "held", "key")

    def __init__(self, backend: Backend, key: str) -> None:
        self.backend = backend
        self.key = key
        self.held = False
        self._tooz_lock: tooz.locking.Lock | None = None


@final
class Backend:
    """One started tooz coordinator, and the worker lanes that call it."""

    def __init__(self, driver: tooz.coordination.CoordinationDriver, url: str) -> None:
        self._driver = driver
        self._url = url
        self.scheme = url.partition("://")[0]
        self.requires_beating: bool = bool(driver.requires_beating)
        self.reserved_keys: frozenset[str] = (
            _FILE_RESERVED if self.scheme == "file" else frozenset()
        )
        #: Seconds a held lock survives at the backend without a refresh (the lock TTL,
        #: or the ZooKeeper session timeout); ``None`` where locks live as long as the
        #: connection (file, ipc, postgresql, mysql).
        self.lock_ttl: float | None = _lock_ttl(driver, self.scheme)
        self._zookeeper = self.scheme in {"zookeeper", "kazoo"}
        self._acquire_lane = _Lane(f"aiotooz-acquire {self.scheme}", 2)
        self._control_lane = _Lane(f"aiotooz-control {self.scheme}", 2)
        #: How worker threads wake the event loop; taken from the first call's loop.
        self._schedule: Callable[[Callable[[], object]], object] | None = None
        self._inline_tries = self.scheme in _INLINE_TRY_SCHEMES
        #: postgresql: advisory lock (tooz's 2-byte key) -> our key held on it.
        self._pg_held: dict[bytes, str] = {}
        self._pg_guard = threading.Lock()
        #: postgresql, mysql: serialises the driver's own connection (see _taken_in_database).
        self._probe_guard = threading.Lock()
        self._slow_inline_tries = 0

    @classmethod
    async def connect(cls, url: str, member_id: str) -> Backend:
        """Create and start a tooz coordinator for ``url`` in a worker thread."""

        def start() -> tooz.coordination.CoordinationDriver:
            driver = cls._load_driver(url, member_id)
            if url.startswith("redis:"):
                _drop_redis_client_retries(driver)
            try:
                driver.start(start_heart=False)
            except Exception as exc:
                raise _translate(exc, "connecting", url) from exc
            return driver

        # A lane of its own: connecting may hang for the client's connect timeout on an
        # unreachable host, and must not hold up releases while it does.
        lane = _Lane(f"aiotooz-connect {url.partition('://')[0]}", 1)
        schedule = _loop_scheduler()
        try:
            driver = await _run_in_lane(lane, schedule, start)
        finally:
            lane.close(schedule)  # its thread exits at once; nobody needs to wait
        backend = cls(driver, url)
        backend._schedule = schedule
        return backend

    @staticmethod
    def _load_driver(url: str, member_id: str) -> tooz.coordination.CoordinationDriver:
        scheme = url.partition("://")[0]
        shown = redact_url(url)
        if scheme not in known_schemes():
            raise ConfigurationError(
                f"unknown backend scheme {scheme!r} in {shown}; "
                f"use one of: {', '.join(known_schemes())}"
            )
        defaults: dict[str, Any] = _driver_defaults(
            scheme, urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        )
        try:
            return tooz.coordination.get_coordinator(url, member_id.encode("utf-8"), **defaults)
        except ImportError as exc:
            raise ConfigurationError(
                f"the {scheme!r} backend needs a client library that is not installed "
                f"({exc}); install it with: {_install_hint(scheme, exc.name)}"
            ) from exc
        except RuntimeError as exc:
            # stevedore's NoMatches: the driver is registered but failed to load.
            raise ConfigurationError(
                f"the {scheme!r} backend could not be loaded ({exc}); its client library "
                f"may be missing: {_install_hint(scheme, None)}"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"bad backend URL {shown}: {exc}") from exc
        except Exception as exc:
            raise _translate(exc, "loading the driver", url) from exc

    async def _call(self, lane: _Lane, action: str, func: Callable[[], T]) -> T:
        if self._schedule is None:
            self._schedule = _loop_scheduler()
        try:
            # A cancelled caller still waits for a call that has started (shielded), so
            # its outcome (a granted lock, say) is never lost. Calls here are short.
            return await _run_in_lane(lane, self._schedule, func)
        except _LaneClosed:
            raise BackendUnavailable(
                f"{action} on {redact_url(self._url)}: the connection is closed"
            ) from None
        except CoordinationError:
            raise
        except Exception as exc:
            raise _translate(exc, action, self._url) from exc

    async def _call_inline(self, action: str, func: Callable[[], T]) -> T:
        """Run a microsecond, never-waiting call on the event loop thread itself.

        A checkpoint comes first, as with any await; after it there is no await, so no
        cancellation can come between the call and its outcome reaching the caller.
        """
        await anyio.lowlevel.checkpoint()
        started = time.perf_counter()
        try:
            return func()
        except CoordinationError:
            raise
        except Exception as exc:
            raise _translate(exc, action, self._url) from exc
        finally:
            if time.perf_counter() - started <= _INLINE_TRY_LIMIT:
                self._slow_inline_tries = 0
            else:
                self._slow_inline_tries += 1
                if self._slow_inline_tries >= _INLINE_TRY_STRIKES:
                    self._inline_tries = False

    def lock(self, key: str) -> BackendLock:
        """A handle for ``key``; nothing is sent to the backend until :meth:`try_acquire`."""
        return BackendLock(self, key)

    async def try_acquire(self, lock: BackendLock) -> bool:
        """Try once to take ``lock`` without waiting; ``True`` if it is now held."""

        def attempt() -> bool:
            if lock._tooz_lock is None:
                lock._tooz_lock = self._get_tooz_lock(lock.key)
            try:
                granted = self._try_once(lock._tooz_lock, lock.key)
            except Exception as exc:
                if type(exc).__name__ in _NOT_ACQUIRED_NAMES:
                    return False
                raise
            lock.held = granted
            return granted

        if self.scheme == "mysql" and len(lock.key) > _MYSQL_MAX_KEY:
            raise UnsupportedOperation(
                f"the mysql backend cannot lock key {lock.key!r}: MySQL lock names are at "
                f"most {_MYSQL_MAX_KEY} characters and this one has {len(lock.key)}; use a "
                "coordinator prefix of at most 7 characters (keys are at most "
                "len(prefix) + 57 characters)"
            )
        action = f"acquiring {lock.key!r}"
        if self._inline_tries:
            return await self._call_inline(action, attempt)
        return await self._call(self._acquire_lane, action, attempt)

    def _try_once(self, tooz_lock: tooz.locking.Lock, key: str) -> bool:
        """One non-blocking try, each driver's quirks smoothed out (in a worker thread)."""
        if self.scheme == "file":
            return _file_try(tooz_lock)
        if self.scheme == "ipc":
            return _ipc_try(tooz_lock)
        if self.scheme in {"etcd3+http", "etcd3+https"}:
            return _etcd_try(self._driver, tooz_lock)
        if self.scheme == "postgresql":
            return self._postgresql_try(tooz_lock, key)
        if self.scheme == "mysql" and self._taken_in_database(tooz_lock):
            return False
        if self._zookeeper:
            self._check_zookeeper_connected()
        return bool(tooz_lock.acquire(blocking=False))

    def _check_zookeeper_connected(self) -> None:
        """Refuse a ZooKeeper call while kazoo is not connected.

        kazoo queues a call made while it reconnects, and its synchronous API waits for
        the answer with no timeout: with the server down, a heartbeat, try or release
        would park its worker thread until the server came back (seen: forever).
        """
        state = self._driver._coord.state  # type: ignore[attr-defined]
        if state != "CONNECTED":
            raise tooz.coordination.ToozConnectionError(f"the ZooKeeper session is {state}")

    def _zookeeper_heartbeat(self) -> None:
        """The ZooKeeper heartbeat: a read that proves the session, with a deadline."""
        self._check_zookeeper_connected()
        client = self._driver._coord  # type: ignore[attr-defined]
        assert self.lock_ttl is not None
        try:
            client.exists_async("/").get(timeout=self.lock_ttl / 2)
        except client.handler.timeout_exception as exc:
            raise tooz.coordination.ToozConnectionError(
                f"ZooKeeper did not answer within {self.lock_ttl / 2:g} s"
            ) from exc

    def _taken_in_database(self, tooz_lock: Any) -> bool:
        """Whether PostgreSQL or MySQL shows the lock taken, asked on one kept connection.

        tooz's postgresql and mysql drivers open a connection for every try and close it
        when the try fails: a waiter polling every 50 ms would open 20 connections a
        second. The driver's own connection (opened at start, unused by locks) tells a
        taken lock without one; only a lock that looks free is tried. Any trouble with
        that connection means "not known", and the real try decides.
        """
        driver: Any = self._driver
        with self._probe_guard:
            try:
                if self.scheme == "postgresql":
                    if driver._conn.closed:
                        driver._conn = driver.get_connection(driver._parsed_url, driver._options)
                    driver._conn.autocommit = True
                    with driver._conn.cursor() as cursor:
                        cursor.execute(_PG_HELD_SQL, tuple(tooz_lock.key))
                        row = cursor.fetchone()
                    return bool(row and row[0])
                if not driver._conn.open:
                    driver._conn.connect()
                with driver._conn.cursor() as cursor:
                    cursor.execute("SELECT IS_FREE_LOCK(%s)", (tooz_lock.name,))
                    row = cursor.fetchone()
                return row is not None and row[0] == 0
            except Exception:
                return False

    def _postgresql_try(self, pg_lock: Any, key: str) -> bool:
        """One try on postgresql, refusing a name that would wait for its own holder.

        tooz maps each name to one of only 65,536 advisory locks (2 bytes of its MD5).
        Two keys on one advisory lock exclude each other, and since tooz takes each lock
        on a connection of its own, a task holding one and asking for the other would
        wait for itself forever. Through one coordinator that is an error instead.
        """
        advisory = bytes(pg_lock.key)
        with self._pg_guard:
            other = self._pg_held.get(advisory)
        if other is not None and other != key:
            raise UnsupportedOperation(
                f"the postgresql backend cannot hold {key!r} while this coordinator holds "
                f"{other!r}: tooz maps both to advisory lock {tuple(advisory)} (it has only "
                "65,536 of them), so waiting would never end; use other names or another "
                "backend"
            )
        if self._taken_in_database(pg_lock):
            return False
        granted = bool(pg_lock.acquire(blocking=False))
        if granted:
            with self._pg_guard:
                self._pg_held[advisory] = key
        return granted

    def _get_tooz_lock(self, key: str) -> tooz.locking.Lock:
        with _GET_LOCK:
            tooz_lock = self._driver.get_lock(key.encode("ascii"))
            if self.scheme == "file":
                # The file driver names its lock objects by their absolute path. A new
                # object has not opened its file yet, so dropping it is free.
                tooz_lock = _FILE_LOCKS.setdefault(str(tooz_lock.name), tooz_lock)
            return tooz_lock

    async def release(self, lock: BackendLock) -> bool:
        """Release ``lock``; ``False`` if the backend says it was no longer ours."""

        def release() -> bool:
            if not lock.held or lock._tooz_lock is None:
                return False
            lock.held = False
            if self._zookeeper:
                # The lock node is ephemeral: it goes with the session if we cannot.
                self._check_zookeeper_connected()
            if self.scheme == "postgresql":
                with self._pg_guard:
                    self._pg_held.pop(bytes(lock._tooz_lock.key), None)  # type: ignore[attr-defined]
            return bool(lock._tooz_lock.release())

        action = f"releasing {lock.key!r}"
        if self._inline_tries:
            return await self._call_inline(action, release)
        return await self._call(self._control_lane, action, release)

    async def heartbeat(self, locks: Sequence[BackendLock] = ()) -> list[bool | None]:
        """Send one heartbeat (refreshing TTL locks), then ask who owns ``locks``.

        tooz's redis and memcached drivers swallow a failed lock refresh and etcd's
        ignores it, so a beat that returns normally proves nothing about the locks:
        each is checked with ``is_still_owner()`` where the driver can tell.

        Returns:
            For each lock: ``True`` still ours, ``False`` no longer ours, ``None`` the
            driver cannot tell.
        """

        def beat() -> list[bool | None]:
            if self._zookeeper:
                self._zookeeper_heartbeat()
            else:
                self._driver.heartbeat()
            return [self._still_owner(lock) for lock in locks]

        return await self._call(self._control_lane, "heartbeat", beat)

    def _still_owner(self, lock: BackendLock) -> bool | None:
        if self.scheme == "file" or lock._tooz_lock is None:
            return None  # the file driver only echoes its own flag
        try:
            return bool(lock._tooz_lock.is_still_owner())
        except tooz.NotImplemented:
            return None

    async def close(self) -> None:
        """Stop the tooz coordinator; errors are swallowed (the connection is going)."""

        def stop() -> None:
            if self._driver.is_started:
                self._driver.stop()
            if self.scheme in {"zookeeper", "kazoo"}:
                # tooz stops its kazoo client but never closes it, leaking a socket pair.
                self._driver._coord.close()  # type: ignore[attr-defined]

        try:
            await self._call(self._control_lane, "stopping", stop)
        except CoordinationError:
            pass
        finally:
            await self._stop_threads()

    async def _stop_threads(self) -> None:
        """Make every worker thread exit once the calls queued before are done."""
        schedule = self._schedule
        if schedule is None:
            schedule = self._schedule = _loop_scheduler()
        orders = self._acquire_lane.close(schedule) + self._control_lane.close(schedule)
        # Bounded: a call stuck in a driver must not hang stop(); its thread exits
        # when the call returns.
        with anyio.move_on_after(5, shield=True):
            for order in orders:
                await order.done.wait()
