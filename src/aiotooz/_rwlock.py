"""The user-facing read-write lock: any number of readers, or one writer, across processes.

A reader locks a key of its own of the lock's family (`rw_key()`), a writer the
family's writer key; the driver takes such keys shared or exclusive, writer-preferring
(``Capability.SHARES_LOCKS``). Each is an ordinary hold of the lock table, so it has
all a lock has: waiting without threads, wake-ups, the lease rule, loss delivery,
release on ``stop()``, fencing tokens (writers only).

Inside one process the same rules hold locally (`RWQueue`): a writer that waits or
holds keeps new readers of this process back; a writer goes to the backend once no
reader of this process holds or tries; writers line up in the writer key's FIFO queue.
A task that reads and asks to write (or the reverse) is refused at once: it would wait
for itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, final

import anyio

from ._connection import rw_unsupported
from ._exceptions import ConfigurationError, LockAcquireFailed, LockNotHeld, UnsupportedOperation
from ._held import budget, close_block, open_block, raise_if_lost
from ._lock import Blocking, Fenced, check_blocking, deadline_for, enter_fenced, exit_fenced
from ._locktable import Hold, LockTable
from ._names import check_name, format_name, rw_key
from ._process import get_default_coordinator
from ._queue import RWQueue

if TYPE_CHECKING:  # the coordinator module is above this one
    from ._coordinator import Coordinator

__all__ = ["RWLock"]

Role = Literal["read", "write"]


@final
@dataclass(eq=False)
class _Held:
    """One read or write hold of one task through one `RWLock` object."""

    write: bool
    hold: Hold
    table: LockTable
    state: RWQueue
    task: int
    #: Taken by an ``async with`` block (released by its exit, never by ``release()``).
    entered: bool = False

    @property
    def role(self) -> Role:
        return "write" if self.write else "read"


def _current_task() -> int:
    return anyio.get_current_task().id


@final
class RWLock:
    """A distributed read-write lock: many readers at once, or one writer alone, anywhere.

        config = RWLock("config", coordinator=coordinator, fencing=True)
        async with config.read():                  # shared with other readers
            settings = await load()
        async with config.write(blocking=2.5):     # alone; LockAcquireFailed after 2.5 s
            await store(new_settings, fencing_token())

    **Writer-preferring**: a writer waiting anywhere holds back readers that come
    after it, so a stream of readers never starves it. **No upgrade**: a task that
    holds the read lock and asks for the write lock (or the reverse) gets
    [`LockAcquireFailed`][aiotooz.LockAcquireFailed] at once, not a deadlock: release
    the read lock first. Writers may be fenced (``fencing=True``: every write grant gets a
    token larger than every earlier writer's, [`fencing_token()`][aiotooz.fencing_token]
    inside the write block); readers are not.

    A held read or write can be lost like a lock (expired, taken over, connection
    failed, coordinator stopped): the ``async with`` body is then cancelled and
    [`LockLost`][aiotooz.LockLost] raised out of the block, unless
    ``cancel_on_loss=False``.

    Backends: file, Redis, PostgreSQL, ZooKeeper, etcd (docs/rwlock.md says how on
    each); memcached, MySQL and ipc raise
    [`UnsupportedOperation`][aiotooz.UnsupportedOperation] naming those that can.

    Args:
        name: the lock's name, any non-empty ``str``; with ``data``, a format string.
        data: values for the ``{field}`` parts of ``name``.
        coordinator: the coordinator to lock through; the default one if ``None``.
        cancel_on_loss: whether losing the lock cancels the ``async with`` body.
        fencing: take a fencing token with every write grant (one more call to the
            backend per write).

    Raises:
        LockNameError: ``name`` is not a non-empty ``str`` or a field is missing.
    """

    __slots__ = ("_cancel_on_loss", "_coordinator", "_fencing", "_held", "name")

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
        #: The holds taken through this object, by task id, oldest first.
        self._held: dict[int, list[_Held]] = {}

    def __del__(self) -> None:
        # As a Lock: a read-write lock dropped while held would stay held (and keep the
        # writers of this process out) until its coordinator stops.
        holds = [held for task in getattr(self, "_held", {}).values() for held in task]
        holds = [held for held in holds if not held.hold.released]
        if not holds:
            return
        warnings.warn(
            f"aiotooz.RWLock {self.name!r} was garbage-collected while held; its coordinator "
            "releases it. Release what you acquire (or use 'async with rw.read():')",
            ResourceWarning,
            stacklevel=1,
        )
        for held in holds:
            start = held.table.start_soon_threadsafe
            if start is not None:
                with contextlib.suppress(RuntimeError):  # the event loop is closed
                    start(_released_dropped(self.name, held))

    def __repr__(self) -> str:
        holds = [held for task in self._held.values() for held in task]
        readers = sum(not held.write for held in holds)
        state = "writing" if len(holds) > readers else f"readers={readers}"
        return f"<aiotooz.RWLock {self.name!r} {state}>"

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator this lock acquires through (the default one if none given)."""
        return self._coordinator if self._coordinator is not None else get_default_coordinator()

    def _latest(self) -> _Held | None:
        held = self._held.get(_current_task())
        return held[-1] if held else None

    @property
    def held(self) -> Role | None:
        """What the current task holds through this object (its latest hold), or ``None``."""
        latest = self._latest()
        return None if latest is None else latest.role

    @property
    def lost(self) -> bool:
        """The current task's latest hold was known lost (``False`` if it holds none).

        Reading it changes nothing; [`check_lost()`][aiotooz.RWLock.check_lost] also
        applies the lease rule on the spot.
        """
        latest = self._latest()
        return latest is not None and latest.hold.lost

    def check_lost(self) -> bool:
        """Apply the lease rule to the current task's latest hold now; whether it is lost.

        ``False`` if the task holds none; see [`Lock.check_lost()`][aiotooz.Lock.check_lost].
        """
        latest = self._latest()
        return latest is not None and latest.table.check_lease(latest.hold, anyio.current_time())

    @property
    def lost_reason(self) -> str | None:
        """Why the current task's latest hold was lost, or ``None``."""
        latest = self._latest()
        return None if latest is None else latest.hold.lost_reason

    @property
    def fencing_token(self) -> int:
        """The fencing token of the current task's write grant.

        Raises:
            LockNotHeld: the current task does not hold the write lock.
            ConfigurationError: the lock was not made with ``fencing=True``.
        """
        latest = self._latest()
        if latest is None or not latest.write:
            raise LockNotHeld(f"this task does not hold the write lock of {self.name!r}")
        if latest.hold.fencing_token is None:
            raise ConfigurationError(
                f"read-write lock {self.name!r} has no fencing token: make it with "
                "RWLock(..., fencing=True)"
            )
        return latest.hold.fencing_token

    async def wait_lost(self) -> None:
        """Wait until the current task's latest hold is lost, or released.

        Raises:
            LockNotHeld: the current task holds nothing through this object.
        """
        latest = self._latest()
        if latest is None:
            raise LockNotHeld(f"this task holds no part of read-write lock {self.name!r}")
        latest.table.check_loop()
        await latest.table.wait_ended(latest.hold)

    # -- acquire and release ---------------------------------------------------------

    async def acquire_read(self, blocking: Blocking = True) -> bool:
        """Take the lock shared, for the current task.

        Args:
            blocking: ``True`` waits as long as it takes; ``False`` tries once; a
                number waits at most that many seconds.

        Returns:
            Whether it is now held.

        Raises:
            ConfigurationError: ``blocking`` is not a bool or a number >= 0.
            UnsupportedOperation: the backend has no read-write locks.
            LockAcquireFailed: this task holds the write lock, or the read lock already
                (it would wait for itself).
            LockCreationFailed: there is no started coordinator to lock through.
            BackendUnavailable: the backend failed; with ``blocking=False``, also while
                the coordinator is reconnecting.
            WrongEventLoop: the coordinator was started in another event loop.
        """
        return await self._acquire(False, blocking) is not None

    async def acquire_write(self, blocking: Blocking = True) -> bool:
        """Take the lock exclusive, for the current task.

        Args:
            blocking: as for `acquire_read`.

        Returns:
            Whether it is now held.

        Raises:
            LockAcquireFailed: this task holds the read lock (no upgrade: release it
                first) or the write lock (not reentrant).
            ConfigurationError: ``blocking`` is not a bool or a number >= 0.
            UnsupportedOperation: the backend has no read-write locks.
            LockCreationFailed: there is no started coordinator to lock through.
            BackendUnavailable: as for `acquire_read`.
            WrongEventLoop: the coordinator was started in another event loop.
        """
        return await self._acquire(True, blocking) is not None

    async def _acquire(self, write: bool, blocking: Blocking) -> _Held | None:
        deadline = deadline_for(blocking)
        table = self.coordinator._lock_table
        table.check_loop()
        if table.shares_locks is False:
            connection = table.connection
            assert connection is not None  # shares_locks is None without one
            raise UnsupportedOperation(rw_unsupported(connection.scheme))
        task = table.task_id()
        state = table.rwlocks.get(self.name)
        if state is None:
            state = table.rwlocks[self.name] = RWQueue()
        _refuse_self_wait(state, task, write, self.name)
        hold: Hold | None = None
        entered = False
        try:
            if write:
                # Counted from now: new readers of this process stay out. The writer goes
                # to the backend once no reader of this process holds or tries: one
                # backend session may hold every lock here, and it does not exclude itself.
                state.enter(task, True)
                entered = True
                if await state.wait_until(lambda: state.readers == 0, deadline):
                    key = rw_key(table.prefix, self.name, True)
                    hold = await table.acquire(self.name, deadline, self._fencing, key=key)
            elif await state.wait_until(lambda: state.writers == 0, deadline):
                state.enter(task, False)
                entered = True
                state.serial += 1
                key = rw_key(table.prefix, self.name, False, state.serial)
                hold = await table.acquire(self.name, deadline, key=key)
        finally:
            if hold is None:
                if entered:
                    state.leave(task, write)
                if state.idle and table.rwlocks.get(self.name) is state:
                    del table.rwlocks[self.name]
        if hold is None:
            return None
        held = _Held(write, hold, table, state, task)
        self._held.setdefault(task, []).append(held)
        return held

    async def release(self) -> None:
        """Release a hold taken with `acquire_read()` or `acquire_write()`.

        The latest one the current task took; if it took none, the oldest one another
        task took. A lost hold is released without error.

        Raises:
            LockNotHeld: nothing taken with ``acquire_*()`` is held through this object
                (an ``async with`` block releases its own).
        """
        current = _current_task()
        for held in reversed(self._held.get(current, [])):
            if not held.entered:
                await self._release(held)
                return
        for holds in self._held.values():
            for held in holds:
                if not held.entered:
                    await self._release(held)
                    return
        raise LockNotHeld(
            f"nothing of read-write lock {self.name!r} taken with acquire_read() or "
            "acquire_write() is held through this object (an 'async with' block releases "
            "its own)"
        )

    async def _release(self, held: _Held) -> None:
        held.table.check_loop()  # before anything changes
        holds = self._held[held.task]
        holds.remove(held)
        if not holds:
            del self._held[held.task]
        held.hold.on_lost = None
        # The lease rule, as for a lock: a body that blocked the loop past the lease.
        held.table.check_lease(held.hold, anyio.current_time())
        try:
            await held.table.release(held.hold)
        finally:
            state, table = held.state, held.table
            state.leave(held.task, held.write)
            if state.idle and table.rwlocks.get(self.name) is state:
                del table.rwlocks[self.name]

    # -- async with --------------------------------------------------------------------

    def read(self, blocking: Blocking = True) -> _Block:
        """``async with rw.read():`` holds the lock shared (``blocking`` as for `acquire_read`).

        Raises:
            ConfigurationError: ``blocking`` is not a bool or a number >= 0.
        """
        return _Block(self, False, check_blocking(blocking))

    def write(self, blocking: Blocking = True) -> _Block:
        """``async with rw.write(blocking=2.5):`` holds the lock alone, or raises.

        Raises:
            ConfigurationError: ``blocking`` is not a bool or a number >= 0.
        """
        return _Block(self, True, check_blocking(blocking))


def _released_dropped(name: str, held: _Held) -> Callable[[], Awaitable[None]]:
    """The release of a hold whose `RWLock` was dropped, to run on the coordinator's loop."""

    async def release() -> None:
        try:
            await held.table.release(held.hold)
        finally:
            held.state.leave(held.task, held.write)
            if held.state.idle and held.table.rwlocks.get(name) is held.state:
                del held.table.rwlocks[name]

    return release


def _refuse_self_wait(state: RWQueue, task: int, write: bool, name: str) -> None:
    """Refuse what would wait for itself: an upgrade, a downgrade, a second hold.

    A second read too: a writer that came between the two would wait for the first
    read, and the second read for that writer.
    """
    if task in state.reader_tasks:
        if not write:
            raise LockAcquireFailed(
                f"this task holds the read lock of {name!r} already: read-write locks are "
                "not reentrant (a writer waiting in between would make it wait for itself)"
            )
        raise LockAcquireFailed(
            f"this task holds the read lock of {name!r} and asks for its write lock: "
            "read-write locks cannot be upgraded (it would wait for itself); release the "
            "read lock first, then take the write lock"
        )
    if task in state.writer_tasks:
        which = "write" if write else "read"
        raise LockAcquireFailed(
            f"this task holds (or waits for) the write lock of {name!r} and asks for its "
            f"{which} lock: it would wait for itself; release the write lock first"
        )


@final
class _Block:
    """One ``async with rw.read()`` or ``rw.write()`` block."""

    __slots__ = ("_blocking", "_entered", "_held", "_rw", "_scope", "_write")

    def __init__(self, rw: RWLock, write: bool, blocking: Blocking) -> None:
        self._rw = rw
        self._write = write
        self._blocking = blocking
        self._held: _Held | None = None
        self._scope: anyio.CancelScope | None = None
        self._entered: contextvars.Token[tuple[Fenced, ...]] | None = None

    # What `fencing_token()` asks of a fenced hold in a block (``Fenced``).
    @property
    def name(self) -> str:
        return self._rw.name

    def locked(self) -> bool:
        return self._held is not None

    @property
    def fencing_token(self) -> int:
        held = self._held
        if held is None or held.hold.fencing_token is None:
            raise LockNotHeld(f"the write block of {self._rw.name!r} holds no fencing token")
        return held.hold.fencing_token

    async def __aenter__(self) -> RWLock:
        rw = self._rw
        held = await rw._acquire(self._write, self._blocking)
        if held is None:
            raise LockAcquireFailed(
                f"{'write' if self._write else 'read'} lock {rw.name!r} was not acquired "
                f"{budget(self._blocking)}"
            )
        held.entered = True
        self._held = held
        if self._write and rw._fencing:
            self._entered = enter_fenced(self)
        self._scope = open_block(held.hold, rw._cancel_on_loss)
        return rw

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        assert held is not None, "a block is left only after it was entered"
        entered, self._entered = self._entered, None
        if entered is not None:
            exit_fenced(entered)
        scope, self._scope = self._scope, None
        exc, _ = close_block(scope, exc_type, exc, tb)
        rw = self._rw
        await rw._release(held)
        what = f"{held.role} lock {rw.name!r} was lost"
        raise_if_lost(rw.name, held.hold.lost_reason, rw._cancel_on_loss, exc, what)
