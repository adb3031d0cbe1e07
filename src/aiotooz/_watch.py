"""A waiter's watch for the releases of one key, so that it tries again when one happens.

Two kinds, picked from what the driver declares: a watch kept on the event loop
(``Capability.WATCHES_ON_LOOP``: Redis pub/sub on asyncio, the file driver's inotify),
or a one-shot watch armed in a worker thread after each failed try
(``Capability.ARMS_WATCHES``: ZooKeeper, etcd, the probes of the SQL and ipc drivers).
A release fires a :class:`~aiotooz._drivers.ReleaseSignal`: a hint to try again, never
a grant. Where neither serves, the waiter polls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import final

import anyio

from ._calls import Calls
from ._drivers import Capability, Driver, ReleaseSignal
from ._exceptions import CoordinationError

__all__ = ["Watch", "open_watch"]


@final
class Watch:
    """A waiter's watch for the releases of one key (see :func:`open_watch`)."""

    __slots__ = ("_arm", "_close", "active", "signal")

    def __init__(
        self,
        signal: ReleaseSignal,
        active: bool,
        close: Callable[[], Awaitable[None]] | None = None,
        arm: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.signal = signal
        #: Whether releases fire the signal (else the waiter only polls). A watch with
        #: nothing to arm is active from the start: try again before the first wait.
        self.active = active
        self._close = close
        self._arm = arm

    async def arm(self) -> bool:
        """Before a wait: arm a one-shot watch; ``True`` if the lock looks free now."""
        return False if self._arm is None else await self._arm()

    async def close(self) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await close()


async def open_watch(driver: Driver, calls: Calls, key: str) -> Watch:
    """Start watching for releases of ``key`` through ``driver``, before trying it again.

    A watch kept on the event loop where the driver ``WATCHES_ON_LOOP`` and it serves
    this connection, else one armed after each failed try where it ``ARMS_WATCHES``;
    otherwise (and if the watch cannot be had in time) an inactive one: the waiter polls.
    """
    on_loop = Capability.WATCHES_ON_LOOP in driver.capabilities and (
        driver.watches_on_loop(calls.native)
    )
    armed_here = Capability.ARMS_WATCHES in driver.capabilities
    if not on_loop and not armed_here:
        return Watch(ReleaseSignal(), False)
    tooz_lock = driver.get_lock(key)  # no I/O on any driver
    if on_loop:
        signal = None
        with contextlib.suppress(Exception), calls.on_loop_call("watching for releases"):
            with anyio.move_on_after(calls.call_timeout):
                signal = await driver.watch_releases(tooz_lock)
        if signal is not None:
            watched = signal

            async def unwatch() -> None:
                # Counted like the watch: the driver's asyncio client outlives it.
                with calls.on_loop_call("no longer watching for releases"):
                    await driver.unwatch_releases(tooz_lock, watched)

            return Watch(signal, True, unwatch)
    if not armed_here:
        return Watch(ReleaseSignal(), False)
    return _armed_watch(driver, calls, tooz_lock)


def _armed_watch(driver: Driver, calls: Calls, tooz_lock: object) -> Watch:
    """A watch armed in the acquire lane before each wait, fired from the driver's thread."""
    fired = ReleaseSignal()
    schedule = calls.schedule
    armed = False  # a watch is armed and has not fired yet: no need for another
    closed = False  # the waiter has stopped waiting

    def on_fire() -> None:
        nonlocal armed
        armed = False
        fired.fire()

    def fire(*_: object) -> None:  # from the driver's own thread
        with contextlib.suppress(RuntimeError):  # the event loop is gone
            schedule(on_fire)

    async def arm() -> bool:
        nonlocal armed
        if armed:
            return False
        try:
            looks_free = await calls.in_lane(calls.acquire_lane, "watching", arm_in_lane)
        except CoordinationError:
            return False  # not here, or not now: the waiter polls
        armed = not looks_free
        return looks_free

    def arm_in_lane() -> bool:
        try:
            return driver.arm_release_watch(tooz_lock, fire)
        finally:
            # A cancelled waiter does not wait for this call: if it left (and disarmed)
            # while the call ran, what the call armed would outlive it (a stream and its
            # thread, a session queued at the server, a read-write contender's place).
            # It is disarmed here, after the driver has registered it; `disarm` sets
            # `closed` before it disarms, so one of the two always sees the watch.
            if closed:
                driver.disarm_release_watch(tooz_lock)

    async def disarm() -> None:
        nonlocal closed
        closed = True
        driver.disarm_release_watch(tooz_lock)

    return Watch(fired, False, close=disarm, arm=arm)
