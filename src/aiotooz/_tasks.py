"""Background tasks that belong to no task group: a coordinator's heartbeat and watchdog.

A coordinator is started and stopped by whoever owns it: ``async with``, a FastAPI
lifespan, or ``start()`` in one place and ``stop()`` in another, inside any cancel scope
(``with anyio.fail_after(5): await coordinator.stop()`` is the natural way to bound a
shutdown). A task group opened by ``start()`` would tie ``stop()`` to the task and the
cancel-scope nesting of ``start()``: anyio and trio refuse to close it from anywhere
else, and refusing half-way left a connection open and locks held. So the background
tasks are the event loop's own (asyncio's ``create_task``, trio's system tasks), each
inside a cancel scope of its own that :meth:`BackgroundTask.cancel` cancels.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, final

import anyio
import anyio.lowlevel

from ._exceptions import WrongEventLoop
from ._process import forks

__all__ = [
    "BackgroundTask",
    "Home",
    "loop_getter",
    "native_loop",
    "running_on_asyncio",
    "spawn",
    "task_id_getter",
    "threadsafe_starter",
]


@final
class BackgroundTask:
    """A task running ``func`` until it returns or :meth:`cancel` is called."""

    __slots__ = ("_done", "_func", "_handle", "_scope", "name")

    def __init__(self, func: Callable[[], Awaitable[object]], name: str) -> None:
        self.name = name
        self._func = func
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        #: asyncio keeps only a weak reference to a task: this is the strong one.
        self._handle: Any = None

    async def _run(self) -> None:
        try:
            with self._scope:
                await self._func()
        finally:
            self._done.set()

    def cancel(self) -> None:
        """Cancel the task (also before it has begun to run)."""
        self._scope.cancel()

    async def wait(self) -> None:
        """Wait until the task has ended."""
        await self._done.wait()


def native_loop() -> Any:
    """The running event loop's own handle: asyncio's loop, or trio's ``TrioToken``."""
    token = anyio.lowlevel.current_token()
    return getattr(token, "native_token", token)  # anyio < 4.11 returns it as is


def running_on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (not trio's)."""
    return hasattr(native_loop(), "create_task")


def spawn(func: Callable[[], Awaitable[object]], name: str) -> BackgroundTask:
    """Start ``func`` as a task of the running event loop that no task group owns.

    ``func`` must handle its own errors: there is nobody to raise them to (on trio, an
    error escaping a system task ends the whole run).
    """
    task = BackgroundTask(func, name)
    create_task = getattr(native_loop(), "create_task", None)  # an asyncio event loop
    if create_task is not None:
        task._handle = create_task(task._run(), name=name)
    else:
        import trio

        trio.lowlevel.spawn_system_task(task._run, name=name)
    return task


def threadsafe_starter() -> Callable[[Callable[[], Awaitable[object]]], None]:
    """How to start ``func()`` as a task of the running event loop, from any thread.

    For finalizers: a ``__del__`` may run in any thread, outside any task, where anyio
    cannot tell which event loop it is on. The returned function does not wait; it
    raises ``RuntimeError`` once the event loop is closed. ``func`` must handle its own
    errors, as for :func:`spawn`.
    """
    native = native_loop()
    create_task = getattr(native, "create_task", None)
    if create_task is not None:  # asyncio
        running: set[Any] = set()  # asyncio keeps only a weak reference to a task

        def start_task(func: Callable[[], Awaitable[object]]) -> None:
            task = create_task(func())
            running.add(task)
            task.add_done_callback(running.discard)

        return lambda func: native.call_soon_threadsafe(start_task, func)
    import trio

    return lambda func: native.run_sync_soon(trio.lowlevel.spawn_system_task, func)


def loop_getter() -> Callable[[], object]:
    """A cheap function giving the running event loop's handle, as `native_loop()` does.

    Picked for the running event loop's kind: it gives ``None`` where no event loop of
    that kind runs (none at all, or trio's where asyncio's ran, or the reverse).
    """
    get: Callable[[], object]
    if running_on_asyncio():
        import asyncio

        get = asyncio.get_running_loop
    else:
        import trio

        get = trio.lowlevel.current_trio_token

    def current() -> object:
        try:
            return get()
        except RuntimeError:  # no event loop of that kind runs in this thread
            return None

    return current


@final
class Home:
    """The event loop and process a started coordinator belongs to.

    Its background tasks run in that loop, its connection's threads in that process:
    from another loop (a later ``asyncio.run()``) or a forked child, locks would be held
    with nothing to keep them or tell of their loss. :meth:`check` refuses that, cheaply
    (an identity test and an int compare).
    """

    __slots__ = ("_current", "_forks", "_loop", "_pid")

    def __init__(self) -> None:
        self._loop: object = None
        self._current: Callable[[], object] = lambda: None
        self._forks = 0
        self._pid = 0

    def enter(self) -> None:
        """The running event loop and this process are home from now on."""
        self._current = loop_getter()
        self._loop = self._current()
        self._forks, self._pid = forks(), os.getpid()

    def leave(self) -> None:
        """No home: any event loop may :meth:`enter` next."""
        self._loop = None

    def check(self, describe: Callable[[], str]) -> None:
        """Raise `WrongEventLoop` unless called from home; ``describe()`` names the owner."""
        if self._loop is None or (self._forks == forks() and self._current() is self._loop):
            return
        if self._forks != forks():
            raise WrongEventLoop(
                f"{describe()} was started in process {self._pid}, and this process was "
                "forked from it after that: its connection, threads and event loop are "
                "the parent's. Start a new coordinator in the child (the parent's locks "
                "stay the parent's)"
            )
        raise WrongEventLoop(
            f"{describe()} was started in another event loop (another asyncio.run() or "
            "trio.run(), or another thread's loop), which runs its heartbeat and lease "
            "watchdog: from this one, locks would be held with nothing keeping them or "
            "telling of their loss. Start and use a coordinator in one event loop "
            "(async with Coordinator(...) inside the asyncio.run() or trio.run() that uses "
            "it); stop this one from the loop that started it"
        )


def task_id_getter() -> Callable[[], int]:
    """A cheap function giving the current task's id on the running event loop.

    The same id as ``anyio.get_current_task().id``, without making a ``TaskInfo`` (the
    lock table asks for it on every acquire).
    """
    if running_on_asyncio():
        import asyncio

        current_task = asyncio.current_task
        return lambda: id(current_task())
    import trio

    current = trio.lowlevel.current_task
    return lambda: id(current())
