"""The user-facing lock: a name, a coordinator (or the default), async acquire/release."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import TracebackType
from typing import Any, final

import anyio

from ._coordinator import TRY_ONCE, Coordinator, Hold, get_default_coordinator
from ._exceptions import ConfigurationError, LockAcquireFailed, LockNotHeld
from ._names import check_name, format_name

__all__ = ["Blocking", "Lock", "deadline_for"]

#: ``True`` waits as long as it takes, ``False`` tries once, a number of seconds waits
#: at most that long.
Blocking = bool | float


def deadline_for(blocking: object) -> float | None:
    """Turn a ``blocking`` argument into an ``anyio.current_time()`` deadline.

    Raises:
        ConfigurationError: ``blocking`` is not a bool or a non-negative number.
    """
    if blocking is True:
        return None
    if blocking is False:
        return TRY_ONCE
    if isinstance(blocking, int | float) and not isinstance(blocking, bool):
        seconds = float(blocking)
        if seconds >= 0 and not math.isnan(seconds):
            return None if math.isinf(seconds) else anyio.current_time() + seconds
    raise ConfigurationError(
        "blocking must be True (wait as long as it takes), False (try once) or a "
        f"number of seconds >= 0 to wait at most, not {blocking!r}"
    )


@final
class Lock:
    """A distributed lock, named by a format string, held through a coordinator.

    When ``data`` is given, the name is built once, here, with ``name.format_map(data)``;
    without it the name is taken literally (any ``str`` is a valid name)::

        Lock("share-{share.id}", {"share": share}, coordinator=coordinator)

    Without ``coordinator`` the lock uses the default coordinator (see
    :func:`~aiotooz.set_default_coordinator`), looked up each time it is acquired.

    Tasks of one process that want the same name wait in first-come, first-served
    order and cost no thread while they wait. A task cancelled while waiting never
    leaves the lock held. Locks are not reentrant: a task that holds a name and asks
    for it again gets :class:`~aiotooz.LockAcquireFailed` instead of waiting forever.

    Args:
        name: the lock name, any non-empty ``str``; with ``data``, a format string.
        data: values for the ``{field}`` parts of ``name``.
        coordinator: the coordinator to lock through; the default one if ``None``.

    Raises:
        LockNameError: ``name`` is not a non-empty ``str`` or a field is missing.
    """

    __slots__ = ("_coordinator", "_hold", "name")

    def __init__(
        self,
        name: str,
        data: Mapping[str, Any] | None = None,
        *,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.name: str = check_name(name) if data is None else format_name(name, data)
        self._coordinator = coordinator
        self._hold: Hold | None = None

    def __repr__(self) -> str:
        state = "locked" if self.locked() else "unlocked"
        return f"<aiotooz.Lock {self.name!r} {state}>"

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator this lock acquires through (the default one if none given)."""
        return self._coordinator if self._coordinator is not None else get_default_coordinator()

    def locked(self) -> bool:
        """This lock object holds its name now."""
        return self._hold is not None

    async def acquire(self, blocking: Blocking = True) -> bool:
        """Take the lock.

        Args:
            blocking: ``True`` waits as long as it takes; ``False`` tries once; a
                number waits at most that many seconds, on every backend.

        Returns:
            Whether the lock is now held.

        Raises:
            ConfigurationError: ``blocking`` is not a bool or a number >= 0.
            LockCreationFailed: there is no started coordinator to lock through.
            LockAcquireFailed: this task already holds this name (not reentrant).
            BackendUnavailable: the backend failed; with ``blocking=False``, also while
                the coordinator is reconnecting.
        """
        deadline = deadline_for(blocking)
        hold = await self.coordinator._acquire(self.name, deadline)
        if hold is None:
            return False
        self._hold = hold
        return True

    async def release(self) -> None:
        """Release the lock and let the next waiter have it.

        A lock that the coordinator already released (because it stopped) is released
        silently. If the backend cannot be told, the lock is still given up locally and
        a warning is logged: the backend frees it when its TTL or session ends.

        Raises:
            LockNotHeld: this lock object does not hold the lock.
        """
        hold, self._hold = self._hold, None
        if hold is None:
            raise LockNotHeld(f"lock {self.name!r} is not held, so it cannot be released")
        await hold.coordinator._release(hold)

    def __call__(self, blocking: Blocking = True) -> _LockContext:
        """``async with lock(blocking=2.5):`` takes the lock with that budget or raises."""
        deadline_for(blocking)  # refuse a bad value here, before any `async with`
        return _LockContext(self, blocking)

    async def __aenter__(self) -> Lock:
        await _acquire_or_raise(self, True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


@final
class _LockContext:
    __slots__ = ("_blocking", "_lock")

    def __init__(self, lock: Lock, blocking: Blocking) -> None:
        self._lock = lock
        self._blocking = blocking

    async def __aenter__(self) -> Lock:
        await _acquire_or_raise(self._lock, self._blocking)
        return self._lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._lock.release()


async def _acquire_or_raise(lock: Lock, blocking: Blocking) -> None:
    if not await lock.acquire(blocking):
        budget = "at once" if blocking is False else f"within {blocking} s"
        raise LockAcquireFailed(f"lock {lock.name!r} was not acquired {budget}")
