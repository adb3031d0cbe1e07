"""What a coordinator shares with the lock table below it.

The coordinator is the only writer: it connects and reconnects, starts and stops, and
records here when each refresh of the held locks began. The lock table and its backend
tries read it, and wait on it for the next change. Nothing below the coordinator calls
up into it: where a try wants the heartbeat early (it failed: is the connection gone?),
it raises a flag here, which the heartbeat waits on.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, final

import anyio

from ._tasks import Home

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["CoordinatorState"]

#: The heartbeat runs early (a try failed: is the connection gone?) at most this often,
#: so that waiters polling a failing backend do not turn it into a flood.
_EARLY_BEAT_INTERVAL: Final = 0.1


@final
class CoordinatorState:
    """One coordinator's connection and lifecycle, as the layers below it see them.

    Args:
        member_id: the coordinator's member id, to name it in errors.
        backend_url: its backend URL without secrets, to name it in errors.
    """

    __slots__ = (
        "_beat_wanted",
        "_change",
        "_name",
        "connection",
        "home",
        "last_beat",
        "last_refresh",
        "start_soon_threadsafe",
        "started",
        "task_id",
    )

    def __init__(self, member_id: str, backend_url: str) -> None:
        self._name = f"member_id={member_id!r} backend={backend_url!r}"
        #: The live connection; ``None`` while reconnecting or stopped.
        self.connection: Connection | None = None
        #: ``start()`` has completed and ``stop()`` has not been called since.
        self.started = False
        #: When the last heartbeat that succeeded began (or the connection was made):
        #: every lock held through the current connection was refreshed no earlier.
        self.last_refresh: float = -math.inf
        #: When the last heartbeat began, successful or not.
        self.last_beat: float = -math.inf
        #: The event loop and process that started the coordinator.
        self.home = Home()
        #: The current task's id; picked for the event loop when the coordinator starts.
        self.task_id: Callable[[], int] = lambda: anyio.get_current_task().id
        #: Starts a task on the coordinator's event loop from any thread (a finalizer's);
        #: set when the coordinator starts (see ``_tasks.threadsafe_starter``).
        self.start_soon_threadsafe: Callable[[Callable[[], Awaitable[object]]], None] | None = None
        # Set and replaced at each start, stop, disconnect and reconnect (see changed()).
        self._change: anyio.Event | None = None
        # Present while the heartbeat waits for its next beat (see want_beat()).
        self._beat_wanted: anyio.Event | None = None

    def describe(self) -> str:
        """The coordinator, as its ``repr`` names it in errors and logs."""
        return f"<Coordinator {self._name} {'started' if self.started else 'stopped'}>"

    def check_loop(self) -> None:
        """Raise `WrongEventLoop` outside the event loop and process that started it."""
        self.home.check(self.describe)

    # -- state changes -----------------------------------------------------------------

    def changed(self) -> None:
        """The coordinator started, stopped, lost or replaced its connection."""
        if self._change is not None:
            self._change.set()
            self._change = None

    async def next_change(self) -> None:
        """Wait for the next start, stop, disconnect or reconnect."""
        if self._change is None:
            self._change = anyio.Event()
        await self._change.wait()

    # -- an early beat -----------------------------------------------------------------

    def want_beat(self) -> None:
        """Have the heartbeat run soon (a try failed: is the connection gone?)."""
        if (
            self._beat_wanted is not None
            and anyio.current_time() - self.last_beat >= _EARLY_BEAT_INTERVAL
        ):
            self._beat_wanted.set()

    async def beat_wanted(self, within: float) -> None:
        """The heartbeat's wait: ``within`` seconds, or less if a beat is wanted sooner."""
        self._beat_wanted = anyio.Event()
        with anyio.move_on_after(within):
            await self._beat_wanted.wait()
