"""The coordinator: one connection to a backend, its background tasks, and its locks."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, final

import anyio

from ._backend import Backend, BackendLock
from ._exceptions import (
    BackendUnavailable,
    ConfigurationError,
    CoordinationError,
    LockAcquireFailed,
    LockCreationFailed,
)
from ._logging import get_logger
from ._names import backend_key, check_prefix
from ._queue import KeyQueue
from ._settings import CoordinationSettings
from ._tasks import BackgroundTask, spawn

if TYPE_CHECKING:
    from ._lock import Lock

__all__ = ["Coordinator", "Hold", "get_default_coordinator", "set_default_coordinator"]

# While another process holds the key, the task at the head of the local queue retries
# with a short non-blocking try, backing off from _POLL_FIRST to _POLL_CAP seconds.
# The cap bounds the hand-off latency between processes; a try costs one thread hop and
# one backend round trip, and only one task per key per process is trying.
_POLL_FIRST = 0.002
_POLL_CAP = 0.05

#: The least time a try is given before a waiter's deadline gives it up: a healthy try
#: takes well under a millisecond on a LAN, a slow one still gets a fair chance.
_TRY_FLOOR: Final = 0.05

#: The deadline of ``blocking=False``: one try, and no waiting for a reconnect either.
TRY_ONCE: Final = -math.inf

# When a task releases a lock that other tasks of this process are waiting for, the
# backend lock is handed straight to the next of them, without a backend round trip, at
# most this many times in a row; then it is released at the backend, and other
# processes have their chance.
_MAX_LOCAL_HANDOFFS: Final = 8

# The lease rule: a held lock whose last successful refresh is older than this share of
# its TTL is declared lost, so that its holder stops *before* the backend could expire
# it and grant it to another process. The heartbeat must beat well inside it.
_LEASE_SHARE: Final = 0.75


@final
@dataclass(eq=False)
class Hold:
    """One lock held through a coordinator: its key, its backend lock, and since when."""

    coordinator: Coordinator
    name: str
    key: str
    queue: KeyQueue
    backend_lock: BackendLock
    #: When the try that was granted began: the earliest the backend can have started
    #: the lock's TTL.
    lease_start: float
    acquired_at: float
    #: How many local hand-offs in a row brought the backend lock to this hold.
    handoffs: int = 0
    #: Why the lock is known to be gone, or ``None`` while it is believed held.
    lost_reason: str | None = None
    released: bool = False
    #: Called once when the lock is lost (``async with`` cancels its body through it).
    on_lost: Callable[[], object] | None = None
    #: Set when the lock is lost or released; made on demand by ``wait_lost()``.
    ended: anyio.Event | None = None

    @property
    def lost(self) -> bool:
        """The lock is known to be gone."""
        return self.lost_reason is not None


@final
class Coordinator:
    """An asyncio-native (anyio) front to one tooz coordination backend.

    Connects on :meth:`start`, runs the heartbeat and reconnect as background tasks,
    and gives out :class:`~aiotooz.Lock` objects. Use it as an async context manager::

        async with Coordinator(prefix="svc-") as coordinator:
            async with coordinator.get_lock("volume-42"):
                ...

    Args:
        agent_id: identifies this process on the backend; a random UUID by default.
        prefix: prepended to the agent id (the tooz member id) and to every lock name,
            so that services sharing a backend do not share lock names by accident.
        settings: where the backend is and how to keep it alive; read from the
            environment (``AIOTOOZ_*``) when not given.

    Raises:
        ConfigurationError: ``prefix`` is not usable in a backend key.
    """

    def __init__(
        self,
        agent_id: str | None = None,
        prefix: str = "",
        settings: CoordinationSettings | None = None,
    ) -> None:
        self.prefix = check_prefix(prefix)
        self.agent_id = agent_id or str(uuid.uuid4())
        self.member_id = self.prefix + self.agent_id
        self.settings = settings if settings is not None else CoordinationSettings()
        self._backend: Backend | None = None
        # Set and replaced whenever the connection state changes (see _state_changed).
        self._state_event: anyio.Event | None = None
        self._background: list[BackgroundTask] = []
        # Set to make the heartbeat run before its time (see _beat_now).
        self._beat_event: anyio.Event | None = None
        self._last_beat = -math.inf
        self._started = False
        # When the last heartbeat that succeeded began (or the connection was made): every
        # lock held through the current connection was refreshed no earlier than this.
        self._last_refresh = -math.inf
        self._queues: dict[str, KeyQueue] = {}
        self._holds: set[Hold] = set()
        # Backend locks being handed from a releasing task to the next local waiter:
        # key -> the hold that released it. Taken by whoever owns the key's queue next.
        self._handed_over: dict[str, Hold] = {}
        self._log = get_logger(agent_id=self.agent_id, backend=self.settings.scheme)

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return (
            f"<Coordinator member_id={self.member_id!r} "
            f"backend={self.settings.redacted_backend_url!r} {state}>"
        )

    # -- lifecycle ---------------------------------------------------------------

    @property
    def is_started(self) -> bool:
        """``start()`` has completed and ``stop()`` has not been called since."""
        return self._started

    @property
    def is_connected(self) -> bool:
        """Started, and not in the middle of reconnecting to the backend."""
        return self._started and self._backend is not None

    async def start(self) -> None:
        """Connect to the backend and start the heartbeat. Does nothing if started.

        Raises:
            ConfigurationError: the backend URL, scheme or client library is wrong.
            BackendUnavailable: the backend cannot be reached.
        """
        if self._started:
            return
        connecting = anyio.current_time()
        backend = await Backend.connect(
            self.settings.backend_url, self.member_id, self.settings.call_timeout
        )
        ttl = backend.lock_ttl
        if ttl is not None and self.settings.heartbeat >= ttl / 2:
            await backend.close()
            raise ConfigurationError(
                f"heartbeat ({self.settings.heartbeat} s) must be under half the lock TTL "
                f"this backend guarantees ({ttl:g} s), or held locks would expire between "
                "beats: lower AIOTOOZ_HEARTBEAT or raise the URL's lock_timeout"
            )
        self._backend = backend
        self._last_refresh = connecting
        self._started = True
        self._state_changed()
        if backend.requires_beating:
            self._background.append(
                spawn(self._beat_forever, name=f"aiotooz heartbeat {self.member_id}")
            )
        if ttl is not None:
            self._background.append(
                spawn(lambda: self._watch_leases(ttl), name=f"aiotooz leases {self.member_id}")
            )
        self._log.info(
            "coordinator started",
            backend_url=self.settings.redacted_backend_url,
            heartbeat=backend.requires_beating,
        )

    async def stop(self) -> None:
        """Release every lock held through this coordinator, stop beating, disconnect.

        Does nothing if not started. Works from any task and inside any cancel scope:
        it runs shielded to the end (each backend call bounded by the settings'
        ``call_timeout``), and a cancellation of the caller is delivered after it.
        Tasks still waiting for a lock get :class:`~aiotooz.LockCreationFailed`; a
        holder inside ``async with lock:`` is cancelled and gets
        :class:`~aiotooz.LockLost`; a lock taken with ``acquire()`` can still be
        ``release()``-d without error.
        """
        if not self._started:
            return
        self._started = False
        with anyio.CancelScope(shield=True):
            background, self._background = self._background, []
            for task in background:
                task.cancel()
            for task in background:
                await task.wait()
            holds = list(self._holds)
            for hold in holds:
                self._declare_lost(hold, "the coordinator stopped")
            # Each release is bounded by the call timeout; all of them by one more, past
            # which the rest are given up here and end with their TTL or session.
            with anyio.move_on_after(self.settings.call_timeout):
                for hold in holds:
                    await self._release(hold)
                for handed in list(self._handed_over.values()):
                    await self._release_backend(handed.backend_lock, handed.name, lost=True)
            for hold in holds:
                if not hold.released:
                    hold.released = True
                    self._holds.discard(hold)
                    self._give_back(hold.key, hold.queue)
            self._handed_over.clear()
            backend, self._backend = self._backend, None
            if backend is not None:
                await backend.close()
        self._state_changed()
        if _default is self:
            set_default_coordinator(None)
        self._log.info("coordinator stopped")

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_connected(self) -> None:
        """Wait until the coordinator is started and connected to its backend."""
        while not self.is_connected:
            await self._next_state_change()

    async def _next_state_change(self) -> None:
        if self._state_event is None:
            self._state_event = anyio.Event()
        await self._state_event.wait()

    def _state_changed(self) -> None:
        """Wake everything waiting for a start, stop, disconnect or reconnect."""
        if self._state_event is not None:
            self._state_event.set()
            self._state_event = None

    # -- locks ---------------------------------------------------------------------

    def get_lock(self, name: str) -> Lock:
        """A :class:`~aiotooz.Lock` named ``name`` on this coordinator.

        Raises:
            LockCreationFailed: the coordinator is not started.
            LockNameError: ``name`` is not a non-empty ``str``.
        """
        from ._lock import Lock

        if not self._started:
            raise LockCreationFailed(
                f"{self!r} is not started: use 'async with coordinator:' or "
                "'await coordinator.start()' before asking it for locks"
            )
        return Lock(name, coordinator=self)

    async def _acquire(self, name: str, deadline: float | None) -> Hold | None:
        """Take ``name`` through the local queue and then the backend.

        ``deadline`` is an ``anyio.current_time()`` instant, or ``None`` to wait for as
        long as it takes; a deadline in the past means "try once". Returns ``None`` if
        the deadline passed first.
        """
        self._check_started()
        key = backend_key(self.prefix, name, self._reserved_keys())
        task = anyio.get_current_task().id
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = KeyQueue()
        elif queue.owner == task and deadline != TRY_ONCE:
            # Any wait would be a wait for this very task: refuse it at once, timed or not.
            raise LockAcquireFailed(
                f"lock {name!r} is already held by this task: aiotooz locks are not "
                "reentrant (acquiring it again would wait for itself)"
            )
        started = anyio.current_time()
        granted: tuple[BackendLock, float] | None = None
        previous: Hold | None = None
        try:
            if not await queue.take(task, deadline):
                return None
            previous = self._take_handed_over(key)
            if previous is not None:
                granted = previous.backend_lock, previous.lease_start
            else:
                granted = await self._acquire_backend(key, deadline)
        except BaseException:
            if queue.owner == task:
                self._give_back(key, queue)
            if queue.owner is None:
                # Cancelled as the lock was handed to us, with nobody left to pass it to.
                orphan = self._handed_over.pop(key, None)
                if orphan is not None:
                    with anyio.CancelScope(shield=True):
                        await self._release_backend(orphan.backend_lock, name)
            raise
        finally:
            if queue.idle:
                self._queues.pop(key, None)
        if granted is None:
            self._give_back(key, queue)
            return None
        backend_lock, lease_start = granted
        now = anyio.current_time()
        hold = Hold(
            coordinator=self,
            name=name,
            key=key,
            queue=queue,
            backend_lock=backend_lock,
            lease_start=lease_start,
            acquired_at=now,
            handoffs=previous.handoffs + 1 if previous is not None else 0,
        )
        self._holds.add(hold)
        self._log.debug("lock acquired", lock=name, key=key, waited=round(now - started, 6))
        return hold

    async def _acquire_backend(
        self, key: str, deadline: float | None
    ) -> tuple[BackendLock, float] | None:
        """Try the backend until granted or ``deadline``; the lock and when its try began."""
        delay = _POLL_FIRST
        backend_lock: BackendLock | None = None
        while True:
            backend = await self._connected_backend(deadline)
            if backend is None:
                return None
            if backend_lock is None or backend_lock.backend is not backend:
                backend_lock = backend.lock(key)
            tried_at = anyio.current_time()
            wait = None
            if deadline is not None and deadline != TRY_ONCE:
                # A try that hangs is given up at the deadline (but gets _TRY_FLOOR).
                wait = max(deadline - tried_at, _TRY_FLOOR)
            try:
                if await backend.try_acquire(backend_lock, wait):
                    # stop() may have run while the try was in its worker thread.
                    self._check_started()
                    return backend_lock, tried_at
            except BackendUnavailable as exc:
                if deadline == TRY_ONCE:
                    raise
                # A patient waiter rides out a failing backend: the heartbeat checks the
                # connection now (and reconnects if it is gone), and the try is repeated.
                self._log.debug("lock try failed; trying again", key=key, error=str(exc))
                self._beat_now()
            except BaseException:
                # Granted in the worker thread while we were being cancelled or failing:
                # give it back, or it would stay held with nobody to release it.
                if backend_lock.held:
                    with anyio.CancelScope(shield=True):
                        await self._release_backend(backend_lock, key)
                raise
            pause = delay * random.uniform(0.5, 1.0)
            if deadline is not None:
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    return None
                pause = min(pause, remaining)
            await anyio.sleep(pause)
            delay = min(delay * 2, _POLL_CAP)

    async def _connected_backend(self, deadline: float | None) -> Backend | None:
        """The live backend, waiting for a reconnect in progress until ``deadline``."""
        while True:
            self._check_started()
            if self._backend is not None:
                return self._backend
            if deadline == TRY_ONCE:
                raise BackendUnavailable(
                    f"{self!r} is reconnecting to its backend; try again later"
                )
            if deadline is None:
                await self._next_state_change()
                continue
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            with anyio.move_on_after(remaining):
                await self._next_state_change()

    async def _release(self, hold: Hold) -> None:
        """Release ``hold`` at the backend, then hand the key to the next local waiter.

        A lost lock is still released at the backend when it was taken through the
        current connection: tooz's release checks ownership (token, lease, member id),
        and it stops tooz from refreshing the lock in later beats.
        """
        if hold.released:
            return
        hold.released = True
        self._holds.discard(hold)
        if hold.ended is not None:
            hold.ended.set()
        if self._can_hand_over(hold):
            self._handed_over[hold.key] = hold
            self._give_back(hold.key, hold.queue)
            return
        try:
            if hold.backend_lock.backend is self._backend:
                # Not shielded: a cancelled caller (or one whose backend hangs) stops
                # waiting, and the release still runs in its worker thread.
                await self._release_backend(hold.backend_lock, hold.name, hold.lost)
        finally:
            self._give_back(hold.key, hold.queue)
            self._log.debug(
                "lock released",
                lock=hold.name,
                lost=hold.lost_reason,
                held=round(anyio.current_time() - hold.acquired_at, 6),
            )

    def _can_hand_over(self, hold: Hold) -> bool:
        """Whether the next local waiter may take ``hold``'s backend lock as it is."""
        return (
            hold.queue.waiting > 0
            and hold.handoffs < _MAX_LOCAL_HANDOFFS
            and hold.backend_lock.backend is self._backend
            and self._started
            and not self._check_lease(hold, anyio.current_time())
        )

    def _take_handed_over(self, key: str) -> Hold | None:
        """The hold whose backend lock was handed to the new owner of ``key``, if any.

        A lock handed over through a connection that has since been replaced is gone.
        """
        previous = self._handed_over.pop(key, None)
        if previous is None or previous.backend_lock.backend is not self._backend:
            return None
        return previous

    async def _release_backend(
        self, backend_lock: BackendLock, name: str, lost: bool = False
    ) -> None:
        try:
            released = await backend_lock.backend.release(backend_lock)
        except CoordinationError as exc:
            # Nothing the caller could do: the lock ends with its TTL or session.
            self._log.warning("backend release failed", lock=name, error=str(exc))
            return
        if not released and not lost:
            self._log.warning("lock was no longer held at the backend when released", lock=name)

    # -- lock loss -----------------------------------------------------------------

    def _declare_lost(self, hold: Hold, reason: str) -> None:
        """Record that ``hold`` is gone and tell its holder (once)."""
        if hold.lost or hold.released:
            return
        hold.lost_reason = reason
        self._log.warning(
            "lock lost",
            lock=hold.name,
            reason=reason,
            held=round(anyio.current_time() - hold.acquired_at, 6),
        )
        if hold.ended is not None:
            hold.ended.set()
        if hold.on_lost is not None:
            hold.on_lost()

    def _check_lease(self, hold: Hold, now: float) -> bool:
        """Apply the lease rule to ``hold`` now; ``True`` if it is (now) lost."""
        if hold.lost:
            return True
        ttl = hold.backend_lock.backend.lock_ttl
        if ttl is None or hold.released:
            return False
        refreshed = max(hold.lease_start, self._last_refresh)
        if now - refreshed <= ttl * _LEASE_SHARE:
            return False
        self._declare_lost(
            hold,
            f"no refresh reached the backend for {now - refreshed:.1f} s of the lock's "
            f"{ttl:g} s TTL (backend unreachable, or the event loop was blocked)",
        )
        return True

    async def _wait_ended(self, hold: Hold) -> None:
        if hold.lost or hold.released:
            return
        if hold.ended is None:
            hold.ended = anyio.Event()
        await hold.ended.wait()

    async def _watch_leases(self, ttl: float) -> None:
        """Apply the lease rule often enough (a twentieth of the TTL) to act in time."""
        while True:
            await anyio.sleep(ttl / 20)
            now = anyio.current_time()
            for hold in list(self._holds):
                self._check_lease(hold, now)

    def _give_back(self, key: str, queue: KeyQueue) -> None:
        queue.give_back()
        if queue.idle and self._queues.get(key) is queue:
            del self._queues[key]

    def _check_started(self) -> None:
        if not self._started:
            raise LockCreationFailed(
                f"{self!r} is not started: use 'async with coordinator:' or "
                "'await coordinator.start()' before taking locks"
            )

    def _reserved_keys(self) -> frozenset[str]:
        return self._backend.reserved_keys if self._backend is not None else frozenset()

    # -- heartbeat and reconnect ---------------------------------------------------

    def _beat_now(self) -> None:
        """Have the heartbeat run soon (a try failed: is the connection gone?).

        At most every 0.1 s, so that waiters polling a failing backend do not turn the
        heartbeat into a flood.
        """
        if self._beat_event is not None and anyio.current_time() - self._last_beat >= 0.1:
            self._beat_event.set()

    async def _beat_forever(self) -> None:
        while True:
            self._beat_event = anyio.Event()
            with anyio.move_on_after(self.settings.heartbeat):
                await self._beat_event.wait()
            backend = self._backend
            if backend is None:
                continue
            holds = [
                hold
                for hold in self._holds
                if hold.backend_lock.backend is backend and not hold.lost
            ]
            beat_started = self._last_beat = anyio.current_time()
            try:
                owned = await backend.heartbeat([hold.backend_lock for hold in holds])
                if backend is self._backend:
                    self._last_refresh = beat_started
                for hold, still_ours in zip(holds, owned, strict=True):
                    if still_ours is False:
                        self._declare_lost(
                            hold, "the backend says another owner has it, or it expired"
                        )
            except BackendUnavailable as exc:
                self._log.warning("heartbeat failed; reconnecting", error=str(exc))
                await self._reconnect(backend)
            except CoordinationError as exc:
                self._log.warning("heartbeat failed", error=str(exc))
            except Exception:
                # A bug here must not crash the task group, which would cancel the
                # application code running between start() and stop().
                self._log.exception("heartbeat crashed; still beating")

    async def _reconnect(self, old: Backend) -> None:
        """Replace ``old`` with a new connection, backing off with jitter between tries.

        Locks held through ``old`` are marked lost: a new connection does not own them.
        """
        self._backend = None
        self._state_changed()
        for hold in list(self._holds):
            if hold.backend_lock.backend is old:
                self._declare_lost(hold, "the connection to the backend failed")
        await old.close()
        base = self.settings.initial_reconnect_backoff
        cap = self.settings.max_reconnect_backoff
        backoff = base
        attempt = 0
        while True:
            attempt += 1
            connecting = anyio.current_time()
            try:
                backend = await Backend.connect(
                    self.settings.backend_url, self.member_id, self.settings.call_timeout
                )
            except CoordinationError as exc:
                backoff = min(cap, random.uniform(base, backoff * 3))
                self._log.warning(
                    "reconnect attempt failed",
                    attempt=attempt,
                    retry_in=round(backoff, 3),
                    error=str(exc),
                )
                await anyio.sleep(backoff)
                continue
            self._backend = backend
            self._last_refresh = connecting
            self._state_changed()
            self._log.info("reconnected to backend", attempt=attempt)
            return


_default: Coordinator | None = None


def set_default_coordinator(coordinator: Coordinator | None) -> Coordinator | None:
    """Make ``coordinator`` the process-wide default; returns the previous default.

    :class:`~aiotooz.Lock` and :func:`~aiotooz.synchronized` without a ``coordinator``
    look the default up each time they acquire, so a coordinator installed later (in an
    application's startup) serves functions decorated at import time. A coordinator that
    is the default uninstalls itself when it stops. ``None`` uninstalls.
    """
    global _default
    previous, _default = _default, coordinator
    return previous


def get_default_coordinator() -> Coordinator:
    """The coordinator installed with :func:`set_default_coordinator`.

    Raises:
        LockCreationFailed: none is installed.
    """
    if _default is None:
        raise LockCreationFailed(
            "no coordinator given and no default coordinator installed: pass "
            "coordinator=..., or call aiotooz.set_default_coordinator(coordinator) "
            "after starting one"
        )
    return _default
