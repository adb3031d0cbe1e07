"""A connection: its lanes around the driver, errors translated, no thread left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest

from aiotooz import BackendUnavailable, Lock
from aiotooz import _calls as calls_module

from .support.helpers import connection_of, make_coordinator


def _aiotooz_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("aiotooz")}


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
        await connection_of(coordinator).heartbeat()  # the file backend's tries run inline
        assert coordinator.statistics().threads > 0
    assert coordinator.statistics().threads == 0
    # stop() waited for every lane thread to leave its loop; give them a moment to return.
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("aiotooz"):
            # Polled, not joined: a join would block the event loop (and another thread
            # to join from would be one more thread left over).
            with anyio.move_on_after(2):
                while thread.is_alive():
                    await anyio.sleep(0.01)
    left = {t.name for t in set(threading.enumerate()) - before}
    # The event loops' own idle thread caches (trio's, the test runner's) are not ours.
    assert {name for name in left if not name.startswith(("Trio thread", "asyncio_"))} == set()


async def test_releases_never_queue_behind_acquire_tries(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        calls = connection_of(coordinator)._calls
        gate = threading.Event()
        async with anyio.create_task_group() as group:
            # Fill every thread of the acquire lane, and queue one more behind them.
            for _ in range(calls.acquire_lane.size + 1):
                group.start_soon(calls.in_lane, calls.acquire_lane, "stuck", gate.wait)
            await anyio.sleep(0.05)
            with anyio.fail_after(2):
                assert await calls.in_control_lane("x", lambda: 42) == 42
            gate.set()


async def test_a_call_that_never_answers_fails_after_the_call_timeout(
    file_url: str, prefix: str
) -> None:
    # Long enough for the connect itself on a loaded machine (0.2 s was not, once).
    async with make_coordinator(file_url, prefix, call_timeout=1.0) as coordinator:
        calls = connection_of(coordinator)._calls
        gate = threading.Event()
        try:
            with anyio.fail_after(5):
                with pytest.raises(BackendUnavailable, match=r"no answer within 1 s"):
                    await calls.in_control_lane("releasing", gate.wait)
        finally:
            gate.set()


async def test_a_granted_lock_is_released_when_its_taker_was_cancelled_mid_try(
    backend_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The try is slowed down in its worker thread and cancelled meanwhile: the lock the
    worker got must be given back, so another process can take it."""
    slow: list[Callable[[], object]] = []
    entered = threading.Event()
    original = calls_module.run_in_lane  # type: ignore[attr-defined]

    async def slow_run(
        lane: object, schedule: object, func: Callable[[], object], *args: object
    ) -> object:
        def slowly() -> object:
            entered.set()
            time.sleep(0.5)
            return func()

        if getattr(lane, "name", "").startswith("aiotooz-acquire"):
            slow.append(func)
            return await original(lane, schedule, slowly, *args)  # type: ignore[arg-type]
        return await original(lane, schedule, func, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(calls_module, "run_in_lane", slow_run)
    async with make_coordinator(backend_url, prefix) as coordinator:
        # Through the lanes, to be slowed (not inline on file, not native on Redis).
        calls = connection_of(coordinator)._calls
        calls.inline = calls.native = False
        lock = Lock("mid-try", coordinator=coordinator)
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as scope:

                async def cancel_mid_try() -> None:
                    # Once the worker is in the (slowed) try, not after a fixed time: on a
                    # loaded machine the worker thread may start late.
                    while not entered.is_set():
                        await anyio.sleep(0.005)
                    scope.cancel()

                group.start_soon(cancel_mid_try)
                await lock.acquire()
        assert scope.cancelled_caught
        assert entered.is_set() and slow
        assert not lock.locked()
        assert coordinator.statistics().locks_held == 0
        monkeypatch.setattr(calls_module, "run_in_lane", original)
        # The worker got the lock after its taker left, and released it itself.
        again = Lock("mid-try", coordinator=coordinator)
        assert await again.acquire(blocking=5)
        await again.release()


async def test_errors_in_the_worker_are_translated(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        calls = connection_of(coordinator)._calls

        def fail() -> None:
            raise OSError("disk on fire")

        with pytest.raises(BackendUnavailable, match="disk on fire") as info:
            await calls.in_lane(calls.acquire_lane, "trying", fail)
        assert isinstance(info.value.__cause__, OSError)


async def test_calls_after_close_fail_cleanly(file_url: str, prefix: str) -> None:
    coordinator = make_coordinator(file_url, prefix)
    await coordinator.start()
    connection = connection_of(coordinator)
    calls = connection._calls
    await coordinator.stop()
    with pytest.raises(BackendUnavailable, match="closed"):
        await calls.in_control_lane("releasing", lambda: None)
    assert connection.threads == 0
