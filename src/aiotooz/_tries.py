"""The backend side of waiting: the head of a key's local queue and the backend.

The task at the head of a key's local queue tries the backend until it is granted the
lock, waiting between tries for a release (where the driver can tell it) or its poll.
`Waits` is that wait, the one policy of every waiter: a lock's, and a semaphore's
(which watches all its slots).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from typing import Final, Literal, final

import anyio

from ._connection import Connection, LockHandle
from ._drivers import ReleaseSignal
from ._exceptions import BackendUnavailable, CoordinationError, LockCreationFailed
from ._logging import Logger
from ._state import CoordinatorState
from ._telemetry import instruments
from ._watch import Watch

__all__ = ["LEASE_SHARE", "TRY_ONCE", "BackendTries", "Waits"]

#: The deadline of ``blocking=False``: one try, and no waiting for a reconnect either.
TRY_ONCE: Final = -math.inf

#: The lease rule's share of the TTL. The heartbeat must beat well inside it.
LEASE_SHARE: Final = 0.75

# While another process holds the key (or every slot), the task at the head of the local
# queue retries with a short non-blocking try, backing off from _POLL_FIRST to _POLL_CAP
# seconds unless a release wakes it. The cap bounds the hand-off latency between
# processes where nothing wakes waiters; only one task per key per process is trying.
_POLL_FIRST: Final = 0.002
_POLL_CAP: Final = 0.05

#: The least time a try is given before a waiter's deadline gives it up: a healthy try
#: takes well under a millisecond on a LAN, a slow one still gets a fair chance.
_TRY_FLOOR: Final = 0.05


@final
class Waits:
    """One waiter's waits between its tries: the wait policy of every lock and semaphore.

    Watch, then try, then wait: the waiter watches the keys it wants (where the driver
    can tell of a release) before its next try, so that a release between a failed try
    and the wait is never missed; it then waits for a wake-up or its next poll, backing
    off from ``_POLL_FIRST`` to ``_POLL_CAP`` while nothing wakes it.
    """

    __slots__ = ("_connection", "_delay", "_watches", "signal", "woken")

    def __init__(self) -> None:
        #: Fired by a release of any watched key; a semaphore's local releases fire it too.
        self.signal: ReleaseSignal = ReleaseSignal()
        #: The index (in ``keys``) of the watched key whose release fired last, if any:
        #: the key to try first.
        self.woken: int | None = None
        self._connection: Connection | None = None
        self._watches: list[Watch] = []
        self._delay = _POLL_FIRST

    async def watch(self, connection: Connection, keys: Sequence[str], armed: bool = True) -> bool:
        """Watch ``keys`` through ``connection`` (anew once it is replaced).

        ``armed=False`` keeps only the watches that need no arming before each wait
        (those kept on the event loop), for a waiter of many keys: an armed watch costs
        a call per key and wait, and a probe takes the key at the backend for an instant
        after each release.

        Returns:
            Whether a watch became active just now: a release before it was not seen,
            so the waiter tries again before it waits.
        """
        if connection is self._connection:
            return False
        await self.close()
        self._connection = connection
        active = False
        for index, key in enumerate(keys):
            watch = await connection.watch(connection.lock(key))
            if not armed and not watch.active:
                await watch.close()
                continue
            watch.signal.forward_to(functools.partial(self._fire, index))
            self._watches.append(watch)
            active = active or watch.active
        return active

    def _fire(self, index: int) -> None:
        self.woken = index
        self.signal.fire()

    async def wait(self, remaining: float) -> None:
        """Wait for a wake-up or the next poll, ``remaining`` seconds at most."""
        for watch in self._watches:
            if await watch.arm():
                return  # it looks free already
        pause = self._delay * random.uniform(0.5, 1.0)
        if await self.signal.wait(min(pause, remaining)):
            self._delay = _POLL_FIRST  # woken by a release: try at once, and soon again
            if self._connection is not None:
                instruments.wakeups.add(1, {"aiotooz.backend": self._connection.scheme})
        else:
            self._delay = min(self._delay * 2, _POLL_CAP)

    async def close(self) -> None:
        """Stop watching (shielded: also when the waiter is cancelled)."""
        watches, self._watches, self._connection = self._watches, [], None
        for watch in watches:
            await watch.close()


@final
class BackendTries:
    """Tries, waits, fencing tokens and releases at the backend, for one lock table.

    Args:
        state: the coordinator's connection and lifecycle, as it shares them.
        log: the coordinator's logger.
    """

    def __init__(self, state: CoordinatorState, log: Logger) -> None:
        self._state = state
        self._log = log

    async def acquire(
        self,
        key: str,
        deadline: float,
        fencing: bool,
        step_back_until: float,
        waiting: Callable[[], object],
        once: bool = False,
    ) -> tuple[LockHandle, float, int | None] | None:
        """Try the backend until granted or ``deadline``; the lock and when its try began.

        Between tries the waiter waits for a release (where the driver can tell it) or
        its next poll, whichever comes first: watch, then try, then wait, so that a
        release between a failed try and the wait is never missed. Until
        ``step_back_until`` it lets a woken waiter of another process go first.
        ``waiting`` is called when the first try fails (the acquire has to wait).
        With ``once``, one try only, as for ``TRY_ONCE``, but given up at ``deadline``.
        """
        handle: LockHandle | None = None
        waits: Waits | None = None
        try:
            while True:
                connection = await self.connected(TRY_ONCE if once else deadline)
                if connection is None:
                    return None
                if handle is None or handle.connection is not connection:
                    handle = connection.lock(key)
                # The clock is read only when a step-back is pending: not on the hot path.
                if step_back_until > -math.inf:
                    pause = min(step_back_until, deadline) - anyio.current_time()
                    step_back_until = -math.inf
                    if pause > 0:
                        await anyio.sleep(pause)
                        continue
                granted = await self._try(connection, handle, key, deadline, fencing, once)
                if granted is not None or once:
                    return granted
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    return None
                waiting()
                if waits is None:
                    waits = Waits()
                if await waits.watch(connection, (key,)):
                    continue  # watching now: try again before waiting
                await waits.wait(remaining)
        finally:
            if waits is not None:
                await waits.close()

    async def _try(
        self,
        connection: Connection,
        handle: LockHandle,
        key: str,
        deadline: float,
        fencing: bool,
        once: bool = False,
    ) -> tuple[LockHandle, float, int | None] | None:
        """One try (with its fencing token); ``None`` if not granted.

        A failing backend is ridden out (``None``) unless the caller tries only once.
        """
        tried_at = anyio.current_time()
        # A try that hangs is given up at the deadline (but gets _TRY_FLOOR).
        wait = None if math.isinf(deadline) else max(deadline - tried_at, _TRY_FLOOR)
        try:
            if await connection.try_acquire(handle, wait):
                # stop() may have run while the try was in its worker thread.
                self.check_started()
                # When the grant's TTL began: its try, or, where every key rides on the
                # coordinator's one lease, that lease's last refresh. A key put on a
                # lease the beats had not reached for 1.6 s of its 2 s expired with it
                # 16 ms after the grant, and the holder, counting from its try, went on
                # beside the next holder (etcd under 20% packet loss, failover suite).
                lease_start = tried_at
                if connection.shared_lease:
                    lease_start = min(tried_at, self._state.last_refresh)
                token = await self.fence(handle, lease_start, fencing)
                if token is not False:
                    return handle, lease_start, token
                # Gone already (expired, taken over), or granted too late to use: not
                # granted after all.
                await self.release(handle, key, lost=True)
        except BackendUnavailable as exc:
            if handle.held:  # granted, but no fencing token could be had for it
                with anyio.CancelScope(shield=True):
                    await self.release(handle, key, lost=True)
            if deadline == TRY_ONCE or once:
                raise
            # A patient waiter rides out a failing backend: the heartbeat checks the
            # connection now (and reconnects if it is gone), and the try is repeated.
            self._log.debug("lock try failed; trying again", key=key, error=str(exc))
            self._state.want_beat()
        except BaseException:
            # Granted, but we are being cancelled or failing: give it back, or it would
            # stay held with nobody to release it.
            if handle.held:
                with anyio.CancelScope(shield=True):
                    await self.release(handle, key)
            raise
        return None

    async def fence(
        self, handle: LockHandle, lease_start: float, fencing: bool
    ) -> int | Literal[False] | None:
        """A new fencing token for a grant (``None`` if none was asked for).

        ``False`` if the lock turned out not to be ours, or the grant (or its token)
        came too late to use: past the lease rule's share of the TTL, another holder may
        exist already (a try that took that long, say, on a backend that was paused), and
        the holder would be told it lost the lock at once, or at its block's exit.
        """
        token = None
        if fencing:
            token = await handle.connection.fencing_token(handle)
            if token is None:
                return False
            instruments.fencing_tokens.add(1, {"aiotooz.backend": handle.connection.scheme})
        ttl = handle.connection.lock_ttl
        if ttl is not None:
            refreshed = max(lease_start, self._state.last_refresh)
            if anyio.current_time() - refreshed > ttl * LEASE_SHARE:
                return False
        return token

    async def connected(self, deadline: float) -> Connection | None:
        """The live connection, waiting for a reconnect in progress until ``deadline``."""
        while True:
            self.check_started()
            connection = self._state.connection
            if connection is not None:
                return connection
            if deadline == TRY_ONCE:
                raise BackendUnavailable(
                    f"{self._state.describe()} is reconnecting to its backend; try again later"
                )
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            with anyio.move_on_after(remaining):
                await self._state.next_change()

    # -- release -------------------------------------------------------------------------

    async def release(
        self, handle: LockHandle, name: str, lost: bool = False, contended: bool = False
    ) -> bool:
        """Release ``handle``'s lock at the backend; failures are logged, not raised.

        ``contended``: a local waiter is next, so ask who waits elsewhere (fairness).
        ``lost``: the lock is known to be lost, or the caller deals with a "no longer
        ours" answer itself (no warning is logged for it here).

        Returns:
            ``False`` if the backend said the lock was no longer ours; ``True`` if it was
            released, or the backend could not be told.
        """
        try:
            released = await handle.connection.release(handle, contended)
        except CoordinationError as exc:
            # Nothing the caller could do: the lock ends with its TTL or session.
            self._log.warning("backend release failed", lock=name, error=str(exc))
            return True
        if not released and not lost:
            self._log.warning("lock was no longer held at the backend when released", lock=name)
        return released

    # -- loss ----------------------------------------------------------------------------

    def check_started(self) -> None:
        if not self._state.started:
            raise LockCreationFailed(
                f"{self._state.describe()} is not started: use 'async with coordinator:' or "
                "'await coordinator.start()' before taking locks"
            )
