"""``@once_per``: a scheduled job that runs once per time window across replicas.

Time is cut into windows of ``every`` seconds aligned to the Unix epoch, so every
replica computes the same window from its own clock. A call takes the fenced lock named
``ONCE_NAMESPACE + name``, reads the record the backend keeps beside it
(``Capability.KEEPS_RECORDS``: the start of the last window claimed, and whether its run
finished), and runs the job only if this window is not claimed yet, writing the claim
first. The record, not the lock, is what stops a second run: a replica whose clock or
scheduler is late takes the free lock after the first run ended and finds the window
claimed.

Records are written with the grant's fencing token, and the backend refuses a write from
a holder whose lock has passed on (see ``Driver.write_record``), so a stale runner can
never overwrite a later claim.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import math
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, final

from ._exceptions import ConfigurationError, LockAcquireFailed, LockLost
from ._lock import Lock, held_handle
from ._logging import get_logger
from ._names import call_namer, check_name, format_fields

if TYPE_CHECKING:  # the coordinator module imports ours indirectly, never the reverse
    from ._coordinator import Coordinator

__all__ = ["ONCE_NAMESPACE", "WindowClaim", "check_every", "once_per"]

P = ParamSpec("P")
T = TypeVar("T")

#: Lock names that start with this are reserved for ``@once_per``: ``once_per("x", ...)``
#: takes the lock named ``"aiotooz.once.x"``.
ONCE_NAMESPACE: Final = "aiotooz.once."

_MICROSECONDS: Final = 1_000_000
#: The state of a claimed window, in its record: claimed and running (or died running),
#: and finished (written only with ``finish_required``).
_STARTED: Final = b"started"
_FINISHED: Final = b"finished"


def check_every(every: object) -> int:
    """``every`` (a ``timedelta`` or seconds, at least 1 s) in whole microseconds.

    Raises:
        ConfigurationError: ``every`` is not a duration of at least one second.
    """
    if isinstance(every, datetime.timedelta):
        micros = every // datetime.timedelta(microseconds=1)
    elif isinstance(every, int | float) and not isinstance(every, bool) and math.isfinite(every):
        micros = round(every * _MICROSECONDS)
    else:
        micros = -1
    if micros < _MICROSECONDS:
        raise ConfigurationError(
            "every must be a datetime.timedelta or a number of seconds, at least 1 s (e.g. "
            f"timedelta(minutes=15) or 900), not {every!r}"
        )
    return micros


def _utc(micros: int) -> str:
    """A window's edge for logs and errors: ISO 8601 in UTC."""
    moment = datetime.datetime.fromtimestamp(micros / _MICROSECONDS, datetime.UTC)
    return moment.isoformat(timespec="milliseconds")


@final
class WindowClaim:
    """One attempt to claim the current window of ``name`` (package-internal).

    ``async with WindowClaim(...) as claim:`` computes the window, takes the lock and
    reads the record; ``claim.claimed`` says whether this call claimed the window (the
    lock is then held until the block ends) or not (nothing is held). A body that did
    its work calls ``finish()`` before the block ends.

    Args:
        name: the job's name (its lock is ``ONCE_NAMESPACE + name``).
        every: the window length in microseconds (see `check_every`).
        coordinator: the coordinator to lock through; the default one if ``None``.
        finish_required: a window counts as done only once it is finished, not
            claimed: a claim whose runner died or lost its lock first may be made again.
        cancel_on_loss: as for [`Lock`][aiotooz.Lock]; the CLI handles a loss itself.
    """

    __slots__ = ("_finish_required", "_lock", "_log", "_token", "claimed", "every", "name", "start")

    def __init__(
        self,
        name: str,
        every: int,
        *,
        coordinator: Coordinator | None = None,
        finish_required: bool = False,
        cancel_on_loss: bool = True,
    ) -> None:
        self.name = check_name(name)
        self.every = every
        self._finish_required = finish_required
        self._lock = Lock(
            ONCE_NAMESPACE + name,
            coordinator=coordinator,
            fencing=True,
            cancel_on_loss=cancel_on_loss,
        )
        self._log = get_logger(once_per=name)
        self._token = 0
        #: The start of the window this call computed, in microseconds since 1970 (UTC).
        self.start = 0
        #: This call claimed its window: the job runs, with the lock held.
        self.claimed = False

    @property
    def lock(self) -> Lock:
        """The lock held while the job runs."""
        return self._lock

    async def __aenter__(self) -> WindowClaim:
        now = time.time_ns() // 1000
        self.start = now - now % self.every
        end = self.start + self.every
        window = _utc(self.start)
        try:
            # The lock is busy while a job runs (this window's or a late previous one's):
            # wait for it, but no longer than this window lasts.
            await self._lock((end - now) / _MICROSECONDS).__aenter__()
        except LockAcquireFailed:
            self._log.debug("window not claimed: the lock was busy until its end", window=window)
            return self
        try:
            table, handle = self._lock.coordinator._lock_table, held_handle(self._lock)
            self._token = self._lock.fencing_token
            record = await table.read_record(handle)
            claimed_start, _, state = (record or b"").partition(b" ")
            if record is not None and self._taken(int(claimed_start), state):
                self._log.debug(
                    "window already claimed", window=window, claimed=_utc(int(claimed_start))
                )
                await self._lock.__aexit__(None, None, None)
                return self
            claim = b"%d %s" % (self.start, _STARTED)
            if not await table.write_record(handle, claim, self._token):
                raise self._lost("the claim was refused")
        except BaseException as exc:
            if self._lock.locked():
                await self._lock.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self.claimed = True
        self._log.debug("window claimed", window=window, fencing_token=self._token)
        return self

    def _taken(self, claimed_start: int, state: bytes) -> bool:
        """Whether a record naming ``claimed_start`` and ``state`` covers this window.

        A later window's claim covers it too: a replica whose clock lags never runs a
        window after a later one ran.
        """
        if claimed_start != self.start:
            return claimed_start > self.start
        return not self._finish_required or state == _FINISHED

    async def finish(self) -> None:
        """Record that this window's job finished (with ``finish_required`` only).

        Raises:
            LockLost: the record was refused: the lock passed to another holder.
        """
        if not (self.claimed and self._finish_required):
            return
        table = self._lock.coordinator._lock_table
        record = b"%d %s" % (self.start, _FINISHED)
        if not await table.write_record(held_handle(self._lock), record, self._token):
            raise self._lost("the finish was refused")

    def _lost(self, what: str) -> LockLost:
        reason = f"{what}: the lock passed to another holder (fencing token {self._token})"
        return LockLost(
            f"once_per {self.name!r}, window {_utc(self.start)}: {reason}",
            lock_name=self._lock.name,
            reason=reason,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.claimed:
            await self._lock.__aexit__(exc_type, exc, tb)


def once_per(
    name: str,
    every: datetime.timedelta | float,
    *,
    coordinator: Coordinator | None = None,
    finish_required: bool = False,
) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T | None]]]:
    """Run the decorated ``async def`` at most once per window of ``every``, across replicas.

    Windows are aligned to multiples of ``every`` since the Unix epoch (UTC), so every
    replica computes the same ones: with ``every=timedelta(hours=1)`` a window is a
    whole clock hour. Each call takes the lock of ``name``, reads the window record the
    backend keeps beside it, and runs the function only if no call (in any process)
    has claimed this window yet, recording the claim, with the grant's fencing token,
    before the function starts. It then returns the function's result; a call that finds
    the window claimed returns ``None`` at once without running it (and logs a debug
    event). A call waits for the lock while another call's job runs, at most until its
    window ends.

    A window is claimed once for good by default (at most once: a run that crashes
    or loses its lock is not repeated). With ``finish_required=True`` the record also
    marks the run finished when the function returns, and a window whose run did not
    finish (its process died, it lost its lock, it raised) may be claimed again by the
    next call (at least once).

    The name is a format string over the call's arguments and ``f_name``, as for
    [`@synchronized`][aiotooz.synchronized]. The record is kept on every backend but
    memcached, which may evict it (a call there raises `UnsupportedOperation`).

    Args:
        name: the job's name template; the lock is ``"aiotooz.once." + name``.
        every: the window length: a ``datetime.timedelta`` or seconds, at least 1 s.
        coordinator: the coordinator to lock through; without one, the default
            coordinator is looked up at each call.
        finish_required: count a window as done only once its run finished.

    Raises:
        ConfigurationError: (at decoration) ``every`` is shorter than 1 s or not a duration.
        TypeError: the decorated function is not an ``async def``.
        LockNameError: (at decoration) a field of ``name`` is not a parameter of the
            function; (at call) a field cannot be formatted from the arguments.
        UnsupportedOperation: (at call) the backend keeps no records (memcached).
        LockLost: (at call) the lock was lost while the function ran.
    """
    format_fields(check_name(name))
    micros = check_every(every)

    def decorate(
        func: Callable[P, Coroutine[Any, Any, T]],
    ) -> Callable[P, Coroutine[Any, Any, T | None]]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"@once_per decorates async functions; {func.__qualname__} is not an 'async def'"
            )
        name_for = call_namer(name, func)

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | None:
            claim = WindowClaim(
                name_for(*args, **kwargs),
                micros,
                coordinator=coordinator,
                finish_required=finish_required,
            )
            async with claim:
                if not claim.claimed:
                    return None
                result = await func(*args, **kwargs)
                await claim.finish()
                return result

        return wrapper

    return decorate
