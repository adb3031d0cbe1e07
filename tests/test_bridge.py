"""The thread bridge on its own: lanes, jobs, cancellation mid-call, no thread left behind.

No coordinator and no backend here: these are plain functions run in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from aiotooz import _bridge
from aiotooz._bridge import CallTimedOut, Lane, LaneClosed, loop_scheduler, run_in_lane


async def _wait_for(flag: threading.Event, seconds: float = 5.0) -> None:
    """Poll a flag set by a worker thread, without blocking the event loop."""
    with anyio.fail_after(seconds):
        while not flag.is_set():
            await anyio.sleep(0.002)


@pytest.fixture
async def lane() -> AsyncIterator[Lane]:
    lane = Lane("aiotooz-test", 2)
    try:
        yield lane
    finally:
        lane.close(loop_scheduler())


async def _run(lane: Lane, func: Callable[[], Any], limit: float = 5, **kwargs: Any) -> Any:
    return await run_in_lane(lane, loop_scheduler(), func, limit, **kwargs)


async def test_a_call_returns_its_result_and_raises_its_error(lane: Lane) -> None:
    assert await _run(lane, lambda: 42) == 42

    def fail() -> None:
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        await _run(lane, fail)


async def test_threads_exit_on_close() -> None:
    lane = Lane("aiotooz-test", 2)
    gate = threading.Event()
    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(_run, lane, lambda: gate.wait(5))
        await anyio.sleep(0.05)
        assert len(lane.threads) == 2, "at most `size` threads"
        gate.set()
    threads = lane.threads
    orders = lane.close(loop_scheduler())
    with anyio.fail_after(5):
        for order in orders:
            await order.done.wait()
    for thread in threads:
        # Off the loop: a thread that has finished its order may still be on its way
        # out, and a join that waits would block the loop (blockbuster says so).
        await anyio.to_thread.run_sync(thread.join, 2)
        assert not thread.is_alive()
    with pytest.raises(LaneClosed):
        await _run(lane, lambda: None)


async def test_idle_threads_exit_without_a_close(
    lane: Lane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bridge, "IDLE_EXIT", 0.05)
    await _run(lane, lambda: None)
    threads = lane.threads
    assert threads
    with anyio.fail_after(5):
        while any(thread.is_alive() for thread in threads):
            await anyio.sleep(0.01)
    assert await _run(lane, lambda: 7) == 7  # a new call starts a new thread


async def test_cancelled_mid_call_leaves_at_once_and_the_outcome_is_cleaned_up(
    lane: Lane,
) -> None:
    """A caller never waits for a call that hangs (a paused server); what the call
    yields afterwards goes to its clean-up, in the worker thread."""
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
                group.start_soon(lambda: _run(lane, call, abandoned=clean_up))
                await _wait_for(started)
                scope.cancel()
    assert not outer.cancelled_caught, "the caller waited for its hung call"
    assert cleaned_up == []
    gate.set()
    await _wait_for(cleaned)
    assert cleaned_up == ["granted"]


async def test_a_call_past_its_limit_is_given_up(lane: Lane) -> None:
    gate = threading.Event()
    try:
        with anyio.fail_after(3):
            with pytest.raises(CallTimedOut):
                await _run(lane, gate.wait, limit=0.2)
    finally:
        gate.set()


async def test_cancelled_while_queued_the_call_never_runs(lane: Lane) -> None:
    gate = threading.Event()
    ran: list[int] = []
    async with anyio.create_task_group() as group:
        for _ in range(lane.size):
            group.start_soon(_run, lane, lambda: gate.wait(5))
        await anyio.sleep(0.05)
        with anyio.move_on_after(0.05) as scope:
            await _run(lane, lambda: ran.append(1))
        assert scope.cancelled_caught, "a queued call must be cancellable at once"
        gate.set()
    assert await _run(lane, lambda: 7) == 7  # the lane is idle again
    assert ran == []


async def test_a_call_that_must_run_runs_even_if_cancelled_while_queued(lane: Lane) -> None:
    """A release must never be withdrawn: the lock would stay held."""
    gate, ran = threading.Event(), threading.Event()
    async with anyio.create_task_group() as group:
        for _ in range(lane.size):
            group.start_soon(_run, lane, lambda: gate.wait(5))
        await anyio.sleep(0.05)
        with anyio.move_on_after(0.05) as scope:
            await _run(lane, ran.set, must_run=True)
        assert scope.cancelled_caught
        gate.set()
    await _wait_for(ran)
