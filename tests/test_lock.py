"""Lock behaviour on the file backend and on Redis: exclusion, budgets, contention, stop.

Exclusion between processes is checked on every backend by tests/test_conformance.py.
"""

from __future__ import annotations

import gc
import math
import threading

import anyio
import anyio.lowlevel
import pytest

from aiotooz import (
    ConfigurationError,
    Coordinator,
    Lock,
    LockAcquireFailed,
    LockCreationFailed,
    LockLost,
    LockNotHeld,
)

from .support.helpers import SLOWDOWN, make_coordinator
from .support.procs import holding_process, run_worker


async def test_tasks_of_one_process_exclude_each_other(coordinator: Coordinator) -> None:
    counter = 0
    inside = 0

    async def increment() -> None:
        nonlocal counter, inside
        for _ in range(5):
            async with coordinator.get_lock("counter"):
                inside += 1
                assert inside == 1
                value = counter
                await anyio.sleep(0.001)
                counter = value + 1
                inside -= 1

    async with anyio.create_task_group() as group:
        for _ in range(40):
            group.start_soon(increment)
    assert counter == 200


async def test_blocking_false_returns_at_once_when_held_elsewhere(
    coordinator: Coordinator, backend_url: str, prefix: str
) -> None:
    with holding_process("hold", backend_url, prefix, "busy"):
        lock = coordinator.get_lock("busy")
        with anyio.fail_after(2):
            assert await lock.acquire(blocking=False) is False
        with pytest.raises(LockAcquireFailed, match="'busy' was not acquired at once"):
            async with lock(blocking=False):
                pass
        assert not lock.locked()
    assert await lock.acquire(blocking=False) is True
    await lock.release()


async def test_timed_blocking_waits_about_that_long(
    coordinator: Coordinator, backend_url: str, prefix: str
) -> None:
    with holding_process("hold", backend_url, prefix, "timed"):
        lock = coordinator.get_lock("timed")
        started = anyio.current_time()
        assert await lock.acquire(blocking=0.5) is False
        waited = anyio.current_time() - started
        assert 0.45 <= waited < 2.0
        with pytest.raises(LockAcquireFailed, match=r"within 0\.3 s"):
            async with lock(blocking=0.3):
                pass


async def test_blocking_true_gets_the_lock_when_the_holder_releases(
    coordinator: Coordinator, backend_url: str, prefix: str
) -> None:
    lock = coordinator.get_lock("handoff")
    with holding_process("hold", backend_url, prefix, "handoff") as holder:
        async with anyio.create_task_group() as group:
            got = anyio.Event()

            async def wait_for_it() -> None:
                async with lock:
                    got.set()

            group.start_soon(wait_for_it)
            await anyio.sleep(0.3)
            assert not got.is_set()
            holder.end_input()  # the holder releases and exits
            with anyio.fail_after(10):
                await got.wait()


async def test_local_waiters_are_served_in_arrival_order(coordinator: Coordinator) -> None:
    order: list[int] = []
    lock = coordinator.get_lock("fifo")
    await lock.acquire()

    async def waiter(number: int) -> None:
        async with Lock("fifo", coordinator=coordinator):
            order.append(number)

    async with anyio.create_task_group() as group:
        for number in range(20):
            group.start_soon(waiter, number)
            await anyio.sleep(0.001)  # arrive one after the other
        await lock.release()
    assert order == list(range(20))


async def test_two_thousand_waiters_with_the_default_thread_limiter(
    coordinator: Coordinator,
) -> None:
    """The naive to_thread(lock.acquire) pattern deadlocks at ~40 waiters."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    assert limiter.total_tokens == 40
    done = 0
    most_threads = 0

    async def task() -> None:
        nonlocal done, most_threads
        async with coordinator.get_lock("crowd"):
            most_threads = max(most_threads, limiter.borrowed_tokens)
            done += 1

    with anyio.fail_after(90):
        async with anyio.create_task_group() as group:
            for _ in range(2000):
                group.start_soon(task)
    assert done == 2000
    # Waiting costs no thread from the application's limiter.
    assert most_threads == 0


async def test_event_loop_keeps_ticking_under_contention(coordinator: Coordinator) -> None:
    lags: list[float] = []
    finished = anyio.Event()

    async def ticker() -> None:
        while not finished.is_set():
            before = anyio.current_time()
            await anyio.sleep(0.001)
            lags.append(anyio.current_time() - before - 0.001)

    async def task() -> None:
        async with coordinator.get_lock("lag"):
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        async with anyio.create_task_group() as workers:
            for _ in range(300):
                workers.start_soon(task)
        finished.set()
    lags.sort()
    # A generous bound (test processes share the machine's cores; coverage's tracing
    # slows the loop down): a blocking tooz call on the loop would stall it far longer.
    assert lags[int(len(lags) * 0.99)] < 0.25 * SLOWDOWN


async def test_stop_releases_held_locks(backend_url: str, prefix: str) -> None:
    """(That stop() fails the waiters and ends the holders' blocks, on every backend and
    primitive: tests/test_conformance.py.)"""
    coordinator = make_coordinator(backend_url, prefix)
    await coordinator.start()
    held = coordinator.get_lock("kept")
    await held.acquire()
    await coordinator.stop()
    # The backend lock is gone: another process takes it at once.
    assert run_worker("try", backend_url, prefix, "kept") == "acquired"
    await held.release()  # released by stop(): a no-op, not an error
    await coordinator.stop()  # idempotent


async def test_stop_from_another_task_releases_and_disconnects(file_url: str, prefix: str) -> None:
    coordinator = make_coordinator(file_url, prefix)
    await coordinator.start()
    lock = Lock("elsewhere", coordinator=coordinator)
    await lock.acquire()
    async with anyio.create_task_group() as group:
        group.start_soon(coordinator.stop)
    assert not coordinator.is_started and not coordinator.is_connected
    assert lock.lost
    assert run_worker("try", file_url, prefix, "elsewhere") == "acquired"
    await lock.release()


async def test_stop_inside_a_cancel_scope_opened_after_start_releases_and_closes(
    backend_url: str, prefix: str
) -> None:
    """Bounding shutdown with fail_after, or stopping inside a task group, used to fail
    with a cancel-scope RuntimeError, leaving the connection open and the lock held."""
    before = {t for t in threading.enumerate() if t.name.startswith("aiotooz")}
    coordinator = make_coordinator(backend_url, prefix)
    await coordinator.start()
    lock = Lock("bounded-stop", coordinator=coordinator)
    await lock.acquire()
    with anyio.fail_after(10):
        await coordinator.stop()
    assert not coordinator.is_started and not coordinator.is_connected
    assert run_worker("try", backend_url, prefix, "bounded-stop") == "acquired"
    await lock.release()
    # Inside a task group opened after start(), and from inside a lock's block.
    await coordinator.start()
    async with anyio.create_task_group():
        with pytest.raises(LockLost, match="stopped"):
            async with Lock("bounded-stop", coordinator=coordinator):
                await coordinator.stop()
    assert not coordinator.is_started
    assert run_worker("try", backend_url, prefix, "bounded-stop") == "acquired"
    with anyio.fail_after(5):
        while {t for t in threading.enumerate() if t.name.startswith("aiotooz")} - before:
            await anyio.sleep(0.05)


async def test_stop_shielded_from_its_own_cancelled_scope(file_url: str, prefix: str) -> None:
    """A scope cancelled before stop() runs does not cut shutdown short."""
    coordinator = make_coordinator(file_url, prefix)
    await coordinator.start()
    lock = Lock("cut-short", coordinator=coordinator)
    await lock.acquire()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await coordinator.stop()
    assert not coordinator.is_started
    assert run_worker("try", file_url, prefix, "cut-short") == "acquired"


async def test_start_and_stop_are_idempotent(backend_url: str, prefix: str) -> None:
    coordinator = make_coordinator(backend_url, prefix)
    await coordinator.start()
    await coordinator.start()
    assert coordinator.is_started and coordinator.is_connected
    await coordinator.stop()
    await coordinator.stop()
    assert not coordinator.is_started
    with pytest.raises(LockCreationFailed, match="not started"):
        coordinator.get_lock("x")
    async with coordinator:  # and it can start again
        async with coordinator.get_lock("x"):
            pass


async def test_reentry_by_the_same_task_is_refused_not_deadlocked(
    coordinator: Coordinator,
) -> None:
    async with coordinator.get_lock("once"):
        with pytest.raises(LockAcquireFailed, match="not reentrant"):
            await coordinator.get_lock("once").acquire()
        assert await coordinator.get_lock("once").acquire(blocking=False) is False
        # A timed re-entry used to wait its whole budget for itself.
        with anyio.fail_after(5), pytest.raises(LockAcquireFailed, match="not reentrant"):
            await coordinator.get_lock("once").acquire(blocking=30)
    # The refused re-entries left nothing held or waiting.
    stats = coordinator.statistics()
    assert stats.locks_held == 0 and stats.names_waited_for == 0
    async with coordinator.get_lock("once")(blocking=False):
        pass


async def test_release_of_a_lock_not_held(coordinator: Coordinator) -> None:
    lock = coordinator.get_lock("loose")
    with pytest.raises(LockNotHeld, match="'loose' is not held"):
        await lock.release()
    await lock.acquire()
    await lock.release()
    with pytest.raises(LockNotHeld):
        await lock.release()


@pytest.mark.parametrize("blocking", [-1, math.nan, "yes", None, [1], 10**400])
async def test_bad_blocking_is_refused(coordinator: Coordinator, blocking: object) -> None:
    lock = coordinator.get_lock("b")
    with pytest.raises(ConfigurationError, match="blocking must be"):
        await lock.acquire(blocking=blocking)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="blocking must be"):
        lock(blocking=blocking)  # type: ignore[arg-type]
    assert not lock.locked()
    assert await lock.acquire(blocking=False)
    await lock.release()


async def test_zero_and_infinite_budgets(coordinator: Coordinator) -> None:
    lock = coordinator.get_lock("budgets")
    assert await lock.acquire(blocking=0)
    await lock.release()
    assert await lock.acquire(blocking=math.inf)
    await lock.release()


async def test_a_release_inside_the_block_leaves_its_exit_quiet(coordinator: Coordinator) -> None:
    """The exit releases nothing more, and never puts LockNotHeld in place of the body's
    own exception; a second explicit release() still raises LockNotHeld."""
    lock = coordinator.get_lock("early")
    async with lock:
        await lock.release()
        assert not lock.locked()
        with pytest.raises(LockNotHeld):
            await lock.release()
    with pytest.raises(ValueError, match="the body's own"):
        async with lock:
            await lock.release()
            raise ValueError("the body's own")
    async with lock(blocking=False):  # free again
        assert coordinator.statistics().locks_held == 1
    assert coordinator.statistics().locks_held == 0


async def test_a_held_lock_dropped_without_release_is_released_with_a_resource_warning(
    coordinator: Coordinator,
) -> None:
    """As Python closes a file left open: it stayed held, and refreshed, until stop()."""
    lock = coordinator.get_lock("dropped")
    assert await lock.acquire()
    with pytest.warns(ResourceWarning, match="'dropped' was garbage-collected while held"):
        del lock
        gc.collect()
    with anyio.fail_after(5):
        while coordinator.statistics().locks_held:
            await anyio.sleep(0.01)
    url, prefix = coordinator.settings.backend_url, coordinator.prefix
    assert await anyio.to_thread.run_sync(run_worker, "try", url, prefix, "dropped") == "acquired"
    # A lock released, or dropped after its coordinator stopped, is no resource left open.
    released = coordinator.get_lock("released")
    await released.acquire()
    await released.release()
    del released
    gc.collect()


async def test_repr_needs_no_event_loop(coordinator: Coordinator) -> None:
    """A held lock's repr read the lease rule's clock: outside an event loop (a finalizer,
    a debugger, a report in another thread) it raised instead of describing the lock."""
    lock = coordinator.get_lock("shown")
    async with lock:
        shown = await anyio.to_thread.run_sync(repr, lock)
        assert shown == "<aiotooz.Lock 'shown' locked>"
    assert await anyio.to_thread.run_sync(repr, lock) == "<aiotooz.Lock 'shown' unlocked>"
