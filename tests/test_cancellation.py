"""A task cancelled while waiting, or while its try runs in a worker thread, leaks nothing."""

from __future__ import annotations

import random
from urllib.parse import urlsplit

import anyio

from aiotooz import Lock

from ._procs import run_worker
from ._proxy import DelayProxy
from .conftest import make_coordinator


async def _storm(url: str, prefix: str, name: str, tasks: int) -> int:
    """Many tasks contend for ``name``, each cancelled at a random moment; count cancellations."""
    cancelled = 0
    async with make_coordinator(url, prefix) as coordinator:

        async def contender() -> None:
            nonlocal cancelled
            with anyio.move_on_after(random.uniform(0, 0.3)) as scope:
                await anyio.sleep(random.uniform(0, 0.05))
                async with Lock(name, coordinator=coordinator):
                    await anyio.sleep(random.uniform(0, 0.005))
            cancelled += scope.cancelled_caught

        async with anyio.create_task_group() as group:
            for _ in range(tasks):
                group.start_soon(contender)
        # Every task is gone: nothing may be held, locally or at the backend.
        stats = coordinator.statistics()
        assert (stats.locks_held, stats.tasks_waiting, stats.names_waited_for) == (0, 0, 0)
    return cancelled


async def test_random_cancellations_on_the_file_backend(file_url: str, prefix: str) -> None:
    cancelled = await _storm(file_url, prefix, "storm", 400)
    assert cancelled >= 100
    assert run_worker("try", file_url, prefix, "storm") == "acquired"


async def test_random_cancellations_mid_try_on_a_slow_redis(redis_url: str, prefix: str) -> None:
    """Behind a 15 ms-per-chunk proxy each try spends ~30 ms in its worker thread, so
    many cancellations land while tooz is talking to Redis."""
    parts = urlsplit(redis_url)
    with DelayProxy(parts.hostname or "127.0.0.1", parts.port or 6379, 0.015) as proxy:
        slow_url = f"redis://127.0.0.1:{proxy.port}"
        cancelled = await _storm(slow_url, prefix, "storm", 300)
    assert cancelled >= 100
    # Straight to Redis, another process gets the lock at once.
    assert run_worker("try", redis_url, prefix, "storm") == "acquired"
