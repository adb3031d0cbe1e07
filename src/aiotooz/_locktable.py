"""The lock table: every lock a coordinator holds or waits for, and the rules for them.

Glossary:

* *name*: what the user calls a lock; *key*: what the backend calls it (see
  :mod:`aiotooz._names`, which maps one to the other).
* *hold*: one lock held through a coordinator by one task (:class:`Hold`).
* *local queue*: tasks of this process that want one key line up in a
  :class:`~aiotooz._queue.KeyQueue`; only the task at its head talks to the backend.
* *hand-off*: a task that releases a key others of this process wait for passes the
  backend lock straight to the next of them, with no backend round trip, at most
  ``MAX_LOCAL_HANDOFFS`` times in a row (then other processes get their chance).
* *lease rule*: a held lock whose last refresh at the backend is older than
  ``LEASE_SHARE`` of its TTL is declared lost, before the backend could expire it and
  grant it to someone else.
* *lost*: the lock is known to be gone (expired, taken over, its connection failed, the
  coordinator stopped); its holder is told (``Hold.on_lost``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, final

import anyio

from ._connection import Connection, LockHandle
from ._exceptions import BackendUnavailable, LockAcquireFailed
from ._logging import Logger
from ._names import backend_key
from ._queue import KeyQueue, RWQueue, SemaphoreQueue
from ._state import CoordinatorState
from ._telemetry import instruments, record_waited_acquire
from ._tries import LEASE_SHARE, TRY_ONCE, BackendTries, Waits

__all__ = [
    "FOREVER",
    "MAX_LOCAL_HANDOFFS",
    "TRY_ONCE",
    "Hold",
    "LockTable",
    "Waits",
]

#: The deadline of a wait as long as it takes.
FOREVER: Final = math.inf

#: How long the next local waiter steps back after a release that woke waiters in
#: other processes: long enough for a woken waiter's try on a LAN.
_STEP_BACK: Final = 0.01

#: How many name -> key mappings a table keeps.
_KEYS_KEPT: Final = 1024

#: Local hand-offs in a row before the backend lock is released for other processes.
MAX_LOCAL_HANDOFFS: Final = 8


@final
class _Wait:
    """One acquire's wait, for the telemetry: whether it had to wait, and for how long."""

    __slots__ = ("attributes", "started", "waiting_since")

    def __init__(self, attributes: Mapping[str, str]) -> None:
        self.attributes = attributes
        self.started = time.perf_counter()
        #: ``time.time_ns()`` when it began to wait, or 0 (it has not).
        self.waiting_since = 0

    def begin(self) -> None:
        """It has to wait (the key is owned here, or a backend try failed)."""
        if not self.waiting_since:
            self.waiting_since = time.time_ns()
            instruments.waiters.add(1, self.attributes)

    def end(self, outcome: str) -> None:
        attributes = {**self.attributes, "aiotooz.outcome": outcome}
        instruments.wait_duration.record(time.perf_counter() - self.started, attributes)
        if self.waiting_since:
            instruments.waiters.add(-1, self.attributes)
            record_waited_acquire(self.attributes, self.waiting_since, time.time_ns(), outcome)


@final
@dataclass(eq=False)
class Hold:
    """One lock held through a coordinator: its key, its backend lock, and since when."""

    name: str
    key: str
    queue: KeyQueue
    handle: LockHandle
    #: When the try that was granted began: the earliest the backend can have started
    #: the lock's TTL.
    lease_start: float
    #: ``time.perf_counter()`` when it was granted (for logs and ordering only).
    acquired_at: float
    #: How many local hand-offs in a row brought the backend lock to this hold.
    handoffs: int = 0
    #: The fencing token of this grant, if one was asked for.
    fencing_token: int | None = None
    #: Its telemetry attributes (the backend, and the name if the settings say so).
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Why the lock is known to be gone, or ``None`` while it is believed held.
    lost_reason: str | None = None
    released: bool = False
    #: Called once when the lock is lost (``async with`` cancels its body through it).
    on_lost: Callable[[], object] | None = None
    #: Set when the lock is lost or released; made on demand by ``wait_ended()``.
    ended: anyio.Event | None = None

    @property
    def lost(self) -> bool:
        """The lock is known to be gone."""
        return self.lost_reason is not None


@final
class LockTable:
    """The locks of one coordinator: held and waited for, tried, handed over, lost.

    Args:
        state: the coordinator's connection and lifecycle, as it shares them (the table
            reads them; it never calls the coordinator).
        prefix: prepended to every lock name's key.
        log: the coordinator's bound logger.
        backend: the backend's scheme, for the telemetry.
        lock_names: whether telemetry carries lock names.
    """

    def __init__(
        self,
        state: CoordinatorState,
        prefix: str,
        log: Logger,
        backend: str,
        lock_names: bool = False,
    ) -> None:
        self._state = state
        self._log = log
        self._prefix = prefix
        # name -> key, for names used again and again (bounded: cleared when full).
        self._keys: dict[str, str] = {}
        self._tries = BackendTries(state, log)
        self._queues: dict[str, KeyQueue] = {}
        self._holds: set[Hold] = set()
        # Backend locks being handed from a releasing task to the next local waiter:
        # key -> the hold that released it. Taken by whoever owns the key's queue next.
        self._handed_over: dict[str, Hold] = {}
        #: The local state of each semaphore in use here, by name (``_semaphore.py``).
        self.semaphores: dict[str, SemaphoreQueue] = {}
        #: The local state of each read-write lock in use here, by name (``_rwlock.py``).
        self.rwlocks: dict[str, RWQueue] = {}
        self.lost_count: int = 0
        self._backend_attributes = {"aiotooz.backend": backend}
        self._lock_names = lock_names

    # -- what is held and waited for ---------------------------------------------------

    @property
    def held(self) -> int:
        """Backend locks held: by tasks, or being handed from one task to the next."""
        return len(self._holds) + len(self._handed_over)

    @property
    def names_waited_for(self) -> int:
        """Lock and semaphore names some task waits for (behind another task or process)."""
        queues = [*self._queues.values(), *(s.queue for s in self.semaphores.values())]
        return sum(1 for queue in queues if queue.tasks_waiting)

    @property
    def tasks_waiting(self) -> int:
        """Tasks waiting for a lock or a slot that another task or process holds."""
        queues = [*self._queues.values(), *(s.queue for s in self.semaphores.values())]
        return sum(queue.tasks_waiting for queue in queues)

    def holds_through(self, connection: Connection) -> list[Hold]:
        """The holds taken through ``connection`` that are not known to be lost."""
        return [h for h in self._holds if h.handle.connection is connection and not h.lost]

    def held_names(self) -> tuple[str, ...]:
        """The names held by tasks now, in the order they were acquired."""
        return tuple(h.name for h in sorted(self._holds, key=lambda h: h.acquired_at))

    # -- ending and loss ---------------------------------------------------------------

    def _end(self, hold: Hold) -> None:
        """``hold`` is released (or given up): it leaves the table."""
        hold.released = True
        self._holds.discard(hold)
        if hold.ended is not None:
            hold.ended.set()
        instruments.held.add(-1, hold.attributes)
        instruments.hold_duration.record(time.perf_counter() - hold.acquired_at, hold.attributes)

    def declare_lost(self, hold: Hold, reason: str, kind: str) -> None:
        """Record that ``hold`` is gone and tell its holder (once).

        ``kind`` is the reason in one word (``aiotooz._telemetry.LOSS_REASONS``).
        """
        if hold.lost or hold.released:
            return
        self._mark_lost(hold, reason, kind)
        if hold.ended is not None:
            hold.ended.set()
        if hold.on_lost is not None:
            hold.on_lost()

    def _mark_lost(self, hold: Hold, reason: str, kind: str) -> None:
        """Record ``hold``'s loss: its reason, the count, the telemetry and the log."""
        hold.lost_reason = reason
        self.lost_count += 1
        instruments.lost.add(1, {**hold.attributes, "aiotooz.reason": kind})
        self._log.warning(
            "lock lost",
            lock=hold.name,
            reason=reason,
            held=round(time.perf_counter() - hold.acquired_at, 6),
        )

    def declare_lost_through(self, connection: Connection, reason: str) -> None:
        """Every hold taken through ``connection`` is lost (it failed or was replaced)."""
        for hold in list(self._holds):
            if hold.handle.connection is connection:
                self.declare_lost(hold, reason, "connection")

    def check_lease(self, hold: Hold, now: float, stalled: bool = False) -> bool:
        """Apply the lease rule to ``hold`` now; ``True`` if it is (now) lost.

        ``stalled``: the event loop was found blocked just now (the watchdog woke late).
        """
        if hold.lost:
            return True
        ttl = hold.handle.connection.lock_ttl
        if ttl is None or hold.released:
            return False
        refreshed = max(hold.lease_start, self._state.last_refresh)
        if now - refreshed <= ttl * LEASE_SHARE:
            return False
        self.declare_lost(
            hold,
            f"no refresh reached the backend for {now - refreshed:.1f} s of the lock's "
            f"{ttl:g} s TTL (backend unreachable, or the event loop was blocked)",
            "stalled" if stalled else "expired",
        )
        return True

    async def wait_ended(self, hold: Hold) -> None:
        """Wait until ``hold`` is lost or released."""
        if hold.lost or hold.released:
            return
        if hold.ended is None:
            hold.ended = anyio.Event()
        await hold.ended.wait()

    async def watch_leases(self, ttl: float) -> None:
        """Apply the lease rule often enough (a twentieth of the TTL) to act in time."""
        interval = ttl / 20
        while True:
            before = anyio.current_time()
            await anyio.sleep(interval)
            now = anyio.current_time()
            # Woken a quarter of the TTL late: the event loop itself was blocked.
            stalled = now - before - interval > ttl / 4
            # Every hold was refreshed no earlier than the last beat: while that is
            # recent, none can have run out, and the sweep (a check per held lock, on
            # the event loop twenty times per TTL) is skipped. With thousands held it
            # took a quarter of the loop's time.
            if now - self._state.last_refresh <= ttl * LEASE_SHARE:
                continue
            for hold in list(self._holds):
                self.check_lease(hold, now, stalled)

    def _attributes(self, name: str) -> Mapping[str, str]:
        if not self._lock_names:
            return self._backend_attributes
        return {**self._backend_attributes, "aiotooz.lock": name}

    def _give_back(self, key: str, queue: KeyQueue) -> None:
        queue.give_back()
        if queue.idle and self._queues.get(key) is queue:
            del self._queues[key]

    @property
    def connection(self) -> Connection | None:
        """The coordinator's live connection; ``None`` while reconnecting or stopped."""
        return self._state.connection

    @property
    def task_id(self) -> Callable[[], int]:
        """Gives the current task's id (picked for the event loop at start)."""
        return self._state.task_id

    @property
    def start_soon_threadsafe(self) -> Callable[[Callable[[], Awaitable[object]]], None] | None:
        """Starts a task on the coordinator's event loop from any thread (a finalizer's)."""
        return self._state.start_soon_threadsafe

    @property
    def prefix(self) -> str:
        """What every key of this table starts with (the coordinator's prefix)."""
        return self._prefix

    # -- acquire -------------------------------------------------------------------------

    async def acquire(
        self,
        name: str,
        deadline: float,
        fencing: bool = False,
        key: str | None = None,
        once: bool = False,
    ) -> Hold | None:
        """Take ``name`` through the local queue and then the backend, and measure it.

        See :meth:`_acquire`; the wait and its outcome go to the telemetry. ``key``, if
        given, is the backend key to lock instead of the one ``name`` maps to (a
        semaphore's slot, see :func:`aiotooz._names.slot_key`). With ``once``, one try
        as for ``TRY_ONCE``, but given up at ``deadline`` if the backend hangs (a
        semaphore's slot tries within its budget).
        """
        attributes = self._attributes(name)
        wait = _Wait(attributes)
        outcome = "error"
        try:
            hold = await self._acquire(name, deadline, fencing, wait, attributes, key, once)
            outcome = "acquired" if hold is not None else "timeout"
            return hold
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            wait.end(outcome)

    async def _acquire(
        self,
        name: str,
        deadline: float,
        fencing: bool,
        wait: _Wait,
        attributes: Mapping[str, str],
        key: str | None = None,
        once: bool = False,
    ) -> Hold | None:
        """Take ``name`` through the local queue and then the backend.

        ``deadline`` is an ``anyio.current_time()`` instant, ``FOREVER``, or
        ``TRY_ONCE``. Returns ``None`` if the deadline passed first. With ``fencing``,
        every grant (a local hand-off too) gets a new token from the backend.

        Raises:
            LockAcquireFailed: this task holds ``name`` already (a wait would be a wait
                for itself).
        """
        self._tries.check_started()
        self._state.check_loop()
        if key is None:
            key = self._keys.get(name)
        if key is None:
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()
            key = self._keys[name] = backend_key(self._prefix, name, self._reserved_keys())
        task = self.task_id()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = KeyQueue()
        elif queue.owner == task and deadline != TRY_ONCE and not once:
            raise LockAcquireFailed(
                f"lock {name!r} is already held by this task: aiotooz locks are not "
                "reentrant (acquiring it again would wait for itself)"
            )
        started = wait.started
        granted: tuple[LockHandle, float, int | None] | None = None
        previous: Hold | None = None
        try:
            if queue.owner is not None or queue.waiting:
                wait.begin()
            if not await queue.take(task, TRY_ONCE if once else deadline):
                return None
            previous = self._take_handed_over(key)
            if previous is not None:
                try:
                    token = await self._tries.fence(previous.handle, previous.lease_start, fencing)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._tries.release(previous.handle, name, lost=True)
                    raise
                if token is False:
                    await self._tries.release(previous.handle, name, lost=True)
                    previous = None
                else:
                    granted = previous.handle, previous.lease_start, token
            if previous is None:

                def waiting() -> None:
                    wait.begin()
                    queue.owner_waits = True  # for statistics(): it waits for a process

                try:
                    granted = await self._tries.acquire(
                        key, deadline, fencing, queue.step_back_until, waiting, once
                    )
                finally:
                    queue.owner_waits = False
                queue.step_back_until = -math.inf
        except BaseException:
            if queue.owner == task:
                self._give_back(key, queue)
            if queue.owner is None:
                # Cancelled as the lock was handed to us, with nobody left to pass it to.
                orphan = self._handed_over.pop(key, None)
                if orphan is not None:
                    with anyio.CancelScope(shield=True):
                        await self._tries.release(orphan.handle, name)
            raise
        finally:
            if queue.idle:
                self._queues.pop(key, None)
        if granted is None:
            self._give_back(key, queue)
            return None
        handle, lease_start, token = granted
        now = time.perf_counter()
        hold = Hold(
            name=name,
            key=key,
            queue=queue,
            handle=handle,
            lease_start=lease_start,
            acquired_at=now,
            handoffs=previous.handoffs + 1 if previous is not None else 0,
            fencing_token=token,
            attributes=attributes,
        )
        self._holds.add(hold)
        instruments.held.add(1, attributes)
        self._log.debug("lock acquired", lock=name, key=key, waited=round(now - started, 6))
        return hold

    @property
    def keys_distinct(self) -> bool:
        """Whether a key found held is held under that very key, not one sharing its lock.

        Not so on PostgreSQL, where tooz maps every key to one of 65,536 advisory locks.
        """
        connection = self._state.connection
        return connection is None or connection.driver.key_space is None

    @property
    def shares_locks(self) -> bool | None:
        """Whether the backend has read-write locks; ``None`` while not connected."""
        connection = self._state.connection
        return None if connection is None else connection.shares_locks

    def check_loop(self) -> None:
        """Refuse a call from outside the coordinator's event loop (`WrongEventLoop`)."""
        self._state.check_loop()

    def owned_here(self, key: str) -> bool:
        """Whether a task of this table holds ``key``, or is taking it, now."""
        queue = self._queues.get(key)
        return queue is not None and queue.owner is not None

    async def watch(self, waits: Waits, keys: Sequence[str], armed: bool = True) -> bool:
        """Have ``waits`` watch ``keys`` through the current connection (`Waits.watch`)."""
        connection = self._state.connection
        return connection is not None and await waits.watch(connection, keys, armed)

    def backend_failed(self) -> None:
        """A try failed with ``BackendUnavailable``: have the heartbeat check the connection."""
        self._state.want_beat()

    async def release(self, hold: Hold) -> None:
        """Release ``hold`` at the backend, then hand the key to the next local waiter.

        A lost lock is still released at the backend when it was taken through the
        current connection: the driver's release checks ownership (token, lease, member
        id), and it stops tooz from refreshing the lock in later beats. A release the
        backend answers with "not ours" makes ``hold`` lost: it was lost while held.
        """
        if hold.released:
            return
        self._end(hold)
        if self._can_hand_over(hold):
            self._handed_over[hold.key] = hold
            self._give_back(hold.key, hold.queue)
            return
        try:
            if hold.handle.connection is self._state.connection:
                # Not shielded: a cancelled caller (or one whose backend hangs) stops
                # waiting, and the release still runs in its worker thread.
                ours = await self._tries.release(
                    hold.handle, hold.name, lost=True, contended=hold.queue.waiting > 0
                )
                if not ours and not hold.lost:
                    # Taken by another owner (or expired) since the last check: lost while
                    # held. Recorded for the holder (`lost`, and `LockLost` out of an
                    # `async with` block); nothing left to cancel, it is released.
                    self._mark_lost(
                        hold,
                        "the backend said at release that another owner had it, or that "
                        "it had expired",
                        "taken_over",
                    )
                if hold.handle.woken and hold.queue.waiting:
                    # Fairness: waiters elsewhere were woken by this release; the next
                    # waiter here lets them go first instead of winning the race.
                    hold.queue.step_back_until = anyio.current_time() + _STEP_BACK
        finally:
            self._give_back(hold.key, hold.queue)
            self._log.debug(
                "lock released",
                lock=hold.name,
                lost=hold.lost_reason,
                held=round(time.perf_counter() - hold.acquired_at, 6),
            )

    def release_dropped(self, hold: Hold) -> None:
        """``hold``'s lock object was garbage-collected while held: release it soon.

        Called from a finalizer, in any thread: the release runs as a task of the
        coordinator's event loop. Nothing happens if the loop is gone (the process is
        ending: the backend frees the lock with its TTL, session or process).
        """
        start = self.start_soon_threadsafe
        if start is None or hold.released:
            return

        async def release() -> None:
            self._log.warning("lock dropped while held; released", lock=hold.name)
            try:
                await self.release(hold)
            except Exception:  # nobody to raise it to
                self._log.exception("releasing a dropped lock failed", lock=hold.name)

        with contextlib.suppress(RuntimeError):  # the event loop is closed
            start(release)

    async def release_all(self, within: float) -> None:
        """On stop: declare every hold lost and release it, all within ``within`` s.

        Past the bound the rest are given up here and end with their TTL or session.
        """
        holds = list(self._holds)
        for hold in holds:
            self.declare_lost(hold, "the coordinator stopped", "stopped")
        with anyio.move_on_after(within):
            for hold in holds:
                await self.release(hold)
            for handed in list(self._handed_over.values()):
                await self._tries.release(handed.handle, handed.name, lost=True)
        for hold in holds:
            if not hold.released:
                self._end(hold)
                self._give_back(hold.key, hold.queue)
        self._handed_over.clear()

    def _can_hand_over(self, hold: Hold) -> bool:
        """Whether the next local waiter may take ``hold``'s backend lock as it is."""
        return (
            hold.queue.waiting > 0
            and hold.handoffs < MAX_LOCAL_HANDOFFS
            and hold.handle.connection is self._state.connection
            and self._state.started
            and not self.check_lease(hold, anyio.current_time())
        )

    def _take_handed_over(self, key: str) -> Hold | None:
        """The hold whose backend lock was handed to the new owner of ``key``, if any.

        A lock handed over through a connection that has since been replaced is gone.
        """
        previous = self._handed_over.pop(key, None)
        if previous is None or previous.handle.connection is not self._state.connection:
            return None
        return previous

    # -- what a held lock's primitive publishes beside it --------------------------------

    async def publish_leader(self, handle: LockHandle, member_id: str, token: int) -> None:
        """Name ``member_id`` as the leader holding ``handle`` (``NAMES_LEADER``)."""
        await handle.connection.publish_leader(handle, member_id, token)

    async def read_leader(self, name: str) -> str | None:
        """The member id of the leader holding the lock ``name`` now, or ``None``.

        Raises:
            BackendUnavailable: reconnecting, or the backend failed.
        """
        connection = self._state.connection
        if connection is None:
            raise BackendUnavailable(
                f"cannot tell who holds {name!r}: the coordinator is reconnecting to its backend"
            )
        return await connection.read_leader(
            backend_key(self._prefix, name, connection.reserved_keys)
        )

    async def read_record(self, handle: LockHandle) -> bytes | None:
        """The record kept beside ``handle``'s lock (``KEEPS_RECORDS``), or ``None``."""
        return await handle.read_record()

    async def write_record(self, handle: LockHandle, record: bytes, token: int) -> bool:
        """Replace the record beside ``handle``'s lock, fenced with ``token``."""
        return await handle.write_record(record, token)

    def _reserved_keys(self) -> frozenset[str]:
        connection = self._state.connection
        return connection.reserved_keys if connection is not None else frozenset()
