"""The local FIFO queue of one lock key inside one coordinator.

Tasks of one process that want the same key line up here, so that only the task at
the head talks to the backend and waiting costs no thread. The queue knows nothing of
the backend; :mod:`aiotooz._locktable` takes a place in it before trying the backend
and hands the place on after releasing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import final

import anyio

__all__ = ["KeyQueue", "RWQueue", "SemaphoreQueue"]


@final
class _Waiter:
    __slots__ = ("event", "granted", "task")

    def __init__(self, task: int) -> None:
        self.task = task
        self.granted = False
        self.event = anyio.Event()


@final
class KeyQueue:
    """First come, first served ownership of one key among the tasks of a process."""

    __slots__ = ("_waiters", "owner", "owner_waits", "step_back_until")

    def __init__(self) -> None:
        #: Until when the next owner lets waiters of other processes go first.
        self.step_back_until: float = float("-inf")
        #: The id of the task that owns the key locally (it may still be trying the
        #: backend), or ``None``.
        self.owner: int | None = None
        #: The owner waits at the backend: another process holds what it wants.
        self.owner_waits: bool = False
        self._waiters: deque[_Waiter] = deque()

    @property
    def idle(self) -> bool:
        """Nobody owns or waits for the key: the queue can be forgotten."""
        return self.owner is None and not self._waiters

    @property
    def waiting(self) -> int:
        """How many tasks wait behind the owner."""
        return len(self._waiters)

    @property
    def tasks_waiting(self) -> int:
        """How many tasks wait: those behind the owner, and the owner at the backend."""
        return len(self._waiters) + self.owner_waits

    async def take(self, task: int, deadline: float) -> bool:
        """Become the owner; wait in line until ``deadline`` (``math.inf``: forever).

        Returns ``False`` if the deadline passed first. Cancellation while waiting
        leaves the queue as if this task had never come, even if ownership was handed
        to it in the same instant (it is then handed on).
        """
        if self.owner is None and not self._waiters:
            self.owner = task
            return True
        if deadline <= anyio.current_time():
            return False
        waiter = _Waiter(task)
        self._waiters.append(waiter)
        try:
            with anyio.move_on_after(deadline - anyio.current_time()):  # inf: no limit
                await waiter.event.wait()
        except BaseException:
            self._leave(waiter)
            raise
        if not waiter.granted:
            self._leave(waiter)
        return waiter.granted

    def give_back(self) -> None:
        """Hand ownership to the first waiter, or leave the key unowned."""
        self.owner_waits = False
        if self._waiters:
            waiter = self._waiters.popleft()
            self.owner = waiter.task
            waiter.granted = True
            waiter.event.set()
        else:
            self.owner = None

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.granted:
            self.give_back()
        else:
            self._waiters.remove(waiter)


@final
class SemaphoreQueue:
    """The tasks of one process that want slots of one semaphore, and its local state.

    Waiters line up in one :class:`KeyQueue` (first come, first served); only its owner
    tries the slots. A local release wakes it through :meth:`released`.
    """

    __slots__ = ("holders", "limit", "probed_at", "queue", "wake")

    def __init__(self, limit: int) -> None:
        #: The limit every semaphore of this name in this process must use.
        self.limit = limit
        self.queue = KeyQueue()
        #: Slots held through this coordinator now.
        self.holders = 0
        #: When a waiter last checked whether a process uses a larger limit.
        self.probed_at = float("-inf")
        #: Wakes the owner while it waits for a slot (set by it for its wait).
        self.wake: Callable[[], object] | None = None

    @property
    def idle(self) -> bool:
        """No slot held or wanted here: the state can be forgotten."""
        return self.holders == 0 and self.queue.idle

    def released(self) -> None:
        """A slot held here was released: wake the waiter at the head."""
        if self.wake is not None:
            self.wake()


@final
class RWQueue:
    """The tasks of one process that hold or want one read-write lock: the local rules.

    Writer-preferring here too: while a writer of this process waits or holds, no new
    reader of it goes to the backend; a writer goes there once no reader of this process
    holds or tries (one backend session holds every lock of a coordinator on some
    backends, and a session does not exclude itself). Writers then queue in the writer
    key's :class:`KeyQueue`. Every change wakes the tasks waiting on these rules.
    """

    __slots__ = (
        "_changed",
        "reader_tasks",
        "readers",
        "serial",
        "waiting",
        "writer_tasks",
        "writers",
    )

    def __init__(self) -> None:
        #: Readers of this process holding the lock, or trying it at the backend.
        self.readers = 0
        #: Writers of this process holding the lock or waiting for it.
        self.writers = 0
        #: Those readers and writers by task id (a task cannot wait for itself).
        self.reader_tasks: dict[int, int] = {}
        self.writer_tasks: dict[int, int] = {}
        #: The last reader key's serial (each reader locks a key of its own).
        self.serial = 0
        #: Tasks waiting on these rules (so the state is not forgotten under them).
        self.waiting = 0
        self._changed = anyio.Event()

    @property
    def idle(self) -> bool:
        """No reader or writer here, nor one waiting: the state can be forgotten."""
        return self.readers == 0 and self.writers == 0 and self.waiting == 0

    def enter(self, task: int, write: bool) -> None:
        """``task`` begins to read (try, then hold) or to write (wait, then hold)."""
        tasks = self.writer_tasks if write else self.reader_tasks
        tasks[task] = tasks.get(task, 0) + 1
        if write:
            self.writers += 1
        else:
            self.readers += 1

    def leave(self, task: int, write: bool) -> None:
        """``task``'s read or write ended (released, or never granted); wake the waiters."""
        tasks = self.writer_tasks if write else self.reader_tasks
        tasks[task] -= 1
        if not tasks[task]:
            del tasks[task]
        if write:
            self.writers -= 1
        else:
            self.readers -= 1
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``ready()``, at most until ``deadline``; whether it came."""
        while not ready():
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return False
            changed = self._changed
            self.waiting += 1
            try:
                with anyio.move_on_after(remaining):  # inf: no limit
                    await changed.wait()
            finally:
                self.waiting -= 1
        return True
