"""One coordinator holding thousands of locks keeps every one of them.

The heartbeat's cost must not grow with the locks held: with a per-lock refresh (and a
per-lock ownership check) the beat outgrew the lease rule's 3/4 of the TTL at a few
thousand locks, and every holder was declared lost together. Speed figures (beat
duration, loop lag, acquire rates) live in ``benchmarks/scale.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from aiotooz import Lock

from .support.helpers import ServerPool, make_coordinator, url_for

#: Locks held at once, per backend, and for how long (seconds): several TTLs, so that a
#: beat that outgrows the lease loses them. Each count lost most or all of its locks
#: with a per-lock refresh (Redis refreshes a lock cheapest, so it takes more), and keeps
#: the test within about 30 s on a loaded 2-core machine (etcd and ZooKeeper make a try
#: slowest). memcached holds the issue's 2,000: its pipelined beat of 5,000, parsed in
#: Python under coverage on a slow and loaded 2-core machine, once took more than the
#: lease rule's 2.4 s (benchmarks/scale.py measures the beat itself).
HELD = {
    "redis": 5000,
    "redis+cluster": 5000,
    "memcached": 2000,
    "etcd3+http": 1000,
    "zookeeper": 2000,
}
HOLD_FOR = 7.0
#: The URL's TTL option and the beat the issue's service runs with: a 3 s TTL (on
#: memcached, which may expire an item a second early, 4 s guarantees 3 s) and 1 s beats.
TTL = {
    "redis": "lock_timeout=3",
    "redis+cluster": "lock_timeout=3",
    "memcached": "lock_timeout=4",
    "etcd3+http": "lock_timeout=3",
    "zookeeper": "timeout=3",
}
BEAT = 1.0
#: Tries in flight at once while taking the locks.
PARALLEL = 16


#: Every backend on asyncio, and Redis on trio too: the beat runs in a worker thread alike
#: on both event loops, except on Redis, whose tries and releases run on asyncio's own
#: client there and through worker threads on trio. (The cases are 10 to 19 s each.)
CASES = [
    *(("asyncio", backend) for backend in HELD),
    ("trio", "redis"),
]


@pytest.mark.parametrize(("anyio_backend", "backend"), CASES)
async def test_one_coordinator_holds_thousands_of_locks_without_losing_one(
    anyio_backend: str, backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    held = HELD[backend]
    url = f"{url_for(backend, server_pool, tmp_path)}?{TTL[backend]}"
    async with make_coordinator(url, prefix, heartbeat=BEAT) as coordinator:
        locks = [Lock(f"job-{number}", coordinator=coordinator) for number in range(held)]
        await _in_parallel(locks, Lock.acquire)
        assert all(lock.locked() for lock in locks)
        assert coordinator.statistics().locks_held == held
        await anyio.sleep(HOLD_FOR)
        lost = [lock.lost_reason for lock in locks if lock.lost]
        assert not lost, f"{len(lost)} of {held} lost, first: {lost[0]}"
        assert coordinator.statistics().locks_lost == 0
        await _in_parallel(locks, Lock.release)
        assert coordinator.statistics().locks_held == 0


async def _in_parallel(locks: list[Lock], call: Callable[[Lock], Awaitable[object]]) -> None:
    """``call`` each lock, ``PARALLEL`` at a time (workers: a task per lock would block
    the event loop itself for a while, spawning thousands at once)."""
    pending = iter(locks)

    async def worker() -> None:
        for lock in pending:
            await call(lock)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for _ in range(PARALLEL):
                group.start_soon(worker)
