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

import base64
import contextlib
import importlib.metadata
import os
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
# The table is keyed by the file's identity (see _file_identity), not its path string.
_FILE_LOCKS: weakref.WeakValueDictionary[tuple[int, int, str], Any] = weakref.WeakValueDictionary()

# Exceptions that mean "not acquired within the time given" on some drivers
# (tenacity.RetryError on memcached and etcd3gw, kazoo's LockTimeout on zookeeper).
_NOT_ACQUIRED_NAMES: Final = frozenset({"RetryError", "LockTimeout"})


def known_schemes() -> list[str]:
    """The backend URL schemes tooz has drivers for in this environment."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group="tooz.backends"))


#: memcached expires items in whole seconds, by a clock that ticks once a second: an item
#: stored with ``expire=N`` can vanish as early as ``N - 1`` seconds later (measured:
#: 1.0-1.85 s for N = 2). The lease rule must count from that, not from N.
_MEMCACHED_EARLY_EXPIRY: Final = 1.0


def _lock_ttl(driver: tooz.coordination.CoordinationDriver, scheme: str) -> float | None:
    """How long a held lock is guaranteed to outlive its last refresh at the backend."""
    if scheme == "memcached":
        return float(driver.lock_timeout) - _MEMCACHED_EARLY_EXPIRY  # type: ignore[attr-defined]
    if scheme in {"redis", "etcd3+http", "etcd3+https"}:
        return float(driver.lock_timeout)  # type: ignore[attr-defined]
    if scheme in {"zookeeper", "kazoo"}:
        # The server may grant a shorter session than asked for (its maxSessionTimeout):
        # kazoo keeps the negotiated one, in milliseconds, once connected.
        client = driver._coord  # type: ignore[attr-defined]
        negotiated = client._session_timeout / 1000
        return min(float(driver.timeout), float(negotiated))  # type: ignore[attr-defined]
    return None


def _check_ttl(driver: tooz.coordination.CoordinationDriver, scheme: str, shown: str) -> None:
    """Refuse a lock TTL the backend cannot honour (before connecting)."""
    if scheme == "memcached" and driver.lock_timeout < 2:  # type: ignore[attr-defined]
        raise ConfigurationError(
            f"lock_timeout={driver.lock_timeout} in {shown} is too short: memcached "  # type: ignore[attr-defined]
            "expires locks in whole seconds and up to 1 s early, so a lock must live at "
            "least 2 s (and then only 1 s is guaranteed); use lock_timeout=3 or more"
        )


def _file_identity(directory: str, key: str) -> tuple[int, int, str]:
    """What makes two lock files one: the directory's device and inode, and the name.

    One directory can have many spellings (a symlink such as /var/lock -> /run/lock, a
    bind mount); the path string would make two lock objects, and two descriptors, for
    one file (see _FILE_LOCKS).
    """
    info = os.stat(directory)
    return info.st_dev, info.st_ino, key


def _resolve_file_url(url: str) -> str:
    """The file URL with its directory path made canonical (symlinks, '.', '..').

    tooz refuses every lock of a directory spelled with '.' or '..' ("outside of parent
    directory"), and its file locks are per path, not per file.
    """
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=os.path.realpath(parts.path)))


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


def _etcd_still_owner(driver: Any, etcd_lock: Any) -> bool:
    """Whether the lock's key still holds this lock's token, read from etcd.

    tooz cannot tell (``is_still_owner`` is not implemented) and its heartbeat ignores a
    lease that is gone, so a key deleted or a lease revoked from outside went unnoticed.
    """
    values = driver.client.get(etcd_lock._key)
    return bool(values) and values[0] == base64.b64decode(etcd_lock._uuid)


def _etcd_release(driver: Any, etcd_lock: Any) -> bool:
    """Tooz's release, then revoke the lock's lease, which tooz leaves alive.

    Without the revoke every acquire and release left a lease living ``lock_timeout``
    seconds (30 s by default): ~3,000 live leases at 100 locks/s. A lock that was lost
    is also dropped from the driver's refresh list, which tooz keeps it in.
    """
    try:
        return bool(etcd_lock.release())
    finally:
        driver._acquired_locks.discard(etcd_lock)
        with contextlib.suppress(Exception):  # gone already: nothing left to revoke
            etcd_lock._lease.revoke()


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
#: The caller stopped waiting while the call ran (cancelled, or past its time): the
#: worker hands the call's outcome to the job's ``abandoned`` callback instead.
_ABANDONED: Final = 3
_DONE: Final = 4


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

    __slots__ = ("abandoned", "done", "error", "func", "result", "schedule", "state")

    def __init__(
        self,
        func: Callable[[], object] | None,
        schedule: Callable[[Callable[[], object]], object],
        abandoned: Callable[[object], object] | None = None,
    ) -> None:
        #: ``None`` is the order for the worker that takes it to exit.
        self.func = func
        self.schedule = schedule
        #: Called with the result, in a worker thread, if the call succeeds after its
        #: caller stopped waiting (a try granted too late is released through it).
        self.abandoned = abandoned
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


def _clean_up(abandoned: Callable[[object], object], result: object) -> None:
    """Run an abandoned call's clean-up; its errors have nobody to go to."""
    try:
        abandoned(result)
    except Exception:
        pass


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

    def abandon(self, job: _Job, withdraw: bool = True) -> int:
        """The caller stops waiting for ``job``; returns the job's state before that.

        A queued job is withdrawn (it never runs) if ``withdraw``, else it is abandoned
        like a running one: it still runs, and its worker cleans up after it. A done
        job is left to the caller.
        """
        with self._mutex:
            state = job.state
            if state == _QUEUED and withdraw:
                job.state = _WITHDRAWN
            elif state in (_QUEUED, _RUNNING):
                job.state = _ABANDONED
            return state

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
                if job.state == _QUEUED:  # an abandoned job that must run still runs
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
            with self._mutex:
                abandoned = job.state == _ABANDONED
                job.state = _DONE
            if abandoned:
                if job.error is None and job.abandoned is not None:
                    _clean_up(job.abandoned, job.result)
                job.result = job.error = None
            job.finish()


class _CallTimedOut(Exception):
    """The call did not return within the time its caller gave it."""


async def _run_in_lane(
    lane: _Lane,
    schedule: Callable[[Callable[[], object]], object],
    func: Callable[[], T],
    limit: float,
    abandoned: Callable[[T], object] | None = None,
    must_run: bool = False,
) -> T:
    """Run ``func`` in one of ``lane``'s threads; never blocks the event loop.

    The caller waits at most ``limit`` seconds, and not at all once cancelled: a
    backend that accepts connections but never answers (a paused server) must not hold
    up a cancel scope or a deadline. A call the caller stops waiting for is withdrawn if
    no worker has started it (unless it ``must_run``, as a release must); otherwise it
    runs on, and if it succeeds, ``abandoned`` gets its result in the worker thread (a
    try granted after its caller left releases the lock there), so that no outcome is
    ever lost.

    Raises:
        _LaneClosed: the lane's Backend is closed.
        _CallTimedOut: no answer within ``limit`` seconds.
    """
    job = _Job(func, schedule, cast("Callable[[object], object] | None", abandoned))
    lane.submit(job)
    try:
        with anyio.move_on_after(limit):
            await job.done.wait()
    except BaseException:
        _give_up(lane, job, must_run)
        raise
    if not job.done.is_set():
        _give_up(lane, job, must_run)
        raise _CallTimedOut
    error = job.error
    if error is not None:
        job.error = None  # no reference cycle through the traceback
        raise error
    return cast("T", job.result)


def _give_up(lane: _Lane, job: _Job, must_run: bool) -> None:
    """Stop waiting for ``job``; if it is already done, clean up after its result."""
    if (
        lane.abandon(job, withdraw=not must_run) != _DONE
        or job.error is not None
        or job.abandoned is None
    ):
        return
    result, job.result = job.result, None
    cleanup = job.abandoned
    with contextlib.suppress(_LaneClosed):
        lane.submit(_Job(lambda: _clean_up(cleanup, result), job.schedule))


@final
class BackendLock:
    """One backend lock for one key, as held (or tried) through one :class:`Backend`.

    ``held`` is true from the moment a try's grant reaches its caller until release. A
    grant that comes after its caller stopped waiting never reaches it: the worker
    thread releases that lock itself (see ``_run_in_lane``).
    """

    __slots__ = ("_tooz_lock", "backend", "held", "key")

    def __init__(self, backend: Backend, key: str) -> None:
        self.backend = backend
        self.key = key
        self.held = False
        self._tooz_lock: tooz.locking.Lock | None = None


@final
class Backend:
    """One started tooz coordinator, and the worker lanes that call it.

    Args:
        driver: the started tooz coordinator.
        url: its URL (as given to tooz: a file URL is already resolved).
        call_timeout: seconds a caller waits for any one call before it counts as failed.
    """

    def __init__(
        self, driver: tooz.coordination.CoordinationDriver, url: str, call_timeout: float
    ) -> None:
        self._driver = driver
        self._url = url
        self.call_timeout = call_timeout
        self.scheme = url.partition("://")[0]
        self.requires_beating: bool = bool(driver.requires_beating)
        self.reserved_keys: frozenset[str] = (
            _FILE_RESERVED if self.scheme == "file" else frozenset()
        )
        #: Seconds a held lock is guaranteed to survive at the backend without a refresh
        #: (the lock TTL, or the ZooKeeper session timeout); ``None`` where locks live as
        #: long as the connection (file, ipc, postgresql, mysql).
        self.lock_ttl: float | None = _lock_ttl(driver, self.scheme)
        self._zookeeper = self.scheme in {"zookeeper", "kazoo"}
        self._etcd = self.scheme in {"etcd3+http", "etcd3+https"}
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
        if self.scheme == "mysql":
            _bound_mysql_connection(driver._conn, call_timeout)  # type: ignore[attr-defined]

    @classmethod
    async def connect(cls, url: str, member_id: str, call_timeout: float) -> Backend:
        """Create and start a tooz coordinator for ``url`` in a worker thread.

        Raises:
            ConfigurationError: the URL, scheme or client library is wrong.
            BackendUnavailable: the backend cannot be reached within ``call_timeout``.
        """
        if url.startswith("file:"):
            url = _resolve_file_url(url)

        def start() -> tooz.coordination.CoordinationDriver:
            driver = cls._load_driver(url, member_id)
            if url.startswith("redis:"):
                _drop_redis_client_retries(driver)
            try:
                driver.start(start_heart=False)
            except Exception as exc:
                raise _translate(exc, "connecting", url) from exc
            return driver

        def stop_late(driver: tooz.coordination.CoordinationDriver) -> None:
            # Connected after the caller gave up: nobody will use this connection.
            driver.stop()

        # A lane of its own: connecting may hang for the client's connect timeout on an
        # unreachable host, and must not hold up releases while it does.
        lane = _Lane(f"aiotooz-connect {url.partition('://')[0]}", 1)
        schedule = _loop_scheduler()
        try:
            driver = await _run_in_lane(lane, schedule, start, call_timeout, stop_late)
        except _CallTimedOut:
            raise BackendUnavailable(
                f"connecting on {redact_url(url)}: no answer within {call_timeout:g} s "
                "(AIOTOOZ_CALL_TIMEOUT)"
            ) from None
        finally:
            lane.close(schedule)  # its thread exits once done; nobody needs to wait
        try:
            backend = cls(driver, url, call_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                driver.stop()
            raise
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
            driver = tooz.coordination.get_coordinator(url, member_id.encode("utf-8"), **defaults)
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
        _check_ttl(driver, scheme, shown)
        return driver

    async def _call(
        self,
        lane: _Lane,
        action: str,
        func: Callable[[], T],
        *,
        wait: float | None = None,
        abandoned: Callable[[T], object] | None = None,
        must_run: bool = False,
    ) -> T:
        """Run ``func`` in ``lane``, waiting at most ``wait`` or the call timeout.

        Raises:
            _CallTimedOut: only when ``wait`` is given and shorter than the call
                timeout (the caller's own deadline passed first).
            BackendUnavailable: the backend failed, did not answer within the call
                timeout, or the connection is closed.
        """
        if self._schedule is None:
            self._schedule = _loop_scheduler()
        limit = self.call_timeout if wait is None else min(wait, self.call_timeout)
        try:
            return await _run_in_lane(lane, self._schedule, func, limit, abandoned, must_run)
        except _LaneClosed:
            raise BackendUnavailable(
                f"{action} on {redact_url(self._url)}: the connection is closed"
            ) from None
        except _CallTimedOut:
            if limit < self.call_timeout:
                raise
            raise BackendUnavailable(
                f"{action} on {redact_url(self._url)}: no answer within "
                f"{self.call_timeout:g} s (AIOTOOZ_CALL_TIMEOUT)"
            ) from None
        except CoordinationError:
            raise
        except Exception as exc:
            raise _translate(exc, action, self._url) from exc

    async def _call_inline(self, action: str, func: Callable[[], T], must_run: bool = False) -> T:
        """Run a microsecond, never-waiting call on the event loop thread itself.

        A checkpoint comes first, as with any await, so no cancellation can come between
        the call and its outcome reaching the caller. A call that ``must_run`` (a
        release, which a cancellation must not skip) has its checkpoint after it.
        """
        if not must_run:
            await anyio.lowlevel.checkpoint()
        try:
            return self._run_inline(action, func)
        finally:
            if must_run:
                await anyio.lowlevel.checkpoint()

    def _run_inline(self, action: str, func: Callable[[], T]) -> T:
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

    async def try_acquire(self, lock: BackendLock, wait: float | None = None) -> bool:
        """Try once to take ``lock`` without waiting; ``True`` if it is now held.

        Args:
            lock: the handle to try; after a try that was given up (``False`` because
                ``wait`` ran out), use a new one.
            wait: seconds the caller can spend on this try at most (its deadline);
                past them the try counts as not granted, and if the backend grants it
                later, the lock is released again in the worker thread.

        Raises:
            BackendUnavailable: the backend failed or did not answer in time.
        """
        if self.scheme == "mysql" and len(lock.key) > _MYSQL_MAX_KEY:
            raise UnsupportedOperation(
                f"the mysql backend cannot lock key {lock.key!r}: MySQL lock names are at "
                f"most {_MYSQL_MAX_KEY} characters and this one has {len(lock.key)}; use a "
                "coordinator prefix of at most 7 characters (keys are at most "
                "len(prefix) + 57 characters)"
            )

        # The tooz lock object this try uses. A try given up may still be running in
        # its worker thread with it: the handle then gets a fresh one for the next try.
        tried: list[tooz.locking.Lock] = []

        def attempt() -> bool:
            tooz_lock = lock._tooz_lock
            if tooz_lock is None:
                tooz_lock = self._get_tooz_lock(lock.key)
            tried.append(tooz_lock)
            try:
                return self._try_once(tooz_lock, lock.key)
            except Exception as exc:
                if type(exc).__name__ in _NOT_ACQUIRED_NAMES:
                    return False
                raise

        def release_late(granted: bool) -> None:
            if granted:
                self._release_tooz(tried[0])

        action = f"acquiring {lock.key!r}"
        if self._inline_tries:
            granted = await self._call_inline(action, attempt)
        else:
            try:
                granted = await self._call(
                    self._acquire_lane, action, attempt, wait=wait, abandoned=release_late
                )
            except _CallTimedOut:
                lock._tooz_lock = None
                return False
            except BaseException:
                if not tried:
                    raise
                lock._tooz_lock = None  # cancelled or failed: the object may be in use
                raise
        lock._tooz_lock = tried[0]
        lock.held = granted
        return granted

    def _try_once(self, tooz_lock: tooz.locking.Lock, key: str) -> bool:
        """One non-blocking try, each driver's quirks smoothed out (in a worker thread)."""
        if self.scheme == "file":
            return _file_try(tooz_lock)
        if self.scheme == "ipc":
            return _ipc_try(tooz_lock)
        if self._etcd:
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
                # A new lock object has not opened its file yet, so dropping it is free.
                directory = self._driver._dir  # type: ignore[attr-defined]
                identity = _file_identity(directory, key)
                tooz_lock = _FILE_LOCKS.setdefault(identity, tooz_lock)
            elif self.scheme == "mysql":
                _bound_mysql_connection(tooz_lock._conn, self.call_timeout)  # type: ignore[attr-defined]
            return tooz_lock

    def _release_tooz(self, tooz_lock: Any) -> bool:
        """Release a tooz lock at the backend (in a worker thread, or inline on file)."""
        if self._zookeeper:
            # The lock node is ephemeral: it goes with the session if we cannot.
            self._check_zookeeper_connected()
        if self.scheme == "postgresql":
            with self._pg_guard:
                self._pg_held.pop(bytes(tooz_lock.key), None)
        if self._etcd:
            return _etcd_release(self._driver, tooz_lock)
        return bool(tooz_lock.release())

    async def release(self, lock: BackendLock) -> bool:
        """Release ``lock``; ``False`` if the backend says it was no longer ours.

        A caller that is cancelled, or waits longer than the call timeout, stops waiting;
        the release still runs (even if it was still queued), in its worker thread.

        Raises:
            BackendUnavailable: the backend failed or did not answer in time.
        """
        tooz_lock = lock._tooz_lock
        if not lock.held or tooz_lock is None:
            return False
        lock.held = False
        action = f"releasing {lock.key!r}"
        if self._inline_tries:
            return await self._call_inline(
                action, lambda: self._release_tooz(tooz_lock), must_run=True
            )
        return await self._call(
            self._control_lane, action, lambda: self._release_tooz(tooz_lock), must_run=True
        )

    async def heartbeat(self, locks: Sequence[BackendLock] = ()) -> list[bool | None]:
        """Send one heartbeat (refreshing TTL locks), then ask who owns ``locks``.

        tooz's redis and memcached drivers swallow a failed lock refresh and etcd's
        ignores it, so a beat that returns normally proves nothing about the locks:
        each is checked where the driver can tell.

        Returns:
            For each lock: ``True`` still ours, ``False`` no longer ours, ``None`` the
            driver cannot tell.

        Raises:
            BackendUnavailable: the backend failed or did not answer in time.
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
        if self._etcd:
            return _etcd_still_owner(self._driver, lock._tooz_lock)
        try:
            return bool(lock._tooz_lock.is_still_owner())
        except tooz.NotImplemented:
            return None

    async def close(self) -> None:
        """Stop the tooz coordinator; errors are swallowed (the connection is going).

        Bounded by the call timeout: a backend that does not answer is left behind.
        """

        def stop() -> None:
            if self._driver.is_started:
                self._driver.stop()
            if self._zookeeper:
                # tooz stops its kazoo client but never closes it, leaking a socket pair.
                self._driver._coord.close()  # type: ignore[attr-defined]

        if self._schedule is None:
            self._schedule = _loop_scheduler()
        answered = True
        try:
            await _run_in_lane(self._control_lane, self._schedule, stop, self.call_timeout)
        except _CallTimedOut:
            answered = False
        except Exception:
            pass
        finally:
            await self._stop_threads(wait=answered)

    async def _stop_threads(self, wait: bool = True) -> None:
        """Make every worker thread exit once the calls queued before are done."""
        schedule = self._schedule
        if schedule is None:
            schedule = self._schedule = _loop_scheduler()
        orders = self._acquire_lane.close(schedule) + self._control_lane.close(schedule)
        if not wait:
            return  # a call is stuck in the driver: its thread exits when it returns
        # Bounded: a call stuck in a driver must not hang stop(); its thread exits
        # when the call returns.
        with anyio.move_on_after(self.call_timeout, shield=True):
            for order in orders:
                await order.done.wait()


def _bound_mysql_connection(connection: Any, seconds: float) -> None:
    """Give a PyMySQL connection of tooz's read and write timeouts (tooz sets none).

    Without them a MySQL server that accepts but never answers parks the calling thread
    forever. PyMySQL applies them on every read and write of a connected socket.
    """
    connection._read_timeout = connection._write_timeout = seconds
