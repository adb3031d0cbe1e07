"""The thread bridge: worker threads that run blocking calls for async callers.

It knows nothing of tooz or of locks: a :class:`Lane` is up to ``size`` worker threads
fed by a FIFO queue, and :func:`run_in_lane` runs one blocking function on it for an
async caller, never blocking the event loop. A worker hands the outcome back by
scheduling ``Event.set`` on the caller's event loop (asyncio's ``call_soon_threadsafe``,
trio's ``run_sync_soon``), which costs less than ``anyio.to_thread.run_sync``'s round
trip (the benchmark compares them). Lanes never use anyio's default thread limiter, so
callers never compete with the application's own ``to_thread`` calls, and their
threads exit when the lane closes (or after ``IDLE_EXIT`` idle seconds).

Glossary:

* *lane*: a small pool of threads with one queue, for one kind of call (a connection
  keeps one for lock tries and one for releases and heartbeats, so that releases never
  queue behind tries).
* *job*: one call on a lane, and its outcome.
* *withdrawn*: a queued job whose caller left before a worker took it; it never runs.
* *abandoned*: a job whose caller stopped waiting while it ran (cancelled, or past its
  time limit); it runs on, and its clean-up gets its result.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Final, TypeVar, cast, final

import anyio
import anyio.from_thread
import anyio.lowlevel

from ._tasks import native_loop

__all__ = [
    "IDLE_EXIT",
    "CallTimedOut",
    "Lane",
    "LaneClosed",
    "Schedule",
    "call_soon",
    "loop_scheduler",
    "run_in_lane",
]

T = TypeVar("T")

#: How a worker thread runs a callback on the caller's event loop, without waiting.
Schedule = Callable[[Callable[[], object]], object]

#: A lane's idle worker thread exits after this many seconds; all exit when the lane
#: closes. The bound is for a lane that is dropped without being closed.
IDLE_EXIT: float = 10.0

_QUEUED: Final = 0
_RUNNING: Final = 1
_WITHDRAWN: Final = 2
#: The caller stopped waiting while the call ran (cancelled, or past its time): the
#: worker hands the call's outcome to the job's ``abandoned`` callback instead.
_ABANDONED: Final = 3
_DONE: Final = 4


def loop_scheduler() -> Schedule:
    """How a worker thread runs a callback on the current event loop, without waiting.

    asyncio's ``loop.call_soon_threadsafe`` or trio's ``TrioToken.run_sync_soon``: the
    worker is free again at once. (``anyio.from_thread.run_sync``, the fallback, makes it
    wait for the loop, which makes each round trip slower.)
    """
    native = native_loop()
    for name in ("call_soon_threadsafe", "run_sync_soon"):
        schedule = getattr(native, name, None)
        if schedule is not None:
            return cast("Schedule", schedule)
    token = anyio.lowlevel.current_token()
    return lambda callback: anyio.from_thread.run_sync(callback, token=token)


class LaneClosed(Exception):
    """The lane is closed: no call can start any more."""


@final
class _Job:
    """One call into a worker thread, and its outcome."""

    __slots__ = ("abandoned", "done", "error", "func", "result", "schedule", "state")

    def __init__(
        self,
        func: Callable[[], object] | None,
        schedule: Schedule,
        abandoned: Callable[[object], object] | None = None,
    ) -> None:
        #: ``None`` is the order for the worker that takes it to exit.
        self.func = func
        self.schedule = schedule
        #: Called with the result, in a worker thread, if the call succeeds after its
        #: caller stopped waiting (a try granted too late is released through it).
        self.abandoned = abandoned
        self.state = _QUEUED
        self.result: object = None
        self.error: BaseException | None = None
        self.done = anyio.Event()

    def finish(self) -> None:
        """From the worker: wake the caller on its event loop."""
        try:
            self.schedule(self.done.set)
        except RuntimeError:
            pass  # the event loop is gone (trio's RunFinishedError too): nobody waits


def _clean_up(abandoned: Callable[[object], object], result: object) -> None:
    """Run an abandoned call's clean-up; its errors have nobody to go to."""
    try:
        abandoned(result)
    except Exception:
        pass


@final
class Lane:
    """Up to ``size`` worker threads, fed by a FIFO queue.

    Threads start when calls queue up and none is idle, and exit after ``IDLE_EXIT``
    idle seconds or when :meth:`close` orders them to.
    """

    __slots__ = ("_closed", "_idle", "_jobs", "_mutex", "_threads", "name", "size")

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._mutex = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._closed = False

    @property
    def threads(self) -> frozenset[threading.Thread]:
        """The worker threads alive now."""
        with self._mutex:
            return frozenset(self._threads)

    def submit(self, job: _Job) -> None:
        with self._mutex:
            if self._closed:
                raise LaneClosed
            self._jobs.put(job)
            if self._idle < self._jobs.qsize() and len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._threads.add(thread)
                thread.start()

    def abandon(self, job: _Job, withdraw: bool = True) -> int:
        """The caller stops waiting for ``job``; returns the job's state before that.

        A queued job is withdrawn (it never runs) if ``withdraw``, else it is abandoned
        like a running one: it still runs, and its worker cleans up after it. A done
        job is left to the caller.
        """
        with self._mutex:
            state = job.state
            if state == _QUEUED and withdraw:
                job.state = _WITHDRAWN
            elif state in (_QUEUED, _RUNNING):
                job.state = _ABANDONED
            return state

    def close(self, schedule: Schedule) -> list[_Job]:
        """Refuse new calls; order every thread to exit once the queue before it is done.

        Returns the exit orders: each is done when its thread has left its loop.
        """
        with self._mutex:
            if self._closed:
                return []
            self._closed = True
            orders = [_Job(None, schedule) for _ in self._threads]
            for order in orders:
                self._jobs.put(order)
            return orders

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._mutex:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._mutex:
                    self._idle -= 1
                    # close() queues one exit order per thread under this mutex: if the
                    # queue is empty now, none is meant for this thread.
                    if self._jobs.empty():
                        self._threads.discard(me)
                        return
                continue
            with self._mutex:
                self._idle -= 1
                if job.state == _WITHDRAWN:
                    continue
                if job.state == _QUEUED:  # an abandoned job that must run still runs
                    job.state = _RUNNING
                if job.func is None:
                    self._threads.discard(me)
            if job.func is None:
                job.finish()
                return
            try:
                job.result = job.func()
            except BaseException as exc:
                job.error = exc
            with self._mutex:
                abandoned = job.state == _ABANDONED
                job.state = _DONE
            if abandoned:
                if job.error is None and job.abandoned is not None:
                    _clean_up(job.abandoned, job.result)
                job.result = job.error = None
            job.finish()


class CallTimedOut(Exception):
    """The call did not return within the time its caller gave it."""


async def run_in_lane(
    lane: Lane,
    schedule: Schedule,
    func: Callable[[], T],
    limit: float,
    abandoned: Callable[[T], object] | None = None,
    must_run: bool = False,
) -> T:
    """Run ``func`` in one of ``lane``'s threads; never blocks the event loop.

    The caller waits at most ``limit`` seconds, and not at all once cancelled: a
    backend that accepts connections but never answers (a paused server) must not hold
    up a cancel scope or a deadline. A call the caller stops waiting for is withdrawn if
    no worker has started it (unless it ``must_run``, as a release must); otherwise it
    runs on, and if it succeeds, ``abandoned`` gets its result in the worker thread (a
    try granted after its caller left releases the lock there), so that no outcome is
    ever lost.

    Raises:
        LaneClosed: the lane is closed.
        CallTimedOut: no answer within ``limit`` seconds.
    """
    job = _Job(func, schedule, cast("Callable[[object], object] | None", abandoned))
    lane.submit(job)
    try:
        with anyio.move_on_after(limit):
            await job.done.wait()
    except BaseException:
        _give_up(lane, job, must_run)
        raise
    if not job.done.is_set():
        _give_up(lane, job, must_run)
        raise CallTimedOut
    error = job.error
    if error is not None:
        job.error = None  # no reference cycle through the traceback
        raise error
    return cast("T", job.result)


def _give_up(lane: Lane, job: _Job, must_run: bool) -> None:
    """Stop waiting for ``job``; if it is already done, clean up after its result."""
    if (
        lane.abandon(job, withdraw=not must_run) != _DONE
        or job.error is not None
        or job.abandoned is None
    ):
        return
    result, job.result = job.result, None
    cleanup = job.abandoned
    with contextlib.suppress(LaneClosed):
        lane.submit(_Job(lambda: _clean_up(cleanup, result), job.schedule))


def call_soon(lane: Lane, schedule: Schedule, func: Callable[[], object]) -> None:
    """Run ``func`` on ``lane`` with nobody waiting for it; its errors are dropped.

    For clean-ups that must happen but that no caller can wait for (a lock that may
    have been granted to a caller who left). Nothing runs if the lane is closed.
    """

    def quietly() -> None:
        _clean_up(lambda _: func(), None)

    with contextlib.suppress(LaneClosed):
        lane.submit(_Job(quietly, schedule))
