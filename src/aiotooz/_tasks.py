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

from collections.abc import Awaitable, Callable
from typing import Any, final

import anyio
import anyio.lowlevel

__all__ = [
    "BackgroundTask",
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
