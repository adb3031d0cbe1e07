"""A task cancelled while waiting, or while its try runs in a worker thread, leaks nothing.

The storms draw their timings from ``random.Random(seed)`` (the ``seed`` fixture): a
failure states the seed, and ``AIOTOOZ_TEST_SEED=<seed>`` draws the same timings again
(the interleaving of tasks and threads still varies from run to run).
"""

from __future__ import annotations

import random
from urllib.parse import urlsplit

import anyio

from aiotooz import Lock

from .support.helpers import SEED_VARIABLE, make_coordinator
from .support.procs import run_worker
from .support.proxy import DelayProxy


async def _storm(url: str, prefix: str, name: str, tasks: int, seed: int) -> int:
    """Many tasks contend for ``name``, each cancelled at a random moment; count cancellations."""
    rng = random.Random(seed)
    # Each task's timings, drawn before any task runs: the seed alone decides them.
    plans = [
        (rng.uniform(0, 0.3), rng.uniform(0, 0.05), rng.uniform(0, 0.005)) for _ in range(tasks)
    ]
    cancelled = 0
    async with make_coordinator(url, prefix) as coordinator:

        async def contender(deadline: float, arrive: float, hold: float) -> None:
            nonlocal cancelled
            with anyio.move_on_after(deadline) as scope:
                await anyio.sleep(arrive)
                async with Lock(name, coordinator=coordinator):
                    await anyio.sleep(hold)
            cancelled += scope.cancelled_caught

        async with anyio.create_task_group() as group:
            for plan in plans:
                group.start_soon(contender, *plan)
        # Every task is gone: nothing may be held, locally or at the backend.
        stats = coordinator.statistics()
        left = (stats.locks_held, stats.tasks_waiting, stats.names_waited_for)
        assert left == (0, 0, 0), f"(held, waiting, names) left: {left}; {_rerun(seed)}"
    return cancelled


def _rerun(seed: int) -> str:
    return f"seed {seed}: rerun with {SEED_VARIABLE}={seed}"


async def test_random_cancellations_on_the_file_backend(
    file_url: str, prefix: str, seed: int
) -> None:
    cancelled = await _storm(file_url, prefix, "storm", 400, seed)
    assert cancelled >= 100, f"only {cancelled} cancellations; {_rerun(seed)}"
    outcome = run_worker("try", file_url, prefix, "storm")
    assert outcome == "acquired", f"the lock stayed held; {_rerun(seed)}"


async def test_random_cancellations_mid_try_on_a_slow_redis(
    redis_url: str, prefix: str, seed: int
) -> None:
    """Behind a 15 ms-per-chunk proxy each try spends ~30 ms in its worker thread, so
    many cancellations land while tooz is talking to Redis."""
    parts = urlsplit(redis_url)
    with DelayProxy(parts.hostname or "127.0.0.1", parts.port or 6379, 0.015) as proxy:
        slow_url = f"redis://127.0.0.1:{proxy.port}"
        cancelled = await _storm(slow_url, prefix, "storm", 300, seed)
    assert cancelled >= 100, f"only {cancelled} cancellations; {_rerun(seed)}"
    # Straight to Redis, another process gets the lock at once.
    outcome = run_worker("try", redis_url, prefix, "storm")
    assert outcome == "acquired", f"the lock stayed held; {_rerun(seed)}"
