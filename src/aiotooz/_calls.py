"""How a connection calls its driver, and the one place errors are translated.

A call goes one of three ways, chosen per connection when it opens:

- in a worker thread of one of two lanes (see :mod:`aiotooz._bridge`): the *acquire*
  lane runs short, non-blocking tries (never a wait: waiting is done in async code, so
  no thread is ever parked on a busy lock); the *control* lane runs releases,
  heartbeats and the stop, so that they never queue behind tries;
- *inline*, on the event loop thread itself, for a driver whose calls are local system
  calls (``Capability.LOCAL_CALLS``: ``fcntl`` on a local file), cheaper than any
  thread hop, until they prove slow (then the lanes, for good);
- *native*, on the event loop through the driver's asyncio client
  (``Capability.NATIVE_ASYNC``, on asyncio only).

Every call waits at most the call timeout (and not at all once its caller is
cancelled). Every tooz or client-library exception is translated here, once, into the
:mod:`aiotooz._exceptions` tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Generic, TypeVar, cast, final

import anyio
import anyio.lowlevel
import tooz
import tooz.coordination

from ._bridge import CallTimedOut, Lane, LaneClosed, Schedule, call_soon, run_in_lane
from ._exceptions import BackendUnavailable, CoordinationError, UnsupportedOperation
from ._urls import redact_url, scheme_of

__all__ = ["Calls", "translate"]

T = TypeVar("T")

#: An inline call slower than this (seconds) counts as slow; after ``_INLINE_STRIKES``
#: slow calls in a row (a lock directory on a slow or network file system) the
#: connection sends its calls to the worker lanes for good.
_INLINE_LIMIT: Final = 0.002
_INLINE_STRIKES: Final = 3


@final
class _Flight(Generic[T]):
    """A call running in a task of its own (:meth:`Calls.natively_in_a_task`).

    Whoever sees it end last cleans up after it: its caller, or, once the caller has
    left, the task itself.
    """

    __slots__ = ("_submit", "_undo", "_unknown", "answer", "answered", "ended", "error", "left")

    def __init__(
        self,
        undo: Callable[[T], object],
        unknown: Callable[[], object],
        submit: Callable[[Callable[[], object]], None],
    ) -> None:
        self._undo = undo
        self._unknown = unknown
        #: Runs a clean-up in a worker thread, with nobody waiting for it.
        self._submit = submit
        self.answer: T | None = None
        self.answered = False
        self.error: Exception | None = None
        #: The call has its answer, an error, or no answer in time.
        self.ended = False
        #: Its caller stopped waiting before it ended.
        self.left = False

    def end(self) -> None:
        """From the call's task, as it ends."""
        self.ended = True
        if self.left:
            self.clean_up()

    def leave(self) -> None:
        """From the caller, as it stops waiting: clean up now if the call has ended."""
        if self.ended:
            self.clean_up()
        else:
            self.left = True

    def clean_up(self) -> None:
        """Undo the call's answer, or, without one, whatever effect it may have had."""
        if self.answered:
            undo, answer = self._undo, cast("T", self.answer)
            self._submit(lambda: undo(answer))
        else:
            self._submit(self._unknown)


def translate(exc: BaseException, action: str, url: str) -> CoordinationError:
    """Map a tooz or client-library exception to ours (the one place this happens)."""
    where = f"{action} on {redact_url(url)}"
    if isinstance(exc, CoordinationError):
        return exc
    if isinstance(exc, tooz.NotImplemented):
        return UnsupportedOperation(f"{where}: the backend does not support this ({exc})")
    if isinstance(exc, tooz.coordination.ToozConnectionError):
        return BackendUnavailable(f"{where}: cannot reach the backend ({exc})")
    if isinstance(exc, tooz.ToozError):
        return BackendUnavailable(f"{where}: the backend failed ({exc})")
    # Raw client-library and OS errors that tooz lets through (kazoo, etcd3gw, OSError).
    return BackendUnavailable(f"{where}: {type(exc).__name__}: {exc}")


@final
class Calls:
    """One connection's ways to call its driver: its lanes, inline, and native.

    Args:
        url: the backend URL (redacted in every message).
        call_timeout: the longest a caller waits for one call.
        schedule: runs a callback on the event loop from any thread.
        inline: tries and releases run on the event loop thread (``LOCAL_CALLS``).
        native: tries and releases run through the driver's asyncio client.
    """

    def __init__(
        self, url: str, call_timeout: float, schedule: Schedule, *, inline: bool, native: bool
    ) -> None:
        self.url = url
        self.call_timeout = call_timeout
        scheme = scheme_of(url)
        self.acquire_lane = Lane(f"aiotooz-acquire {scheme}", 2)
        self.control_lane = Lane(f"aiotooz-control {scheme}", 2)
        self.schedule = schedule
        #: Tries and releases run on the event loop thread (until they prove slow).
        self.inline = inline
        #: Tries and releases run through the driver's asyncio client.
        self.native = native
        self._slow_inline_calls = 0
        #: The driver's calls on the event loop (native calls, watches) running now, and
        #: whether new ones are refused: the driver's asyncio client must outlive them.
        self._loop_calls = 0
        self._loop_calls_closed = False
        self._loop_calls_ended: anyio.Event | None = None
        #: The tasks of ``natively_in_a_task`` (asyncio keeps only a weak reference).
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def threads(self) -> int:
        """How many worker threads of this connection are alive."""
        return len(self.acquire_lane.threads) + len(self.control_lane.threads)

    async def in_lane(
        self,
        lane: Lane,
        action: str,
        func: Callable[[], T],
        *,
        wait: float | None = None,
        abandoned: Callable[[T], object] | None = None,
        must_run: bool = False,
    ) -> T:
        """Run ``func`` in ``lane``, waiting at most ``wait`` or the call timeout.

        Raises:
            CallTimedOut: only when ``wait`` is given and shorter than the call timeout
                (the caller's own deadline passed first).
            BackendUnavailable: the backend failed, did not answer within the call
                timeout, or the connection is closed.
        """
        limit = self.call_timeout if wait is None else min(wait, self.call_timeout)
        try:
            return await run_in_lane(lane, self.schedule, func, limit, abandoned, must_run)
        except LaneClosed:
            raise BackendUnavailable(
                f"{action} on {redact_url(self.url)}: the connection is closed"
            ) from None
        except CallTimedOut:
            if limit < self.call_timeout:
                raise
            raise BackendUnavailable(self._no_answer(action)) from None
        except CoordinationError:
            raise
        except Exception as exc:
            raise translate(exc, action, self.url) from exc

    async def in_control_lane(self, action: str, func: Callable[[], T]) -> T:
        """A call about the connection or another process's lock: the control lane."""
        return await self.in_lane(self.control_lane, action, func)

    async def on_loop(self, action: str, func: Callable[[], T]) -> T:
        """Run a microsecond, never-waiting call on the event loop thread itself.

        A checkpoint comes first, as with any await, so no cancellation can come between
        the call and its outcome reaching the caller.
        """
        await anyio.lowlevel.checkpoint()
        return self.run_inline(action, func)

    async def quick(self, action: str, func: Callable[[], T]) -> T:
        """A short call about a held lock: inline where tries are, else in the acquire lane."""
        if self.inline:
            return await self.on_loop(action, func)
        return await self.in_lane(self.acquire_lane, action, func)

    async def natively(
        self,
        action: str,
        call: Callable[[], Awaitable[T]],
        wait: float | None,
        on_give_up: Callable[[], object],
    ) -> T:
        """Run a driver's call on the event loop, waiting at most ``wait`` or the call timeout.

        For a call that may be sent twice (a release: compare and delete). One given up
        on — cancelled, past its time, or failed mid-flight — may or may not reach the
        backend: ``on_give_up`` (a blocking release, which only frees what is still
        ours) then runs in a worker thread, whichever arrives first. A try must not be
        cut short: see :meth:`natively_in_a_task`.

        Raises:
            CallTimedOut: only when ``wait`` is given and shorter than the call timeout.
            BackendUnavailable: the backend failed or did not answer within the call
                timeout.
        """
        limit = self.call_timeout if wait is None else min(wait, self.call_timeout)
        try:
            with self.on_loop_call(action), anyio.move_on_after(limit) as scope:
                result = await call()
        except BaseException as exc:
            call_soon(self.control_lane, self.schedule, on_give_up)
            if isinstance(exc, Exception) and not isinstance(exc, CoordinationError):
                raise translate(exc, action, self.url) from exc
            raise
        if scope.cancelled_caught:
            call_soon(self.control_lane, self.schedule, on_give_up)
            if limit < self.call_timeout:
                raise CallTimedOut
            raise BackendUnavailable(self._no_answer(action))
        return result

    async def natively_in_a_task(
        self,
        action: str,
        call: Callable[[], Awaitable[T]],
        wait: float | None,
        *,
        undo: Callable[[T], object],
        unknown: Callable[[], object],
    ) -> T:
        """Like :meth:`natively`, but the call is never cut short: it runs in a task of its own.

        For a try: one cut off mid-flight may still reach the server after the release
        sent on another connection to undo it (a release that overtook its SET left the
        key held, with nobody to release it, until its TTL ran out). Its caller still
        leaves at once (cancelled, or past ``wait``); the call runs on to its answer,
        within the call timeout, and ``undo`` gets that answer (a try granted after its
        caller left is released). A call that fails, or is not answered within the call
        timeout, may or may not have been applied: ``unknown`` runs then (a blocking
        release, which only frees what is still ours). Both run in a worker thread of
        the control lane. Native calls are asyncio's only, hence asyncio's task.

        Raises:
            CallTimedOut: only when ``wait`` is given and shorter than the call timeout.
            BackendUnavailable: the backend failed or did not answer within the call
                timeout.
        """
        limit = self.call_timeout if wait is None else min(wait, self.call_timeout)
        submit = lambda job: call_soon(self.control_lane, self.schedule, job)  # noqa: E731
        flight: _Flight[T] = _Flight(undo, unknown, submit)

        async def run() -> None:
            try:
                with self.on_loop_call(action), anyio.move_on_after(self.call_timeout):
                    flight.answer = await call()
                    flight.answered = True
            except Exception as exc:
                flight.error = exc
            finally:
                flight.end()

        task = asyncio.get_running_loop().create_task(run(), name=f"aiotooz {action}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            with anyio.move_on_after(limit):
                await asyncio.shield(task)  # cancelling the caller leaves the task running
        except BaseException:
            flight.leave()
            raise
        if not flight.ended:
            flight.leave()
            if limit < self.call_timeout:
                raise CallTimedOut
            raise BackendUnavailable(self._no_answer(action))
        if flight.answered:
            return cast("T", flight.answer)
        flight.clean_up()
        error, flight.error = flight.error, None  # no reference cycle through the traceback
        if error is None:  # no answer within the call timeout
            raise BackendUnavailable(self._no_answer(action))
        raise translate(error, action, self.url) from error

    @contextlib.contextmanager
    def on_loop_call(self, action: str) -> Iterator[None]:
        """Count a call through the driver's asyncio client; refused once they are ending.

        Raises:
            BackendUnavailable: the connection is closing.
        """
        if self._loop_calls_closed:
            raise BackendUnavailable(
                f"{action} on {redact_url(self.url)}: the connection is closed"
            )
        self._loop_calls += 1
        try:
            yield
        finally:
            self._loop_calls -= 1
            if not self._loop_calls and self._loop_calls_ended is not None:
                self._loop_calls_ended.set()

    async def end_loop_calls(self) -> None:
        """Refuse new calls on the event loop; let those running end (at most the call timeout).

        The driver's asyncio client is closed after this: a call still using it then (a
        release cut short by stop(), a watch subscribing) would open connections on it
        again, which nobody would close (redis-py's clients reconnect on demand).
        """
        self._loop_calls_closed = True
        if self._loop_calls:
            self._loop_calls_ended = ended = anyio.Event()
            with anyio.move_on_after(self.call_timeout, shield=True):
                await ended.wait()

    def run_inline(self, action: str, func: Callable[[], T]) -> T:
        """Run ``func`` here and now (no checkpoint: a release must not be skipped)."""
        started = time.perf_counter()
        try:
            return func()
        except CoordinationError:
            raise
        except Exception as exc:
            raise translate(exc, action, self.url) from exc
        finally:
            if time.perf_counter() - started <= _INLINE_LIMIT:
                self._slow_inline_calls = 0
            else:
                self._slow_inline_calls += 1
                if self._slow_inline_calls >= _INLINE_STRIKES:
                    self.inline = False

    async def close(self) -> None:
        """Refuse new calls, then let the calls in flight end (at most the call timeout).

        A backend that does not answer is left behind: its stuck worker thread exits when
        the call returns.
        """
        orders = self.acquire_lane.close(self.schedule) + self.control_lane.close(self.schedule)
        with anyio.move_on_after(self.call_timeout, shield=True):
            for order in orders:
                await order.done.wait()

    def _no_answer(self, action: str) -> str:
        return (
            f"{action} on {redact_url(self.url)}: no answer within "
            f"{self.call_timeout:g} s (AIOTOOZ_CALL_TIMEOUT)"
        )
