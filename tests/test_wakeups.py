"""Waiters woken by the backend, not by their next poll; fair between processes.

Redis (on asyncio, through the asyncio client's pub/sub), ZooKeeper (a watch on the
holder's node), etcd (a watch on the key), PostgreSQL and MySQL (a probe waiting at the
server), the last four on both event loops, wake a waiter when the lock is released. The poll
is pushed out to seconds here, so a hand-off that waited for it would fail the bound.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from aiotooz import Lock
from aiotooz import _tries as tries

from ._procs import worker_process
from .helpers import make_coordinator


@pytest.fixture
def slow_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls every 5 s at best: only a wake-up hands a lock over quickly."""
    monkeypatch.setattr(tries, "_POLL_FIRST", 5.0)
    monkeypatch.setattr(tries, "_POLL_CAP", 5.0)


async def _handoffs(url: str, prefix: str, rounds: int) -> list[float]:
    """Seconds from one coordinator's release to another's grant, per round."""
    latencies = []
    async with make_coordinator(url, prefix) as first, make_coordinator(url, prefix) as second:
        for number in range(rounds):
            holder = Lock("handed", coordinator=first)
            await holder.acquire()
            granted = anyio.Event()
            times: dict[str, float] = {}

            async def wait(times: dict[str, float] = times, granted: anyio.Event = granted) -> None:
                lock = Lock("handed", coordinator=second)
                await lock.acquire()
                times["granted"] = time.perf_counter()
                await lock.release()
                granted.set()

            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await anyio.sleep(0.05 + 0.01 * number)  # the waiter is waiting now
                times["released"] = time.perf_counter()
                await holder.release()
                with anyio.fail_after(20):
                    await granted.wait()
            latencies.append(times["granted"] - times["released"])
    return latencies


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_wakes_a_waiter_on_release(
    redis_url: str, prefix: str, slow_polls: None
) -> None:
    latencies = await _handoffs(redis_url, prefix, 5)
    assert 0 < min(latencies) and max(latencies) < 0.5, latencies


@pytest.mark.parametrize("backend", ["zookeeper", "etcd", "postgresql", "mysql"])
async def test_a_watch_wakes_a_waiter_on_release(
    backend: str, private_server: Any, prefix: str, slow_polls: None
) -> None:
    """ZooKeeper: a watch on the holder's node; etcd: a watch on the key's deletion;
    PostgreSQL and MySQL: a probe waiting at the server in 1 s slices."""
    server = private_server(backend)
    latencies = await _handoffs(server.url, prefix, 5)
    assert 0 < min(latencies) and max(latencies) < 0.5, latencies


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_without_a_wake_up_a_waiter_polls(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: on trio, Redis waiters poll (the asyncio client is asyncio's)."""
    monkeypatch.setattr(tries, "_POLL_FIRST", 1.0)
    monkeypatch.setattr(tries, "_POLL_CAP", 1.0)
    latencies = await _handoffs(redis_url, prefix, 2)
    assert min(latencies) > 0.2, latencies


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_busy_process_lets_a_woken_foreign_waiter_in(redis_url: str, prefix: str) -> None:
    """20 tasks of this process take turns on one lock (1 ms holds). A waiter in another
    process used to wait seconds: after 8 local hand-offs the releasing process's next
    waiter retried at once while the foreign one slept until its next poll. Now the
    release wakes it, and the releasing process steps back."""
    async with make_coordinator(redis_url, prefix) as coordinator:
        stop = anyio.Event()

        async def busy() -> None:
            while not stop.is_set():
                async with Lock("busy", coordinator=coordinator):
                    await anyio.sleep(0.001)

        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(busy)
            await anyio.sleep(0.2)
            waits = []
            for _ in range(3):
                with worker_process("grant", redis_url, prefix, "busy") as waiter:
                    await anyio.to_thread.run_sync(waiter.expect, "waiting")
                    asked = time.time()
                    line = await anyio.to_thread.run_sync(waiter.readline)
                    waits.append(float(line) - asked)
            stop.set()
    assert max(waits) < 1.0, waits  # generous: it took 1.7-5.9 s before, ~10 ms now


async def test_a_closed_lock_file_wakes_a_waiter(
    file_url: str, prefix: str, slow_polls: None
) -> None:
    """file: the kernel reports the release's close of the lock file (inotify)."""
    latencies = await _handoffs(file_url, prefix, 5)
    assert 0 < min(latencies) and max(latencies) < 0.5, latencies


@pytest.mark.parametrize("backend", ["file", "ipc"])
@pytest.mark.parametrize("releaser", ["aiotooz", "plain tooz"])
async def test_a_release_in_another_process_wakes_a_waiter(
    backend: str, releaser: str, tmp_path: Any, prefix: str, slow_polls: None
) -> None:
    """A release in another process, by aiotooz or by plain tooz (which signals nothing
    itself: the kernel sees the file closed, or the semaphore removed), wakes the waiter
    long before its 5 s poll."""
    url = (tmp_path / "locks").as_uri() if backend == "file" else "ipc://"
    command = "hold" if releaser == "aiotooz" else "tooz-hold"
    async with make_coordinator(url, prefix) as coordinator:
        with worker_process(command, url, prefix, "handed") as holder:
            await anyio.to_thread.run_sync(holder.expect, "waiting")
            await anyio.to_thread.run_sync(holder.expect, "held")
            lock = Lock("handed", coordinator=coordinator)
            async with anyio.create_task_group() as group:
                granted = anyio.Event()

                async def wait() -> None:
                    await lock.acquire()
                    granted.set()

                group.start_soon(wait)
                await anyio.sleep(0.2)  # waiting (and watching) now
                assert not granted.is_set()
                released = time.perf_counter()
                holder.end_input()  # it releases and exits
                with anyio.fail_after(20):
                    await granted.wait()
                waited = time.perf_counter() - released
            await lock.release()
    # The worker has to read its closed input first: generous, and far below 5 s.
    assert waited < 1.0, waited
