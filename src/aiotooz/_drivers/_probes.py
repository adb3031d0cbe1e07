"""Release probes: a waiter's thread that waits at the backend, in slices, for a release.

For backends that can wait server-side (or in the kernel) for a lock to come free but
cannot call back: ipc (PostgreSQL and MySQL wait in the server's queue instead, see
``_sessions``). A probe is a thread (with a connection of its
own where the backend needs one) that waits one slice at a time until the lock is free,
fires the waiter's signal, and ends; a waiter that stops waiting stops its probe, which
then ends within one slice. At most ``probe_limit`` run per coordinator: past that,
waiters poll.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import tooz.coordination

from ._base import Driver

__all__ = ["ProbingDriver"]


class ProbingDriver(Driver):
    """A driver whose waiters are woken by release probes."""

    #: Probes a coordinator runs at most (each is a thread, and perhaps a connection).
    probe_limit: ClassVar[int] = 4
    #: One wait of a probe at the backend, in seconds.
    probe_slice: ClassVar[float] = 1.0

    def __init__(self, coordinator: tooz.coordination.CoordinationDriver, call_timeout: float):
        super().__init__(coordinator, call_timeout)
        #: Probes running: lock object id -> the event that stops its probe.
        self._probes: dict[int, threading.Event] = {}
        #: A probe's connection left for the next try of its key (which saves a connect).
        self._spares: dict[Any, Any] = {}
        self._probes_guard = threading.Lock()

    @property
    def release_watchers(self) -> int:
        return len(self._probes)

    def arm_release_watch(self, lock: Any, fire: Callable[..., object]) -> bool:
        """Start a probe for ``lock`` (unless one runs, or ``probe_limit`` do)."""
        if not self.taken(lock):
            return True
        with self._probes_guard:
            if id(lock) in self._probes or len(self._probes) >= self.probe_limit:
                return False
            stop = self._probes[id(lock)] = threading.Event()
        threading.Thread(
            target=self._probe, args=(lock, fire, stop), name="aiotooz-probe", daemon=True
        ).start()
        return False

    def disarm_release_watch(self, lock: Any) -> None:
        with self._probes_guard:  # the probe checks ``stop`` under it before leaving a spare
            stop = self._probes.get(id(lock))
            if stop is not None:
                stop.set()  # the probe ends within one slice
            spare = self._spares.pop(lock.name, None)
        if spare is not None:
            self._close_quietly(spare)

    def take_spare(self, lock: Any) -> Any:
        """The connection a probe left for ``lock``'s next try, or ``None``."""
        with self._probes_guard:
            return self._spares.pop(lock.name, None)

    def stop(self) -> None:
        with self._probes_guard:
            for stop in self._probes.values():
                stop.set()
            spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            self._close_quietly(spare)
        super().stop()

    def _probe(self, lock: Any, fire: Callable[..., object], stop: threading.Event) -> None:
        try:
            connection = self._probe_connection()
            try:
                while not stop.is_set():
                    if self._wait_free(connection, lock):
                        if self._ready_for_try(connection):
                            with self._probes_guard:
                                previous = None
                                if not stop.is_set():  # else nobody would close it
                                    previous = self._spares.pop(lock.name, None)
                                    self._spares[lock.name] = connection
                                    connection = None
                            if previous is not None:
                                self._close_quietly(previous)
                        fire()
                        return
            finally:
                if connection is not None:
                    self._close_probe(connection)
        except Exception:
            fire()  # trouble at the backend: let the waiter try again (and poll)
        finally:
            with self._probes_guard:
                self._probes.pop(id(lock), None)

    @abc.abstractmethod
    def taken(self, lock: Any) -> bool:
        """Whether the backend shows ``lock`` taken (by anyone); ``False`` if unsure."""

    @abc.abstractmethod
    def _probe_connection(self) -> Any:
        """What a probe waits through: a new connection, say."""

    def _close_probe(self, connection: Any) -> None:
        connection.close()

    def _close_quietly(self, connection: Any) -> None:
        try:
            self._close_probe(connection)
        except Exception:
            pass

    def _ready_for_try(self, connection: Any) -> bool:
        """Make a probe's connection fit for a try; whether it is (else it is closed)."""
        return False

    @abc.abstractmethod
    def _wait_free(self, connection: Any, lock: Any) -> bool:
        """Wait at most ``probe_slice`` seconds for ``lock`` to be free; whether it is."""
