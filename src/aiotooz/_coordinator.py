"""The coordinator: one connection to a backend, kept alive, and the locks taken through it."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import final

import anyio

from ._connection import Connection, open_connection
from ._exceptions import (
    BackendUnavailable,
    ConfigurationError,
    CoordinationError,
    LockCreationFailed,
)
from ._holders import Holder, break_lock, list_holders, read_holder
from ._leadership import Leadership, read_leader, run_as_leader
from ._lock import Blocking, Lock
from ._locktable import LockTable
from ._logging import get_logger
from ._names import check_prefix
from ._process import is_default, set_default_coordinator
from ._settings import CoordinationSettings
from ._state import CoordinatorState
from ._tasks import BackgroundTask, spawn, task_id_getter, threadsafe_starter
from ._telemetry import instruments, register_coordinator, unregister_coordinator

__all__ = ["Coordinator", "CoordinatorStatistics"]


@final
@dataclass(frozen=True)
class CoordinatorStatistics:
    """What a coordinator holds and does now, from `Coordinator.statistics()`."""

    #: Locks held at the backend through this coordinator (by a task, or being handed
    #: from one task to the next).
    locks_held: int
    #: Lock and semaphore names that tasks of this coordinator wait for.
    names_waited_for: int
    #: Tasks waiting for a lock or slot that another task or process holds (the task
    #: trying the backend for a local queue is one of them while its tries fail).
    tasks_waiting: int
    #: Worker threads of the current connection that are alive.
    threads: int
    #: Threads parked to wake waiters when a lock is released: release probes
    #: (PostgreSQL, MySQL, ipc) and etcd watch streams, each bounded per coordinator.
    release_watchers: int
    #: Started, and not in the middle of reconnecting.
    connected: bool
    #: Reconnects since the coordinator was created.
    reconnects: int
    #: Locks lost while held, since the coordinator was created.
    locks_lost: int
    #: The names held by tasks now, in the order they were acquired.
    held_names: tuple[str, ...]


@final
class Coordinator:
    """An asyncio-native (anyio) front to one tooz coordination backend.

    Connects on [`start()`][aiotooz.Coordinator.start], runs the heartbeat and reconnect as
    background tasks, and gives out [`Lock`][aiotooz.Lock] objects. Use it as an async
    context manager:

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
        self.prefix: str = check_prefix(prefix)
        self.agent_id: str = agent_id or str(uuid.uuid4())
        self.member_id: str = self.prefix + self.agent_id
        self.settings: CoordinationSettings = (
            settings if settings is not None else CoordinationSettings()
        )
        self._log = get_logger(agent_id=self.agent_id, backend=self.settings.scheme)
        # Written here only; the lock table and its tries read it (calls go down only).
        self._state = CoordinatorState(self.member_id, self.settings.redacted_backend_url)
        # Package-internal: the primitives (Lock, Semaphore, RWLock, Leadership) and
        # the holder queries take and read locks through it.
        self._lock_table = LockTable(
            self._state,
            self.prefix,
            self._log,
            backend=self.settings.scheme,
            lock_names=self.settings.metrics_lock_names,
        )
        self._background: list[BackgroundTask] = []
        self._reconnects = 0

    def __repr__(self) -> str:
        return self._state.describe()

    # -- state ---------------------------------------------------------------------------

    @property
    def is_started(self) -> bool:
        """``start()`` has completed and ``stop()`` has not been called since."""
        return self._state.started

    @property
    def is_connected(self) -> bool:
        """Started, and not in the middle of reconnecting to the backend."""
        return self._state.started and self._state.connection is not None

    def statistics(self) -> CoordinatorStatistics:
        """What this coordinator holds and does now (locks, waiters, threads, reconnects)."""
        table, connection = self._lock_table, self._state.connection
        return CoordinatorStatistics(
            locks_held=table.held,
            names_waited_for=table.names_waited_for,
            tasks_waiting=table.tasks_waiting,
            threads=connection.threads if connection is not None else 0,
            release_watchers=connection.driver.release_watchers if connection is not None else 0,
            connected=self.is_connected,
            reconnects=self._reconnects,
            locks_lost=table.lost_count,
            held_names=table.held_names(),
        )

    # -- who holds a lock ----------------------------------------------------------------

    async def holder(self, name: str) -> Holder | None:
        """Who holds the lock ``name`` now, in any process, or ``None`` if nobody does.

        Read from the holder record each grant writes with it (on PostgreSQL and MySQL,
        from the server's own lock tables), so an ended hold is never named. Fields the
        backend cannot know are ``None`` (see the operations docs).

        Raises:
            LockNameError: ``name`` is not a non-empty ``str``.
            UnsupportedOperation: the backend cannot say who holds a lock (ipc,
                memcached); it names the backends that can.
            LockCreationFailed: the coordinator is not started.
            BackendUnavailable: the backend failed, or the coordinator is reconnecting.
        """
        return await read_holder(self, name)

    def holders(self, prefix: str = "") -> AsyncIterator[Holder]:
        """The holders of the locks held now under this coordinator's prefix and ``prefix``.

        ``async for holder in coordinator.holders("volume-"):``, in the order of the
        backend's keys. A name mapped to a hashed key (see the lock names docs) is shown
        as that key; on PostgreSQL, whose keys are hashes, every name is.

        Raises:
            UnsupportedOperation: the backend cannot list its locks (memcached has no
                key listing, ipc none either); it names the backends that can.
            LockCreationFailed: the coordinator is not started.
            BackendUnavailable: the backend failed, or the coordinator is reconnecting.
        """
        return list_holders(self, prefix)

    async def break_lock(self, name: str) -> bool:
        """Free the lock ``name``, which another process holds; ``False`` if nobody held it.

        The fencing counter moves past the holder's token first, so the next holder's
        token is larger and a fenced write of the old holder is refused; the old holder
        is told within its heartbeat: its block is cancelled and raises
        [`LockLost`][aiotooz.LockLost] with a reason that says the lock was broken.
        Counted by the ``aiotooz.lock.breaks`` metric.

        Raises:
            UnsupportedOperation: no process but the holder's can free the lock on this
                backend (file and ipc locks belong to a process; a PostgreSQL or MySQL
                session holds every lock of its coordinator): the message names the
                holder's pid and host and what to do instead.
            LockCreationFailed: the coordinator is not started.
            BackendUnavailable: the backend failed, or the coordinator is reconnecting.
        """
        return await break_lock(self, name)

    def check_loop(self) -> None:
        """Raise `WrongEventLoop` outside the event loop and process that started it."""
        self._state.check_loop()

    async def wait_connected(self) -> None:
        """Wait until the coordinator is started and connected to its backend."""
        self.check_loop()
        while not self.is_connected:
            await self._state.next_change()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the backend and start the heartbeat. Does nothing if started.

        Raises:
            ConfigurationError: the backend URL, scheme or client library is wrong.
            BackendUnavailable: the backend cannot be reached.
        """
        if self._state.started:
            self.check_loop()
            return
        connecting = anyio.current_time()
        connection = await self._connect()
        ttl = connection.lock_ttl
        if ttl is not None and self.settings.heartbeat >= ttl / 2:
            await connection.close()
            raise ConfigurationError(
                f"heartbeat ({self.settings.heartbeat} s) must be under half the lock TTL "
                f"this backend guarantees ({ttl:g} s), or held locks would expire between "
                "beats: lower AIOTOOZ_HEARTBEAT or raise the URL's lock_timeout"
            )
        state = self._state
        state.connection = connection
        state.last_refresh = connecting
        state.task_id = task_id_getter()
        state.start_soon_threadsafe = threadsafe_starter()
        state.home.enter()
        state.started = True
        register_coordinator(self)
        state.changed()
        if connection.requires_beating:
            self._background.append(
                spawn(self._beat_forever, name=f"aiotooz heartbeat {self.member_id}")
            )
        if ttl is not None:
            self._background.append(
                spawn(
                    lambda: self._lock_table.watch_leases(ttl),
                    name=f"aiotooz leases {self.member_id}",
                )
            )
        self._log.info(
            "coordinator started",
            backend_url=self.settings.redacted_backend_url,
            heartbeat=self.settings.heartbeat if connection.requires_beating else None,
        )

    async def stop(self) -> None:
        """Release every lock held through this coordinator, stop beating, disconnect.

        Does nothing if not started. Works from any task and inside any cancel scope:
        it runs shielded to the end (each backend call bounded by the settings'
        ``call_timeout``), and a cancellation of the caller is delivered after it.
        Tasks still waiting for a lock get [`LockCreationFailed`][aiotooz.LockCreationFailed]; a
        holder inside ``async with lock:`` is cancelled and gets
        [`LockLost`][aiotooz.LockLost]; a lock taken with ``acquire()`` can still be
        ``release()``-d without error.
        """
        if not self._state.started:
            return
        self.check_loop()
        self._state.started = False
        with anyio.CancelScope(shield=True):
            background, self._background = self._background, []
            for task in background:
                task.cancel()
            for task in background:
                await task.wait()
            await self._lock_table.release_all(within=self.settings.call_timeout)
            connection, self._state.connection = self._state.connection, None
            if connection is not None:
                await connection.close()
        unregister_coordinator(self)
        self._state.home.leave()
        self._state.changed()
        if is_default(self):
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

    def get_lock(self, name: str) -> Lock:
        """A [`Lock`][aiotooz.Lock] named ``name`` on this coordinator.

        Raises:
            LockCreationFailed: the coordinator is not started.
            LockNameError: ``name`` is not a non-empty ``str``.
        """
        if not self._state.started:
            raise LockCreationFailed(
                f"{self!r} is not started: use 'async with coordinator:' or "
                "'await coordinator.start()' before asking it for locks"
            )
        return Lock(name, coordinator=self)

    def leadership(self, name: str, *, blocking: Blocking = True) -> Leadership:
        """Lead ``name`` through this coordinator: ``Leadership(name, coordinator=self)``.

        ``async with coordinator.leadership("scheduler") as term:``; see
        [`Leadership`][aiotooz.Leadership]. Lock names starting with
        ``"aiotooz.leader."`` are reserved for it.

        Raises:
            LockNameError: ``name`` is not a non-empty ``str``.
            ConfigurationError: ``blocking`` is not a bool or a number >= 0.
        """
        return Leadership(name, coordinator=self, blocking=blocking)

    async def leader(self, name: str) -> str | None:
        """The member id of the process leading ``name`` now, or ``None``.

        Answers from any process on the backend, campaigning or not; how fresh the
        answer is depends on the backend (see the leadership docs). A process whose
        term has ended is never named.

        Raises:
            LockCreationFailed: the coordinator is not started.
            BackendUnavailable: the backend failed, or the coordinator is reconnecting.
            WrongEventLoop: the coordinator was started in another event loop.
        """
        return await read_leader(self, name)

    async def run_as_leader(self, name: str, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``await job()`` whenever this process leads ``name``, forever.

        Campaigns (waiting as long as it takes), runs ``job`` in the term, and after the
        term ends campaigns again following a short random pause: when leadership is
        lost (``job`` is cancelled), when the backend fails while campaigning, and when
        ``job`` returns (which gives leadership up, so another process may take it).

        Returns only when cancelled; an exception of ``job``'s own is raised as is.

        Raises:
            TypeError: ``job`` is not callable (at once, before campaigning).
        """
        await run_as_leader(self, name, job)

    # -- heartbeat and reconnect ---------------------------------------------------------

    async def _connect(self) -> Connection:
        return await open_connection(
            self.settings.backend_url, self.member_id, self.settings.call_timeout
        )

    async def _beat_forever(self) -> None:
        state = self._state
        while True:
            # Beats start a heartbeat apart, however long the last one took: a beat of
            # many locks, or on a loaded machine, must not stretch the time between
            # refreshes (the lease rule counts from a beat's start). A tenth of it at
            # least, so that nothing can make this loop spin.
            wait = beat = self.settings.heartbeat
            if state.last_beat > -math.inf:
                wait = max(beat / 10, state.last_beat + beat - anyio.current_time())
            await state.beat_wanted(wait)  # or sooner, if a failed try wants a beat
            connection = state.connection
            if connection is None:
                continue
            try:
                await self._beat(connection)
            except BackendUnavailable as exc:
                self._log.warning("heartbeat failed; reconnecting", error=str(exc))
                await self._reconnect(connection)
            except CoordinationError as exc:
                self._log.warning("heartbeat failed", error=str(exc))
            except Exception:
                # A bug here must not end the heartbeat: there is nobody to raise it to.
                self._log.exception("heartbeat crashed; still beating")

    async def _beat(self, connection: Connection) -> None:
        holds = self._lock_table.holds_through(connection)
        started = self._state.last_beat = anyio.current_time()
        owned = await connection.heartbeat([hold.handle for hold in holds])
        if connection is self._state.connection:
            self._state.last_refresh = started
        for hold, still_ours in zip(holds, owned, strict=True):
            if still_ours is False and await connection.was_broken(hold.handle):
                self._lock_table.declare_lost(
                    hold, "the lock was broken: another process freed it (break_lock)", "broken"
                )
            elif still_ours is False:
                self._lock_table.declare_lost(
                    hold,
                    "the backend says another owner has it, or it expired, or the session "
                    "that held it ended",
                    "taken_over",
                )

    async def _reconnect(self, old: Connection) -> None:
        """Replace ``old`` with a new connection, backing off with jitter between tries.

        Locks held through ``old`` are lost: a new connection does not own them.
        """
        self._state.connection = None
        self._state.changed()
        self._lock_table.declare_lost_through(old, "the connection to the backend failed")
        await old.close()
        base = self.settings.initial_reconnect_backoff
        cap = self.settings.max_reconnect_backoff
        backoff = base
        attempt = 0
        while True:
            attempt += 1
            connecting = anyio.current_time()
            try:
                connection = await self._connect()
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
            self._state.connection = connection
            self._state.last_refresh = connecting
            self._reconnects += 1
            instruments.reconnects.add(1, {"aiotooz.backend": self.settings.scheme})
            self._state.changed()
            self._log.info("reconnected to backend", attempt=attempt)
            return
