"""The user-facing semaphore: at most ``limit`` holders of one name, across processes.

A semaphore of limit N is N *slot locks*: slot ``i`` is an ordinary backend lock on a
key reserved for it (`slot_key()`), which no lock name maps to.
Holding a slot is holding that lock through the lock table, so a slot has all a lock
has -- the lease rule, loss delivery, release on ``stop()`` -- on every backend.

Tasks of one process that want one semaphore wait in one local FIFO queue (per
coordinator and name, `SemaphoreQueue`); only the task at its
head tries the backend: every slot once per *round*, from a random one so that
processes do not all crowd slot 0, skipping slots held here. Between rounds it waits
as a lock's waiter does (`Waits`): it watches every slot's key where the watch is kept
on the event loop (file, Redis on asyncio), so that a release in another process wakes
it, as does a local release; else it polls (2 ms, backing off to 50 ms). A probe (SQL,
ipc) would take each released slot for an instant, one per slot and waiting process.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, final

import anyio

from ._exceptions import (
    BackendUnavailable,
    ConfigurationError,
    LockAcquireFailed,
    LockNotHeld,
    UnsupportedOperation,
)
from ._held import budget, close_block, open_block, raise_if_lost
from ._lock import Blocking, BudgetContext, check_blocking, deadline_for
from ._locktable import TRY_ONCE, Hold, LockTable, Waits
from ._names import check_name, format_name, slot_key
from ._process import get_default_coordinator
from ._queue import SemaphoreQueue

if TYPE_CHECKING:  # the coordinator module is above this one
    from ._coordinator import Coordinator

__all__ = ["MAX_LIMIT", "Semaphore", "check_limit"]

#: The largest limit: a waiting round tries every slot, so a limit is meant to be small.
MAX_LIMIT: Final = 1000

#: The most slots a waiter watches (each watch costs a subscription or a file
#: descriptor): a waiter for a larger semaphore polls.
_WATCHED_SLOTS: Final = 64
#: How often a waiting process looks for a larger limit elsewhere (is slot ``limit``
#: held?), and how long after a first sighting it looks again to be sure: a process
#: with the same limit may hold that slot for the instant of its own look.
_PROBE_EVERY: Final = 1.0
_PROBE_CONFIRM: Final = 0.1


def check_limit(limit: object) -> int:
    """Return ``limit`` if it is an ``int`` from 1 to `MAX_LIMIT`, else raise.

    Raises:
        ConfigurationError: ``limit`` is not such an int.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigurationError(
            f"a semaphore's limit (how many may hold it at once) must be an int from 1 to "
            f"{MAX_LIMIT}, not {limit!r}"
        )
    return limit


@final
@dataclass(eq=False)
class _Slot:
    """One slot held by one task through one semaphore object."""

    index: int
    hold: Hold
    table: LockTable
    state: SemaphoreQueue
    #: Taken by an ``async with`` block (released by its exit, never by ``release()``).
    entered: bool = False
    scope: anyio.CancelScope | None = None


def _current_task() -> int:
    return anyio.get_current_task().id


@final
class Semaphore:
    """A distributed semaphore: at most ``limit`` holders of ``name`` at once, anywhere.

    Used like [`Lock`][aiotooz.Lock], and shared by the tasks that use it:

        api = Semaphore("partner-api", 3, coordinator=coordinator)
        async with api:            # or: async with api(blocking=2.5):
            await call_partner()

    Every process must use the same ``limit`` for a name (see docs/semaphores.md for
    what happens if not). Tasks of one process wait in first-come, first-served order
    and cost no thread. A task may hold several slots; `release()` releases the
    latest slot the current task took with `acquire()`, and an ``async with`` block
    releases the slot it took.

    A held slot can be lost like a lock (expired, taken over, connection failed,
    coordinator stopped): the ``async with`` body is then cancelled and
    [`LockLost`][aiotooz.LockLost] raised out of the block, unless ``cancel_on_loss=False``.

    Args:
        name: the semaphore's name, any non-empty ``str``; with ``data``, a format string.
        limit: how many may hold it at once, an ``int`` from 1 to 1000.
        data: values for the ``{field}`` parts of ``name``.
        coordinator: the coordinator to hold slots through; the default one if ``None``.
        cancel_on_loss: whether losing a slot cancels the ``async with`` body.

    Raises:
        LockNameError: ``name`` is not a non-empty ``str`` or a field is missing.
        ConfigurationError: ``limit`` is not an int from 1 to 1000.
    """

    __slots__ = ("_cancel_on_loss", "_coordinator", "_held", "limit", "name")

    def __init__(
        self,
        name: str,
        limit: int,
        data: Mapping[str, Any] | None = None,
        *,
        coordinator: Coordinator | None = None,
        cancel_on_loss: bool = True,
    ) -> None:
        self.name: str = check_name(name) if data is None else format_name(name, data)
        self.limit: int = check_limit(limit)
        self._coordinator = coordinator
        self._cancel_on_loss = cancel_on_loss
        #: The slots held through this object, by task id, oldest first.
        self._held: dict[int, list[_Slot]] = {}

    def __repr__(self) -> str:
        held = sum(len(slots) for slots in self._held.values())
        return f"<aiotooz.Semaphore {self.name!r} limit={self.limit} held={held}>"

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator this semaphore acquires through (the default one if none given)."""
        return self._coordinator if self._coordinator is not None else get_default_coordinator()

    @property
    def held(self) -> int:
        """How many slots the current task holds through this object."""
        return len(self._held.get(_current_task(), ()))

    def _latest(self) -> _Slot:
        slots = self._held.get(_current_task())
        if not slots:
            raise LockNotHeld(f"this task holds no slot of semaphore {self.name!r}")
        return slots[-1]

    @property
    def slot(self) -> int:
        """The index (0 to ``limit - 1``) of the latest slot the current task holds.

        Raises:
            LockNotHeld: the current task holds no slot through this object.
        """
        return self._latest().index

    @property
    def lost(self) -> bool:
        """The latest slot the current task holds was known lost (``False`` if it holds none).

        Reading it changes nothing; [`check_lost()`][aiotooz.Semaphore.check_lost] also
        applies the lease rule on the spot.
        """
        slots = self._held.get(_current_task())
        return slots[-1].hold.lost if slots else False

    def check_lost(self) -> bool:
        """Apply the lease rule to the current task's latest slot now; whether it is lost.

        ``False`` if the task holds none; see [`Lock.check_lost()`][aiotooz.Lock.check_lost].
        """
        slots = self._held.get(_current_task())
        if not slots:
            return False
        slot = slots[-1]
        return slot.table.check_lease(slot.hold, anyio.current_time())

    @property
    def lost_reason(self) -> str | None:
        """Why the latest slot the current task holds was lost, or ``None``."""
        slots = self._held.get(_current_task())
        return slots[-1].hold.lost_reason if slots else None

    async def wait_lost(self) -> None:
        """Wait until the current task's latest slot is lost, or released.

        Raises:
            LockNotHeld: the current task holds no slot through this object.
        """
        slot = self._latest()
        slot.table.check_loop()
        await slot.table.wait_ended(slot.hold)

    async def acquire(self, blocking: Blocking = True) -> bool:
        """Take a slot for the current task.

        Args:
            blocking: ``True`` waits as long as it takes; ``False`` tries once; a
                number waits at most that many seconds.

        Returns:
            Whether a slot is now held.

        Raises:
            ConfigurationError: ``blocking`` is not a bool or a number >= 0; or this
                process uses the name with another limit, or a waiting acquire found a
                process that uses a larger one.
            LockCreationFailed: there is no started coordinator to acquire through.
            BackendUnavailable: the backend failed; with ``blocking=False``, also while
                the coordinator is reconnecting.
            WrongEventLoop: the coordinator was started in another event loop, or
                before this process was forked.
        """
        deadline = deadline_for(blocking)
        table = self.coordinator._lock_table
        taken = await _take(table, self.name, self.limit, deadline)
        if taken is None:
            return False
        index, hold, state = taken
        self._held.setdefault(_current_task(), []).append(_Slot(index, hold, table, state))
        return True

    async def release(self) -> None:
        """Release a slot taken with `acquire()` through this object.

        The latest one the current task took; if it took none, the oldest one another
        task took (as `Semaphore` lets any task release). A lost slot is
        released without error; if the backend cannot be told, the slot is given up
        locally and a warning logged, as for a lock.

        Raises:
            LockNotHeld: no slot taken with `acquire()` is held through this object
                (an ``async with`` block releases its own slot).
        """
        current = _current_task()
        for slot in reversed(self._held.get(current, [])):
            if not slot.entered:
                await self._release(current, slot)
                return
        for task, slots in self._held.items():
            for slot in slots:
                if not slot.entered:
                    await self._release(task, slot)
                    return
        raise LockNotHeld(
            f"no slot of semaphore {self.name!r} taken with acquire() is held through this "
            "object (an 'async with' block releases its own slot)"
        )

    async def _release(self, task: int, slot: _Slot) -> None:
        slot.table.check_loop()  # before anything changes
        slots = self._held[task]
        slots.remove(slot)
        if not slots:
            del self._held[task]
        state, table = slot.state, slot.table
        try:
            await table.release(slot.hold)
        finally:
            state.holders -= 1
            state.released()
            if state.idle and table.semaphores.get(self.name) is state:
                del table.semaphores[self.name]

    def __call__(self, blocking: Blocking = True) -> BudgetContext[Semaphore]:
        """``async with semaphore(blocking=2.5):`` takes a slot with that budget or raises."""
        check_blocking(blocking)  # refuse a bad value here, before any `async with`
        return BudgetContext(self, _enter, blocking)

    async def __aenter__(self) -> Semaphore:
        await _enter(self, True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _exit(self, exc_type, exc, tb)


async def _enter(semaphore: Semaphore, blocking: Blocking) -> None:
    """Take a slot for an ``async with`` block; open the scope that loss will cancel."""
    if not await semaphore.acquire(blocking):
        raise LockAcquireFailed(
            f"no slot of semaphore {semaphore.name!r} (limit {semaphore.limit}) was "
            f"acquired {budget(blocking)}"
        )
    slot = semaphore._held[_current_task()][-1]
    slot.entered = True
    slot.scope = open_block(slot.hold, semaphore._cancel_on_loss)


async def _exit(
    semaphore: Semaphore,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Release the block's slot; turn its loss into `LockLost`."""
    task = _current_task()
    slot = next(slot for slot in reversed(semaphore._held[task]) if slot.entered)
    scope, slot.scope = slot.scope, None
    exc, _ = close_block(scope, exc_type, exc, tb)
    # As for a lock: the lease rule at the exit (a body that blocked the event loop past
    # the lease and ended without an await), and a "not ours" answer of the release,
    # are losses too; found now, they are recorded, never a cancellation.
    slot.hold.on_lost = None
    slot.table.check_lease(slot.hold, anyio.current_time())
    await semaphore._release(task, slot)
    what = f"semaphore {semaphore.name!r} lost slot {slot.index}"
    raise_if_lost(semaphore.name, slot.hold.lost_reason, semaphore._cancel_on_loss, exc, what)


# -- taking a slot ------------------------------------------------------------------------


def _slot_name(name: str, index: int) -> str:
    """How a slot is named in logs, telemetry and ``statistics().held_names``."""
    return f"{name} (slot {index})"


async def _take(
    table: LockTable, name: str, limit: int, deadline: float
) -> tuple[int, Hold, SemaphoreQueue] | None:
    """Wait for the head of the local queue, then for a slot, until ``deadline``."""
    table.check_loop()
    state = table.semaphores.get(name)
    if state is None:
        state = table.semaphores[name] = SemaphoreQueue(limit)
    elif state.limit != limit:
        raise ConfigurationError(
            f"semaphore {name!r} is used in this process with limit {state.limit} and "
            f"with limit {limit}: every user of a semaphore must give the same limit"
        )
    try:
        if not await state.queue.take(table.task_id(), deadline):
            return None
        try:
            taken = await _rounds(table, state, name, limit, deadline)
        finally:
            state.queue.give_back()  # the next local waiter tries the other slots
        if taken is None:
            return None
        return (*taken, state)
    finally:
        if state.idle and table.semaphores.get(name) is state:
            del table.semaphores[name]


async def _rounds(
    table: LockTable, state: SemaphoreQueue, name: str, limit: int, deadline: float
) -> tuple[int, Hold] | None:
    """As the head of the local queue: try every slot, wait, again, until ``deadline``.

    Watch, try, wait, as a lock's waiter (`Waits`): the slots' keys are watched after
    the first round fails, and the round is tried again before the first wait.
    """
    waits = Waits()
    # Set before the first round, so a local release during a round is not missed.
    state.wake = waits.signal.fire
    keys = [slot_key(table.prefix, name, i) for i in range(limit if limit <= _WATCHED_SLOTS else 0)]
    suspect_since: float | None = None  # when slot `limit` was first seen held
    try:
        while True:
            try:
                start, waits.woken = waits.woken, None
                taken = await _round(table, state, name, limit, deadline, start)
                if taken is not None:
                    return taken
                now = anyio.current_time()
                if deadline - now <= 0:
                    return None
                state.queue.owner_waits = True  # for statistics(): it waits for a slot
                suspect_since = await _check_limit(
                    table, state, name, limit, deadline, now, suspect_since
                )
                if await table.watch(waits, keys, armed=False):
                    continue  # watching now: try again before waiting
            except BackendUnavailable:
                if deadline == TRY_ONCE:
                    raise
                # A patient waiter rides out a failing backend, as a lock's waiter does.
                table.backend_failed()
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            await waits.wait(remaining)
    finally:
        state.wake = None
        await waits.close()


async def _check_limit(
    table: LockTable,
    state: SemaphoreQueue,
    name: str,
    limit: int,
    deadline: float,
    now: float,
    suspect_since: float | None,
) -> float | None:
    """Look for a larger limit elsewhere when due; when it was first seen (or ``None``).

    Raises:
        ConfigurationError: seen twice, ``_PROBE_CONFIRM`` apart.
    """
    due = now - state.probed_at >= _PROBE_EVERY
    if suspect_since is not None:
        due = now - suspect_since >= _PROBE_CONFIRM
    if not due:
        return suspect_since
    state.probed_at = now
    if not await _larger_limit_elsewhere(table, name, limit, deadline):
        return None
    if suspect_since is None:
        return now
    raise ConfigurationError(
        f"semaphore {name!r}: another process uses it with a limit larger "
        f"than this one's {limit} (it holds slot {limit}), so more than "
        f"{limit} may hold it at once; give every process the same limit"
    )


async def _round(
    table: LockTable,
    state: SemaphoreQueue,
    name: str,
    limit: int,
    deadline: float,
    start: int | None = None,
) -> tuple[int, Hold] | None:
    """Try every slot once; the first granted, or ``None``.

    From ``start`` (the slot whose release woke the waiter), else from a random one.

    Each try is given up at ``deadline`` (a hung backend), as a lock's try is, and a
    round whose deadline passed tries no further slot (``TRY_ONCE`` tries them all).
    """
    if start is None:
        start = random.randrange(limit)
    unsupported: UnsupportedOperation | None = None
    tried = False
    for offset in range(limit):
        if offset and deadline != TRY_ONCE and anyio.current_time() >= deadline:
            break
        index = (start + offset) % limit
        key = slot_key(table.prefix, name, index)
        if table.owned_here(key):
            tried = True
            continue  # held by a task here: no need to ask the backend
        try:
            hold = await table.acquire(_slot_name(name, index), deadline, key=key, once=True)
        except UnsupportedOperation as exc:
            # PostgreSQL: two slots on one of its 65,536 advisory locks, one held here.
            unsupported = unsupported or exc
            continue
        tried = True
        if hold is not None:
            state.holders += 1
            return index, hold
    if not tried and unsupported is not None:
        raise unsupported  # no slot can be locked at all (a MySQL key too long)
    return None


async def _larger_limit_elsewhere(table: LockTable, name: str, limit: int, deadline: float) -> bool:
    """Whether slot ``limit`` -- one past ours -- is held: someone uses a larger limit.

    Not asked where keys share backend locks (PostgreSQL): there an unrelated lock held
    on the slot's advisory lock would pass for it, and fail every waiting acquire.
    """
    if not table.keys_distinct:
        return False  # cannot tell
    key = slot_key(table.prefix, name, limit)
    try:
        hold = await table.acquire(_slot_name(name, limit), deadline, key=key, once=True)
    except UnsupportedOperation:
        return False  # cannot tell
    if hold is None:
        # A try given up at the deadline (a hung backend) says nothing either.
        return anyio.current_time() < deadline
    await table.release(hold)
    return False
