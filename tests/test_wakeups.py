"""Waiters woken by the backend, not by their next poll; fair between processes.

Redis and Redis Cluster (on asyncio, through the asyncio client's pub/sub), ZooKeeper (a
watch on the holder's node), etcd (a watch on the key), PostgreSQL and MySQL (a probe
waiting at the server), file (inotify) and ipc (a probe waiting on the semaphore), all
but Redis on both event loops, wake a waiter when the lock is released. The poll
is pushed out to seconds here, so a hand-off that waited for it would fail the bound.
Redis's and Redis Cluster's own hand-off tests, and the trio control where Redis waiters
poll, are in tests/drivers/test_redis.py.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from aiotooz import Lock, RWLock, Semaphore
from aiotooz import _tries as tries

from .support.helpers import (
    WOKEN_WITHIN,
    ServerPool,
    handoffs,
    make_coordinator,
    prefix_without_pg_collisions,
    url_for,
)
from .support.procs import worker_process


@pytest.mark.parametrize("backend", ["zookeeper", "etcd", "postgresql", "mysql"])
async def test_a_watch_wakes_a_waiter_on_release(
    backend: str, private_server: Any, prefix: str, slow_polls: None
) -> None:
    """ZooKeeper: a watch on the holder's node; etcd: a watch on the key's deletion;
    PostgreSQL and MySQL: a probe waiting at the server in 1 s slices."""
    server = private_server(backend)
    latencies = await handoffs(server.url, prefix, 5)
    assert 0 < min(latencies) and max(latencies) < WOKEN_WITHIN, latencies


@pytest.mark.parametrize(
    ("backend", "anyio_backend"),
    [
        ("redis", "asyncio"),
        ("redis-cluster", "asyncio"),
        ("file", "asyncio"),
        ("file", "trio"),
        ("ipc", "asyncio"),
        ("ipc", "trio"),
        ("postgresql", "asyncio"),
        ("postgresql", "trio"),
        ("mysql", "asyncio"),
    ],
)
async def test_a_busy_process_lets_a_woken_foreign_waiter_in(
    backend: str, redis_url: str, file_url: str, private_server: Any, prefix: str
) -> None:
    """20 tasks of this process take turns on one lock (1 ms holds). A waiter in another
    process used to wait seconds: after 8 local hand-offs the releasing process's next
    waiter retried at once while the foreign one slept until its next poll. Now the
    release wakes it, the releasing process knows it waits (Redis: the release script
    counts the subscribers it told, on Redis Cluster those of the lock's node; file: a
    shared lock on the key's marker file; ipc: threads blocked on the semaphore;
    PostgreSQL and MySQL: sessions waiting at the server), and steps back."""
    if backend == "redis":
        url = redis_url
    elif backend == "file":
        url = file_url
    elif backend == "ipc":
        url = "ipc://"
    else:
        url = private_server(backend).url
    async with make_coordinator(url, prefix) as coordinator:
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
                with worker_process("grant", url, prefix, "busy", "warm") as waiter:
                    await anyio.to_thread.run_sync(waiter.expect, "waiting")
                    asked = time.time()
                    line = await anyio.to_thread.run_sync(waiter.readline)
                    waits.append(float(line) - asked)
            stop.set()
    assert max(waits) < 1.0, waits  # generous: it took 1.7-5.9 s before, ~10 ms now


@pytest.mark.parametrize("backend", ["file", "ipc"])
async def test_the_kernel_wakes_a_waiter(
    backend: str, file_url: str, prefix: str, slow_polls: None
) -> None:
    """file: inotify reports the release's close of the lock file; ipc: a probe's wait
    on the semaphore ends when the release removes it."""
    latencies = await handoffs(file_url if backend == "file" else "ipc://", prefix, 5)
    assert 0 < min(latencies) and max(latencies) < WOKEN_WITHIN, latencies


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
    # The worker has to read its closed input first: half the poll, as above.
    assert waited < WOKEN_WITHIN, waited


@pytest.mark.parametrize(
    ("backend", "anyio_backend"),
    [("file", "asyncio"), ("file", "trio"), ("redis", "asyncio")],
)
async def test_a_slot_released_in_another_process_wakes_a_semaphore_waiter(
    backend: str, redis_url: str, tmp_path: Any, prefix: str, slow_polls: None
) -> None:
    """A semaphore's waiter watches every slot as a lock's waiter watches its key (where
    the watch is kept on the event loop: inotify, Redis pub/sub): a slot released in
    another process wakes it long before its poll (it polled every 2-50 ms on its own,
    and waited for the poll whatever the backend could tell)."""
    url = (tmp_path / "locks").as_uri() if backend == "file" else redis_url
    async with make_coordinator(url, prefix) as coordinator:
        with worker_process("hold-slots", url, prefix, "api", "3") as holder:
            await anyio.to_thread.run_sync(holder.expect, "waiting")
            await anyio.to_thread.run_sync(holder.expect, "held")
            semaphore = Semaphore("api", 3, coordinator=coordinator)
            waits = []
            for _ in range(2):
                async with anyio.create_task_group() as group:
                    granted = anyio.Event()

                    async def wait(granted: anyio.Event = granted) -> None:
                        await semaphore.acquire()
                        granted.set()

                    group.start_soon(wait)
                    await anyio.sleep(0.3)  # waiting (and watching) now
                    assert not granted.is_set()
                    released = time.perf_counter()
                    holder.send("release")
                    with anyio.fail_after(20):
                        await granted.wait()
                    waits.append(time.perf_counter() - released)
            await anyio.to_thread.run_sync(holder.expect, "released")
            await anyio.to_thread.run_sync(holder.expect, "released")
            for _ in range(2):
                await semaphore.release()  # the slots the two waiting tasks took
    # Far below the poll (the worker reads its line first): only a wake-up is this quick.
    assert max(waits) < tries._POLL_CAP / 5, waits


#: What a coordinator parks at most to wake its waiters (README, "Waiting, wake-ups").
_PARKED_LIMIT = {"mysql": 4, "etcd": 16, "file": 0, "ipc": 16}


@pytest.mark.parametrize("backend", ["mysql", "etcd", "file"])
async def test_many_waiters_park_a_bounded_number_of_threads(
    backend: str, private_server: Any, tmp_path: Any, prefix: str
) -> None:
    """1,000 tasks wait for 200 names another process holds: the waiting process parks
    at most the documented number of probe or watch threads (and, on MySQL,
    connections), and once the waiters are cancelled, nothing within a few slices."""
    url = (tmp_path / "locks").as_uri() if backend == "file" else private_server(backend).url
    limit = _PARKED_LIMIT[backend]
    with worker_process("hold-many", url, prefix, "many", "200") as holder:
        await anyio.to_thread.run_sync(holder.expect, "waiting")
        with anyio.fail_after(120):
            await anyio.to_thread.run_sync(holder.expect, "held")
        before = threading.active_count()
        async with make_coordinator(url, prefix) as coordinator:

            async def wait(number: int) -> None:
                await Lock(f"many-{number % 200}", coordinator=coordinator).acquire()
                raise AssertionError("granted while another process holds it")

            most_parked = most_threads = 0
            async with anyio.create_task_group() as group:
                for number in range(1000):
                    group.start_soon(wait, number)
                for _ in range(30):  # 3 s of waiting: tries, watches and probes
                    await anyio.sleep(0.1)
                    stats = coordinator.statistics()
                    most_parked = max(most_parked, stats.release_watchers)
                    most_threads = max(most_threads, threading.active_count() - before)
                assert stats.names_waited_for == 200 and stats.tasks_waiting >= 800
                group.cancel_scope.cancel()
            assert most_parked <= limit, most_parked
            # Worker lanes (4 threads), the parked ones, one connect lane at most.
            assert most_threads <= 4 + limit + 1, (most_threads, most_parked)
            with anyio.fail_after(10):  # each parked thread ends within one slice
                while coordinator.statistics().release_watchers:
                    await anyio.sleep(0.05)
            if backend == "mysql":
                assert most_parked == limit  # the probes were used, up to the bound


@pytest.mark.parametrize(
    ("backend", "kind"),
    [
        ("zookeeper", "lock"),
        ("etcd3+http", "lock"),
        ("postgresql", "lock"),
        ("mysql", "lock"),
        ("ipc", "lock"),
        ("zookeeper", "write"),
        ("etcd3+http", "write"),
        ("postgresql", "write"),
    ],
)
async def test_waiters_cancelled_while_arming_a_watch_leave_nothing_behind(
    backend: str, kind: str, server_pool: ServerPool, tmp_path: Path, prefix: str, seed: int
) -> None:
    """A waiter cancelled while a worker thread arms its watch does not wait for that call;
    the watch it armed after the waiter had left used to stay: an etcd watch stream and
    its thread, a probe or a SQL session queued at the server (which then took the lock
    for nobody), a read-write contender node or key (which held back everyone after it)
    until the coordinator stopped. Cancelled at random moments, some of them mid-arm."""
    draw = random.Random(seed)
    url = url_for(backend, server_pool, tmp_path)

    # A name for each waiter: a later waiter's disarm of the same name (on drivers that
    # key watches by name) would hide a leak.
    names = [f"armed-{number}" for number in range(30)]
    prefix = prefix_without_pg_collisions(prefix, names)

    async def take(
        coordinator: Any, name: str, blocking: bool | float = True, read: bool = False
    ) -> Any:
        """A lock (or a read-write lock's write side, or its read side) of this
        coordinator's, taken; what to release, or ``None`` if it was not."""
        if kind == "lock":
            lock: Any = Lock(name, coordinator=coordinator)
            return lock if await lock.acquire(blocking) else None
        lock = RWLock(name, coordinator=coordinator)
        taken = await (lock.acquire_read if read else lock.acquire_write)(blocking)
        return lock if taken else None

    async with (
        make_coordinator(url, prefix) as holding,
        make_coordinator(url, prefix) as waiting,
    ):
        held = [await take(holding, name) for name in names]
        try:
            for name in names:
                with anyio.move_on_after(draw.uniform(0, 0.05)):
                    await take(waiting, name)
                    raise AssertionError("granted while another coordinator holds it")
            # Whatever the cancelled waiters armed ends (a probe within a slice).
            with anyio.fail_after(10):
                while waiting.statistics().release_watchers:
                    await anyio.sleep(0.05)
        finally:
            for lock in held:
                await lock.release()
        # Nothing of theirs holds a lock or queues ahead: a newcomer (a reader, behind
        # any writer's place left in the queue) gets each one.
        async with make_coordinator(url, prefix) as newcomer:
            for name in names:
                late = await take(newcomer, name, blocking=5, read=True)
                assert late is not None, name
                await late.release()
