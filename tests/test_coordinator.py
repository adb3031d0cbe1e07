"""Coordinator lifecycle: heartbeat keeps TTL locks, reconnect heals, logs carry context,
one event loop and one process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
import anyio.from_thread
import pytest
import trio
from structlog.testing import capture_logs

from aiotooz import (
    BackendUnavailable,
    Coordinator,
    Lock,
    Semaphore,
    WrongEventLoop,
    set_default_coordinator,
    synchronized,
)

from .support.helpers import make_coordinator
from .support.procs import holding_process, run_worker
from .support.servers import PrivateRedis


async def test_heartbeat_keeps_a_ttl_lock_held(redis_url: str, prefix: str) -> None:
    url = f"{redis_url}?lock_timeout=1"
    async with make_coordinator(url, prefix, heartbeat=0.2) as coordinator:
        async with coordinator.get_lock("beating"):
            await anyio.sleep(3.0)  # three times the lock's TTL
            outcome = await anyio.to_thread.run_sync(
                run_worker, "try", redis_url, prefix, "beating"
            )
            assert outcome == "busy"


async def test_reconnect_after_the_server_dies(private_redis: PrivateRedis, prefix: str) -> None:
    with capture_logs() as logs:
        async with make_coordinator(
            private_redis.url,
            prefix,
            heartbeat=0.1,
            initial_reconnect_backoff=0.05,
            max_reconnect_backoff=0.2,
        ) as coordinator:
            held = coordinator.get_lock("through-the-outage")
            await held.acquire()
            private_redis.kill()
            with anyio.fail_after(30):
                while coordinator.is_connected:
                    await anyio.sleep(0.05)
            assert held.lost
            # While disconnected, a try fails fast and a timed wait times out...
            with pytest.raises(BackendUnavailable, match="reconnecting"):
                await Lock("other", coordinator=coordinator).acquire(blocking=False)
            assert await Lock("other", coordinator=coordinator).acquire(blocking=0.2) is False
            # ...and a patient waiter neither fails nor hangs: it gets the lock later.
            waited = Lock("patient", coordinator=coordinator)
            async with anyio.create_task_group() as group:
                group.start_soon(waited.acquire)
                await anyio.sleep(0.5)  # let a few reconnect attempts fail
                assert not waited.locked()
                private_redis.start()
                with anyio.fail_after(30):
                    await coordinator.wait_connected()
            assert waited.locked()
            await waited.release()
            async with coordinator.get_lock("after"):
                pass
            await held.release()  # lost with the old connection: releasing is harmless
    events = [entry["event"] for entry in logs]
    assert "heartbeat failed; reconnecting" in events
    attempts = [entry for entry in logs if entry["event"] == "reconnect attempt failed"]
    assert attempts, events
    assert all(entry["retry_in"] <= 0.2 for entry in attempts)
    assert "reconnected to backend" in events
    assert any(entry["event"] == "lock lost" for entry in logs)


async def test_lock_events_are_logged_with_context(file_url: str, prefix: str) -> None:
    with capture_logs() as logs:
        async with make_coordinator(file_url, prefix) as coordinator:
            async with coordinator.get_lock("logged"):
                await anyio.sleep(0.01)
    acquired = next(entry for entry in logs if entry["event"] == "lock acquired")
    released = next(entry for entry in logs if entry["event"] == "lock released")
    assert acquired["agent_id"] == coordinator.agent_id
    assert acquired["lock"] == "logged" and acquired["waited"] >= 0
    assert released["held"] >= 0.01


async def test_the_backend_password_never_reaches_logs_or_reprs(
    redis_url: str, prefix: str
) -> None:
    shown: list[str] = []
    with capture_logs() as logs:
        # Redis without a password ignores one given without a user name: this starts.
        accepted = make_coordinator(redis_url.replace("redis://", "redis://:s3cret-pw@"), prefix)
        async with accepted:
            async with accepted.get_lock("secret"):
                shown += [repr(accepted), str(accepted.settings), repr(accepted.settings)]
        # With a user name the server refuses, and the error must not carry the password.
        refused = make_coordinator(
            redis_url.replace("redis://", "redis://nobody:s3cret-pw@"), prefix
        )
        with pytest.raises(BackendUnavailable) as raised:
            await refused.start()
    shown += [repr(refused), str(raised.value), repr(raised.value)]
    shown += [str(entry) for entry in logs]
    assert "nobody:***@" in str(raised.value)
    assert not [text for text in shown if "s3cret-pw" in text]


async def _wait_until(predicate: Callable[[], bool], within: float = 10) -> None:
    with anyio.fail_after(within):
        while not predicate():
            await anyio.sleep(0.01)


async def test_statistics_count_a_task_waiting_for_another_process(
    backend_url: str, prefix: str
) -> None:
    """The task at the head of the local queue, waiting at the backend for a lock or a
    slot that another process holds, was not counted: both figures read 0."""
    async with make_coordinator(backend_url, prefix) as coordinator:
        with holding_process("hold", backend_url, prefix, "busy"):
            async with anyio.create_task_group() as group:
                group.start_soon(Lock("busy", coordinator=coordinator).acquire, 30.0)
                await _wait_until(lambda: coordinator.statistics().tasks_waiting == 1)
                assert coordinator.statistics().names_waited_for == 1
                # A second task waits behind the first, in the local queue.
                group.start_soon(Lock("busy", coordinator=coordinator).acquire, 30.0)
                await _wait_until(lambda: coordinator.statistics().tasks_waiting == 2)
                assert coordinator.statistics().names_waited_for == 1
                group.cancel_scope.cancel()
        stats = coordinator.statistics()
        assert (stats.tasks_waiting, stats.names_waited_for) == (0, 0)
        # A semaphore whose one slot another coordinator (another process, to this one)
        # holds.
        async with make_coordinator(backend_url, prefix) as other:
            async with Semaphore("pool", 1, coordinator=other):
                async with anyio.create_task_group() as group:
                    group.start_soon(Semaphore("pool", 1, coordinator=coordinator).acquire, 30.0)
                    await _wait_until(lambda: coordinator.statistics().tasks_waiting == 1)
                    assert coordinator.statistics().names_waited_for == 1
                    assert other.statistics().tasks_waiting == 0
                    group.cancel_scope.cancel()
        stats = coordinator.statistics()
        assert (stats.tasks_waiting, stats.names_waited_for, stats.locks_held) == (0, 0, 0)


# -- one event loop, one process ----------------------------------------------------------


async def _every_use(coordinator: Coordinator) -> list[str]:
    """Try every use of ``coordinator``; the ones that were not refused."""

    async def job() -> None:
        pass  # pragma: no cover - never leads

    @synchronized("decorated")
    async def decorated() -> None:
        pass  # pragma: no cover - never runs

    async def lock_block() -> None:
        async with coordinator.get_lock("x"):
            pass  # pragma: no cover

    async def semaphore_block() -> None:
        async with Semaphore("s", 2, coordinator=coordinator):
            pass  # pragma: no cover

    async def leadership_block() -> None:
        async with coordinator.leadership("l"):
            pass  # pragma: no cover

    uses: dict[str, Callable[[], Awaitable[object]]] = {
        "acquire": coordinator.get_lock("x").acquire,
        "acquire(blocking=False)": lambda: coordinator.get_lock("x").acquire(blocking=False),
        "async with lock": lock_block,
        "semaphore acquire": Semaphore("s", 2, coordinator=coordinator).acquire,
        "async with semaphore": semaphore_block,
        "async with leadership": leadership_block,
        "leader()": lambda: coordinator.leader("l"),
        "run_as_leader()": lambda: coordinator.run_as_leader("l", job),
        "@synchronized on the default coordinator": decorated,
        "wait_connected()": coordinator.wait_connected,
        "start()": coordinator.start,
        "stop()": coordinator.stop,
    }
    set_default_coordinator(coordinator)
    allowed = []
    try:
        for use, call in uses.items():
            with anyio.fail_after(5):
                try:
                    await call()
                except WrongEventLoop as exc:
                    assert "another event loop" in str(exc)
                    assert isinstance(exc, RuntimeError)
                else:
                    allowed.append(use)
    finally:
        set_default_coordinator(None)
    return allowed


async def _nothing_held(url: str, prefix: str) -> None:
    async with make_coordinator(url, prefix) as other:
        lock, semaphore = other.get_lock("x"), Semaphore("s", 1, coordinator=other)
        assert await lock.acquire(blocking=False)
        assert await semaphore.acquire(blocking=False)
        async with other.leadership("l", blocking=False):
            pass
        await semaphore.release()
        await lock.release()


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_coordinator_refuses_every_use_from_another_event_loop(
    loop: str, backend_url: str, prefix: str
) -> None:
    """Its heartbeat and lease watchdog ran only in the loop that started it: a lock
    taken from a second loop was held untold past its TTL (two holders on Redis)."""
    coordinator = make_coordinator(backend_url, prefix)
    with anyio.from_thread.start_blocking_portal(loop) as portal:
        portal.call(coordinator.start)
        held = coordinator.get_lock("held")
        assert portal.call(held.acquire)
        try:
            assert anyio.run(_every_use, coordinator, backend=loop) == []
            with pytest.raises(WrongEventLoop):
                anyio.run(held.release, backend=loop)
            with pytest.raises(WrongEventLoop):
                anyio.run(held.wait_lost, backend=loop)
            assert held.locked()
            assert coordinator.is_started
            stats = coordinator.statistics()
            assert (stats.locks_held, stats.tasks_waiting) == (1, 0)
            assert stats.held_names == ("held",)
            anyio.run(_nothing_held, backend_url, prefix, backend=loop)
        finally:
            portal.call(held.release)
            portal.call(coordinator.stop)


def test_a_coordinator_started_in_one_asyncio_run_is_refused_in_the_next(
    file_url: str, prefix: str
) -> None:
    """The shape from the report: a start-up step in an asyncio.run() of its own."""
    coordinator = make_coordinator(file_url, prefix)

    async def use() -> None:
        async with coordinator.get_lock("x"):
            pass  # pragma: no cover

    async def cycle() -> None:
        async with coordinator, coordinator.get_lock("x"):
            pass

    with asyncio.Runner() as first:
        first.run(coordinator.start())
        with pytest.raises(WrongEventLoop, match="another event loop"):
            asyncio.run(use())
        with pytest.raises(WrongEventLoop):
            asyncio.run(coordinator.stop())
        assert coordinator.statistics().locks_held == 0
        first.run(coordinator.stop())
    asyncio.run(cycle())  # once stopped, any loop may start it again
    trio.run(cycle)
