"""The thread bridge: the only module that imports tooz.

Every blocking tooz call runs in a worker thread, on one of two lanes with their own
capacity, so that releases and heartbeats never queue behind lock attempts:

* the *acquire* lane runs short, non-blocking tries (never a wait: waiting is done in
  async code by :mod:`aiotooz._lock`, so no thread is ever parked on a busy lock);
* the *control* lane runs connect, release, heartbeat and stop.

Neither lane uses anyio's default thread limiter, so aiotooz never competes with the
application's own ``to_thread`` calls for tokens.

Per-driver quirks are normalised here and every tooz or client-library exception is
translated, once, into the :mod:`aiotooz._exceptions` tree.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar, final

import anyio
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

#: Lock keys the file driver keeps for itself (its group and tmp directories).
_FILE_RESERVED: Final = frozenset({"groups", "tmp"})

# tooz's file driver creates per-path barriers with a non-atomic setdefault: two threads
# calling get_lock() for one path at once can get different barriers and both "hold"
# the lock. Creating lock objects under one process-wide lock closes that race.
_GET_LOCK = threading.Lock()

# Exceptions that mean "not acquired within the time given" on some drivers
# (tenacity.RetryError on memcached and etcd3gw, kazoo's LockTimeout on zookeeper).
_NOT_ACQUIRED_NAMES: Final = frozenset({"RetryError", "LockTimeout"})


def known_schemes() -> list[str]:
    """The backend URL schemes tooz has drivers for in this environment."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group="tooz.backends"))


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


@final
class BackendLock:
    """One backend lock for one key, as held (or tried) through one :class:`Backend`.

    ``held`` is set by the worker thread itself the moment tooz grants the lock, so an
    async caller that was cancelled while the try ran can still see that it must release.
    """

    __slots__ = ("backend", "held", "key", "_tooz_lock")

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
        self.reserved_keys: frozenset[str] = _FILE_RESERVED if self.scheme == "file" else frozenset()
        self._acquire_lane = anyio.CapacityLimiter(2)
        self._control_lane = anyio.CapacityLimiter(2)

    @classmethod
    async def connect(cls, url: str, member_id: str) -> Backend:
        """Create and start a tooz coordinator for ``url`` in a worker thread."""

        def start() -> tooz.coordination.CoordinationDriver:
            driver = cls._load_driver(url, member_id)
            try:
                driver.start(start_heart=False)
            except Exception as exc:
                raise _translate(exc, "connecting", url) from exc
            return driver

        # A lane of its own: connecting may hang for the client's connect timeout on an
        # unreachable host, and must not hold up releases while it does.
        driver = await anyio.to_thread.run_sync(start, limiter=anyio.CapacityLimiter(1))
        return cls(driver, url)

    @staticmethod
    def _load_driver(url: str, member_id: str) -> tooz.coordination.CoordinationDriver:
        scheme = url.partition("://")[0]
        shown = redact_url(url)
        if scheme not in known_schemes():
            raise ConfigurationError(
                f"unknown backend scheme {scheme!r} in {shown}; "
                f"use one of: {', '.join(known_schemes())}"
            )
        try:
            return tooz.coordination.get_coordinator(url, member_id.encode("utf-8"))
        except ImportError as exc:
            extra = _EXTRAS.get(scheme, "all")
            raise ConfigurationError(
                f"the {scheme!r} backend needs its client library ({exc.name or exc}); "
                f"install it with: pip install 'aiotooz[{extra}]'"
            ) from exc
        except RuntimeError as exc:
            # stevedore's NoMatches: the driver is registered but failed to load.
            extra = _EXTRAS.get(scheme, "all")
            raise ConfigurationError(
                f"the {scheme!r} backend could not be loaded ({exc}); its client library "
                f"may be missing: pip install 'aiotooz[{extra}]'"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"bad backend URL {shown}: {exc}") from exc
        except Exception as exc:
            raise _translate(exc, "loading the driver", url) from exc

    async def _call(self, lane: anyio.CapacityLimiter, action: str, func: Callable[[], T]) -> T:
        try:
            # abandon_on_cancel=False: a cancelled caller still waits for the call to end,
            # so its outcome (a granted lock, say) is never lost. Calls here are short.
            return await anyio.to_thread.run_sync(func, limiter=lane)
        except CoordinationError:
            raise
        except Exception as exc:
            raise _translate(exc, action, self._url) from exc

    def lock(self, key: str) -> BackendLock:
        """A handle for ``key``; nothing is sent to the backend until :meth:`try_acquire`."""
        return BackendLock(self, key)

    async def try_acquire(self, lock: BackendLock) -> bool:
        """Try once to take ``lock`` without waiting; ``True`` if it is now held."""

        def attempt() -> bool:
            if lock._tooz_lock is None:
                with _GET_LOCK:
                    lock._tooz_lock = self._driver.get_lock(lock.key.encode("ascii"))
            try:
                granted = bool(lock._tooz_lock.acquire(blocking=False))
            except Exception as exc:
                if type(exc).__name__ in _NOT_ACQUIRED_NAMES:
                    return False
                raise
            lock.held = granted
            return granted

        if self.scheme == "ipc":
            # tooz's ipc driver can only wait forever unless sysv_ipc has semaphore
            # timeouts, which would park a thread per waiter; refuse rather than block.
            raise UnsupportedOperation(
                "the ipc backend cannot try a lock without waiting on this system "
                "(sysv_ipc lacks semaphore timeouts); use the file backend for "
                "single-machine locks"
            )
        return await self._call(self._acquire_lane, f"acquiring {lock.key!r}", attempt)

    async def release(self, lock: BackendLock) -> bool:
        """Release ``lock``; ``False`` if the backend says it was no longer ours."""

        def release() -> bool:
            if not lock.held or lock._tooz_lock is None:
                return False
            lock.held = False
            return bool(lock._tooz_lock.release())

        return await self._call(self._control_lane, f"releasing {lock.key!r}", release)

    async def heartbeat(self) -> float | None:
        """Send one heartbeat; returns tooz's hint of seconds until the next is due."""
        return await self._call(self._control_lane, "heartbeat", self._driver.heartbeat)

    async def close(self) -> None:
        """Stop the tooz coordinator; errors are swallowed (the connection is going)."""

        def stop() -> None:
            if self._driver.is_started:
                self._driver.stop()

        try:
            await self._call(self._control_lane, "stopping", stop)
        except CoordinationError:
            pass

