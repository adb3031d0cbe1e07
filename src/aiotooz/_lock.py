"""The user-facing lock: a name, a coordinator (or the default), async acquire/release."""

from __future__ import annotations

import contextvars
import math
import warnings
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, final

import anyio

from ._exceptions import ConfigurationError, LockAcquireFailed, LockNotHeld
from ._held import budget, close_block, open_block, raise_if_lost
from ._locktable import FOREVER, TRY_ONCE, Hold, LockTable
from ._names import check_name, format_name
from ._process import get_default_coordinator

if TYPE_CHECKING:  # the coordinator module imports this one, never the reverse
    from ._connection import LockHandle
    from ._coordinator import Coordinator

__all__ = [
    "Blocking",
    "BudgetContext",
    "Fenced",
    "Lock",
    "check_blocking",
    "deadline_for",
    "enter_fenced",
    "exit_fenced",
    "fencing_token",
    "held_handle",
]

#: ``True`` waits as long as it takes, ``False`` tries once, a number of seconds waits
#: at most that long.
Blocking = bool | float

_Guarded = TypeVar("_Guarded", bound=AbstractAsyncContextManager[Any])


@final
class BudgetContext(Generic[_Guarded]):
    """``async with lock(blocking=2.5):``: a lock (or semaphore) entered with a budget.

    Entering takes it as ``enter(target, blocking)`` does (or raises); leaving is the
    target's own ``__aexit__``.
    """

    __slots__ = ("_blocking", "_enter", "_target")

    def __init__(
        self,
        target: _Guarded,
        enter: Callable[[_Guarded, Blocking], Awaitable[None]],
        blocking: Blocking,
    ) -> None:
        self._target = target
        self._enter = enter
        self._blocking = blocking

    async def __aenter__(self) -> _Guarded:
        await self._enter(self._target, self._blocking)
        return self._target

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._target.__aexit__(exc_type, exc, tb)


def check_blocking(blocking: object) -> float | bool:
    """Return ``blocking`` if it is valid: a bool, or a number of seconds >= 0.

    Needs no event loop, so decorators can check it at import time.

    Raises:
        ConfigurationError: ``blocking`` is not a bool or a non-negative number (that
            a float can hold).
    """
    if isinstance(blocking, bool):
        return blocking
    if isinstance(blocking, int | float):
        try:
            seconds = float(blocking)
        except OverflowError:  # an int too large for a float (10**400)
            seconds = math.nan
        if seconds >= 0:  # NaN fails too
            return seconds
    raise ConfigurationError(
        "blocking must be True (wait as long as it takes), False (try once) or a "
        f"number of seconds >= 0 to wait at most, not {blocking!r}"
    )


def deadline_for(blocking: object) -> float:
    """Turn a ``blocking`` argument into an ``anyio.current_time()`` deadline.

    ``FOREVER`` (``math.inf``) waits as long as it takes; ``TRY_ONCE`` tries once.

    Raises:
        ConfigurationError: ``blocking`` is not a bool or a non-negative number.
    """
    checked = check_blocking(blocking)
    if checked is True:
        return FOREVER
    if checked is False:
        return TRY_ONCE
    return FOREVER if math.isinf(checked) else anyio.current_time() + checked


class Fenced(Protocol):
    """A fenced hold in an ``async with`` block: a `Lock`, or an `RWLock`'s write block."""

    @property
    def name(self) -> str: ...

    def locked(self) -> bool: ...

    @property
    def fencing_token(self) -> int: ...


#: The fenced locks the current task holds in ``async with`` blocks, innermost last.
_FENCED: contextvars.ContextVar[tuple[Fenced, ...]] = contextvars.ContextVar(
    "aiotooz_fenced", default=()
)


def enter_fenced(holder: Fenced) -> contextvars.Token[tuple[Fenced, ...]]:
    """``holder`` is the current task's innermost fenced lock (`fencing_token()`)."""
    return _FENCED.set((*_FENCED.get(), holder))


def exit_fenced(entered: contextvars.Token[tuple[Fenced, ...]]) -> None:
    """Undo :func:`enter_fenced`, as the block ends."""
    _FENCED.reset(entered)


def fencing_token(name: str | None = None) -> int:
    """The fencing token of the innermost fenced lock this task holds (or of ``name``).

    For code running inside ``async with Lock(..., fencing=True):``, a function
    decorated with ``@synchronized(..., fencing=True)``, or the write block of an
    ``RWLock(..., fencing=True)``, which has no lock object at hand.

    Raises:
        LockNotHeld: this task holds no such lock in an ``async with`` block.
    """
    for lock in reversed(_FENCED.get()):
        if (name is None or lock.name == name) and lock.locked():
            return lock.fencing_token
    which = "no fenced lock" if name is None else f"no fenced lock named {name!r}"
    raise LockNotHeld(
        f"this task holds {which} in an 'async with' block or @synchronized function; "
        "use Lock(..., fencing=True), @synchronized(..., fencing=True) or the write "
        "block of RWLock(..., fencing=True)"
    )


def held_handle(lock: Lock) -> LockHandle:
    """The backend lock ``lock`` holds (package-internal: leadership publishes on it).

    Raises:
        LockNotHeld: the lock is not held.
    """
    hold = lock._hold
    if hold is None:
        raise LockNotHeld(f"lock {lock.name!r} is not held")
    return hold.handle


@final
class Lock:
    """A distributed lock, named by a format string, held through a coordinator.

    When ``data`` is given, the name is built once, here, with ``name.format_map(data)``;
    without it the name is taken literally (any ``str`` is a valid name):

        Lock("share-{share.id}", {"share": share}, coordinator=coordinator)

    Without ``coordinator`` the lock uses the default coordinator (see
    [`set_default_coordinator()`][aiotooz.set_default_coordinator]), looked up each time it
    is acquired.

    Tasks of one process that want the same name wait in first-come, first-served
    order and cost no thread while they wait. A task cancelled while waiting never
    leaves the lock held. Locks are not reentrant: a task that holds a name and asks
    for it again gets [`LockAcquireFailed`][aiotooz.LockAcquireFailed] instead of waiting
    forever.

    A held lock can be *lost*: it expired, the backend gave it to another owner, the
    connection failed, or the coordinator stopped. Inside ``async with lock:`` the body
    is then cancelled and [`LockLost`][aiotooz.LockLost] raised out of the block, unless
    ``cancel_on_loss=False`` (the body keeps running; [`lost`][aiotooz.Lock.lost] turns
    true and a warning is logged). [`wait_lost()`][aiotooz.Lock.wait_lost] lets a task
    watch for it.

    A lock object garbage-collected while held is released by its coordinator, with a
    ``ResourceWarning``, as Python closes a file left open.

    Args:
        name: the lock name, any non-empty ``str``; with ``data``, a format string.
        data: values for the ``{field}`` parts of ``name``.
        coordinator: the coordinator to lock through; the default one if ``None``.
        cancel_on_loss: whether losing the lock cancels the ``async with`` body.
        fencing: take a fencing token with every grant
            ([`fencing_token`][aiotooz.Lock.fencing_token]): one more call to the backend
            per acquire.

    Raises:
        LockNameError: ``name`` is not a non-empty ``str`` or a field is missing.
    """

    __slots__ = (
        "_cancel_on_loss",
        "_context",
        "_coordinator",
        "_fencing",
        "_hold",
        "_lost_reason",
        "_scope",
        "_table",
        "name",
    )

    def __init__(
        self,
        name: str,
        data: Mapping[str, Any] | None = None,
        *,
        coordinator: Coordinator | None = None,
        cancel_on_loss: bool = True,
        fencing: bool = False,
    ) -> None:
        self.name: str = check_name(name) if data is None else format_name(name, data)
        self._coordinator = coordinator
        self._cancel_on_loss = cancel_on_loss
        self._fencing = fencing
        #: Undoes this lock's entry in the task's stack of fenced locks (``async with``).
        self._context: contextvars.Token[tuple[Fenced, ...]] | None = None
        self._hold: Hold | None = None
        #: The lock table of the coordinator that granted ``_hold``.
        self._table: LockTable | None = None
        self._lost_reason: str | None = None
        self._scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        # The loss already known, without the lease rule: a repr needs no event loop (it
        # is shown from finalizers, debuggers and reports outside one).
        hold = self._hold
        lost = hold.lost if hold is not None else self._lost_reason is not None
        state = "lost" if lost else "locked" if self.locked() else "unlocked"
        return f"<aiotooz.Lock {self.name!r} {state}>"

    def __del__(self) -> None:
        # As Python closes a file left open: a lock dropped while held would otherwise
        # stay held (and refreshed) until its coordinator stops.
        # getattr: a bad name fails __init__ before the slots are set.
        hold, table = getattr(self, "_hold", None), getattr(self, "_table", None)
        if hold is None or table is None or hold.released:
            return
        warnings.warn(
            f"aiotooz.Lock {self.name!r} was garbage-collected while held; its coordinator "
            "releases it. Release locks you acquire (or use 'async with lock:')",
            ResourceWarning,
            stacklevel=1,
        )
        table.release_dropped(hold)

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator this lock acquires through (the default one if none given)."""
        return self._coordinator if self._coordinator is not None else get_default_coordinator()

    def locked(self) -> bool:
        """This lock object holds its name now (even if it has been lost since)."""
        return self._hold is not None

    @property
    def lost(self) -> bool:
        """The lock was known lost while held (this acquisition, or the last one if released).

        Reading it changes nothing; [`check_lost()`][aiotooz.Lock.check_lost] also
        applies the lease rule on the spot.
        """
        hold = self._hold
        return hold.lost if hold is not None else self._lost_reason is not None

    def check_lost(self) -> bool:
        """Apply the lease rule now, then say whether the lock is lost.

        For a holder about to make a critical write: a lock whose last refresh is older
        than the lease allows is declared lost here (its holder told, the body cancelled
        unless ``cancel_on_loss=False``), even if the watchdog has not run yet, as after
        a blocked event loop. A check and a write are never atomic: send the fencing
        token too.
        """
        hold, table = self._hold, self._table
        if hold is None or table is None:
            return self._lost_reason is not None
        return table.check_lease(hold, anyio.current_time())

    @property
    def fencing_token(self) -> int:
        """The fencing token of this grant: larger than every earlier grant's of this name.

        Send it with every write to the resource the lock protects, and have the resource
        refuse writes with a token smaller than one it has seen (see the README's
        Fencing section).

        Raises:
            LockNotHeld: the lock is not held.
            ConfigurationError: the lock was not made with ``fencing=True``.
        """
        hold = self._hold
        if hold is None:
            raise LockNotHeld(f"lock {self.name!r} is not held, so it has no fencing token")
        if hold.fencing_token is None:
            raise ConfigurationError(
                f"lock {self.name!r} has no fencing token: make it with Lock(..., "
                "fencing=True) (or @synchronized(..., fencing=True))"
            )
        return hold.fencing_token

    @property
    def lost_reason(self) -> str | None:
        """Why the lock was lost, or ``None``."""
        return self._hold.lost_reason if self._hold is not None else self._lost_reason

    async def wait_lost(self) -> None:
        """Wait until the held lock is lost, or released (then `lost` is false).

        Raises:
            LockNotHeld: this lock object does not hold the lock.
        """
        hold, table = self._hold, self._table
        if hold is None or table is None:
            raise LockNotHeld(f"lock {self.name!r} is not held, so it cannot be lost")
        table.check_loop()
        await table.wait_ended(hold)

    async def acquire(self, blocking: Blocking = True) -> bool:
        """Take the lock.

        Args:
            blocking: ``True`` waits as long as it takes; ``False`` tries once; a
                number waits at most that many seconds, on every backend.

        Returns:
            Whether the lock is now held.

        Raises:
            ConfigurationError: ``blocking`` is not a bool or a number >= 0; or, with
                ``fencing``, the file or ipc backend's counter file is corrupt (the
                error names it; the lock is not left held).
            LockCreationFailed: there is no started coordinator to lock through.
            LockAcquireFailed: this task already holds this name (not reentrant).
            BackendUnavailable: the backend failed; with ``blocking=False``, also while
                the coordinator is reconnecting.
            WrongEventLoop: the coordinator was started in another event loop, or
                before this process was forked.
        """
        deadline = deadline_for(blocking)
        table = self.coordinator._lock_table
        hold = await table.acquire(self.name, deadline, self._fencing)
        if hold is None:
            return False
        self._hold, self._table = hold, table
        self._lost_reason = None
        return True

    async def release(self) -> None:
        """Release the lock and let the next waiter have it.

        A lock that was lost (or that the coordinator released when it stopped) is
        released without error. If the backend cannot be told, the lock is still given
        up locally and a warning is logged: the backend frees it when its TTL or
        session ends.

        A lock found lost as it is released -- by the lease rule (the event loop was
        blocked past the lease), or because the backend answers that it is no longer
        ours -- leaves [`lost`][aiotooz.Lock.lost] true, with its reason.

        Raises:
            LockNotHeld: this lock object does not hold the lock.
            WrongEventLoop: its coordinator was started in another event loop (the lock
                stays held).
        """
        if self._table is not None:
            self._table.check_loop()  # before anything changes
        hold, self._hold = self._hold, None
        table, self._table = self._table, None
        if hold is None or table is None:
            raise LockNotHeld(f"lock {self.name!r} is not held, so it cannot be released")
        # Released now: a loss found from here on is recorded, never a cancellation.
        hold.on_lost = None
        # The lease rule, as at any read of `lost`: a body that blocked the event loop
        # past the lease, then ended without an await, lost the lock while it ran.
        table.check_lease(hold, anyio.current_time())
        try:
            await table.release(hold)
        finally:
            self._lost_reason = hold.lost_reason

    def __call__(self, blocking: Blocking = True) -> BudgetContext[Lock]:
        """``async with lock(blocking=2.5):`` takes the lock with that budget or raises."""
        check_blocking(blocking)  # refuse a bad value here, before any `async with`
        return BudgetContext(self, _enter, blocking)

    async def __aenter__(self) -> Lock:
        await _enter(self, True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _exit(self, exc_type, exc, tb)


async def _acquire_or_raise(lock: Lock, blocking: Blocking) -> None:
    if not await lock.acquire(blocking):
        raise LockAcquireFailed(f"lock {lock.name!r} was not acquired {budget(blocking)}")


async def _enter(lock: Lock, blocking: Blocking) -> None:
    """Acquire for an ``async with`` block; open the scope that loss will cancel."""
    await _acquire_or_raise(lock, blocking)
    hold = lock._hold
    assert hold is not None
    if lock._fencing:
        lock._context = enter_fenced(lock)
    lock._scope = open_block(hold, lock._cancel_on_loss)


async def _exit(
    lock: Lock,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Release after an ``async with`` block; turn a loss into [`LockLost`][aiotooz.LockLost].

    A loss found by the release itself (the lease rule, or the backend's "not ours")
    counts too. A lock the body released itself is not released again: the exit is
    quiet, unless a loss cancelled the body first.
    """
    context, lock._context = lock._context, None
    if context is not None:
        exit_fenced(context)
    scope, lock._scope = lock._scope, None
    exc, cut_short = close_block(scope, exc_type, exc, tb)
    if lock._hold is None:
        # Released inside the block: nothing to release, and no error to put in place
        # of the body's own; but a body the loss cut short must not pass as finished.
        reason = lock._lost_reason if cut_short else None
    else:
        await lock.release()
        reason = lock._lost_reason
    raise_if_lost(lock.name, reason, lock._cancel_on_loss, exc, f"lock {lock.name!r} was lost")
