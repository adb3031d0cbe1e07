"""The thread bridge: lanes of worker threads, cancellation mid-call, no thread left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest

from aiotooz import BackendUnavailable, Coordinator, Lock
from aiotooz import _backend as backend_module
from aiotooz._backend import Backend

from .conftest import make_coordinator


def _aiotooz_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("aiotooz")}


def _backend(coordinator: Coordinator) -> Backend:
    backend = coordinator._backend
    assert backend is not None
    return backend


async def _wait_for(flag: threading.Event, seconds: float = 5.0) -> None:
    """Poll a flag set by a worker thread, without blocking the event loop."""
    with anyio.fail_after(seconds):
        while not flag.is_set():
            await anyio.sleep(0.002)


async def test_no_thread_stays_parked_after_a_coordinator_stops(
    backend_url: str, prefix: str
) -> None:
    before = set(threading.enumerate())
    async with make_coordinator(backend_url, prefix) as coordinator:

        async def contender() -> None:
            for _ in range(5):
                async with Lock("busy", coordinator=coordinator):
                    await anyio.sleep(0.001)

        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(contender)
        await _backend(coordinator).heartbeat()  # the file backend's tries run inline
        assert _aiotooz_threads(), "the lanes should have started worker threads"
    # stop() waited for every lane thread to leave its loop; give them a moment to return.
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("aiotooz"):
            thread.join(2)
    left = {t.name for t in set(threading.enumerate()) - before}
    # The event loops' own idle thread caches (trio's, the test runner's) are not ours:
    # aiotooz never uses them, but the test harness may.
    assert {name for name in left if not name.startswith(("Trio thread", "asyncio_"))} == set()


async def test_idle_lane_threads_exit_without_a_close(
    file_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_module, "_IDLE_EXIT", 0.05)
    async with make_coordinator(file_url, prefix) as coordinator:
        _backend(coordinator)._inline_tries = False
        async with Lock("idle", coordinator=coordinator):
            pass
        lane_threads = _backend(coordinator)._acquire_lane.threads
        assert lane_threads
        with anyio.fail_after(5):
            while any(t.is_alive() for t in lane_threads):
                await anyio.sleep(0.01)
        # A new call starts a new thread.
        async with Lock("idle", coordinator=coordinator):
            pass


async def test_releases_never_queue_behind_acquire_tries(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        backend = _backend(coordinator)
        gate = threading.Event()
        async with anyio.create_task_group() as group:
            # Fill every thread of the acquire lane, and queue one more behind them.
            for _ in range(backend._acquire_lane.size + 1):
                group.start_soon(backend._call, backend._acquire_lane, "stuck", gate.wait)
            await anyio.sleep(0.05)
            with anyio.fail_after(2):
                assert await backend._call(backend._control_lane, "release", lambda: 42) == 42
            gate.set()


async def test_cancelled_mid_call_leaves_at_once_and_the_outcome_is_cleaned_up(
    file_url: str, prefix: str
) -> None:
    """A caller never waits for a call that hangs (a paused server); what the call
    yields afterwards goes to its clean-up, in the worker thread."""
    async with make_coordinator(file_url, prefix) as coordinator:
        backend = _backend(coordinator)
        started, gate, cleaned = threading.Event(), threading.Event(), threading.Event()
        cleaned_up: list[str] = []

        def call() -> str:
            started.set()
            gate.wait(5)
            return "granted"

        def clean_up(result: str) -> None:
            cleaned_up.append(result)
            cleaned.set()

        with anyio.move_on_after(5) as outer:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(
                        lambda: backend._call(
                            backend._acquire_lane, "try", call, abandoned=clean_up
                        )
                    )
                    await _wait_for(started)
                    scope.cancel()
        assert not outer.cancelled_caught, "the caller waited for its hung call"
        assert cleaned_up == []
        gate.set()
        await _wait_for(cleaned)
        assert cleaned_up == ["granted"]


async def test_a_call_that_never_answers_fails_after_the_call_timeout(
    file_url: str, prefix: str
) -> None:
    async with make_coordinator(file_url, prefix, call_timeout=0.2) as coordinator:
        backend = _backend(coordinator)
        gate = threading.Event()
        try:
            with anyio.fail_after(3):
                with pytest.raises(BackendUnavailable, match=r"no answer within 0.2 s"):
                    await backend._call(backend._control_lane, "releasing", gate.wait)
        finally:
            gate.set()


async def test_cancelled_while_queued_the_call_never_runs(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        backend = _backend(coordinator)
        gate = threading.Event()
        ran: list[int] = []
        async with anyio.create_task_group() as group:
            for _ in range(backend._acquire_lane.size):
                group.start_soon(backend._call, backend._acquire_lane, "stuck", gate.wait)
            await anyio.sleep(0.05)
            with anyio.move_on_after(0.05) as scope:
                await backend._call(backend._acquire_lane, "queued", lambda: ran.append(1))
            assert scope.cancelled_caught, "a queued call must be cancellable at once"
            gate.set()
        # The lane is idle again: a call after the cancelled one still runs.
        assert await backend._call(backend._acquire_lane, "next", lambda: 7) == 7
        assert ran == []


async def test_a_granted_lock_is_released_when_its_taker_was_cancelled_mid_try(
    backend_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The try is slowed down in its worker thread and cancelled meanwhile: the lock the
    worker got must be given back, so another process can take it."""
    slow: list[Callable[[], object]] = []
    entered = threading.Event()
    original = backend_module._run_in_lane

    async def slow_run(
        lane: object, schedule: object, func: Callable[[], object], *args: object
    ) -> object:
        def slowly() -> object:
            entered.set()
            time.sleep(0.1)
            return func()

        if getattr(lane, "name", "").startswith("aiotooz-acquire"):
            slow.append(func)
            return await original(lane, schedule, slowly, *args)  # type: ignore[arg-type]
        return await original(lane, schedule, func, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(backend_module, "_run_in_lane", slow_run)
    async with make_coordinator(backend_url, prefix) as coordinator:
        _backend(coordinator)._inline_tries = False  # through the lanes, to be slowed
        lock = Lock("mid-try", coordinator=coordinator)
        with anyio.move_on_after(0.03) as scope:
            await lock.acquire()
        assert scope.cancelled_caught
        assert entered.is_set() and slow
        assert not lock.locked()
        assert not coordinator._holds
        monkeypatch.setattr(backend_module, "_run_in_lane", original)
        # The worker got the lock after its taker left, and released it itself.
        assert await Lock("mid-try", coordinator=coordinator).acquire(blocking=5)


async def test_errors_in_the_worker_are_translated(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        backend = _backend(coordinator)

        def fail() -> None:
            raise OSError("disk on fire")

        with pytest.raises(BackendUnavailable, match="disk on fire") as info:
            await backend._call(backend._acquire_lane, "trying", fail)
        assert isinstance(info.value.__cause__, OSError)


async def test_calls_after_close_fail_cleanly(file_url: str, prefix: str) -> None:
    coordinator = make_coordinator(file_url, prefix)
    await coordinator.start()
    backend = _backend(coordinator)
    await coordinator.stop()
    with pytest.raises(BackendUnavailable, match="closed"):
        await backend._call(backend._control_lane, "releasing", lambda: None)
    assert not backend._acquire_lane.threads
    assert not backend._control_lane.threads


async def test_file_tries_and_releases_run_inline_until_they_are_slow(
    file_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        backend = _backend(coordinator)
        assert backend._inline_tries
        for _ in range(3):
            async with Lock("inline", coordinator=coordinator):
                pass
        assert not backend._acquire_lane.threads
        # Calls that are slow on the loop (a network file system, say) go back to threads.
        monkeypatch.setattr(backend_module, "_INLINE_TRY_LIMIT", -1.0)
        for _ in range(backend_module._INLINE_TRY_STRIKES):
            async with Lock("inline", coordinator=coordinator):
                pass
        assert not backend._inline_tries
        async with Lock("inline", coordinator=coordinator):
            pass
        assert backend._acquire_lane.threads


async def test_redis_calls_never_run_inline(redis_url: str, prefix: str) -> None:
    async with make_coordinator(redis_url, prefix) as coordinator:
        assert not _backend(coordinator)._inline_tries
