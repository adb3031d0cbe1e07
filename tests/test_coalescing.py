"""In-process coalescing: one task per name talks to the backend; bounded local hand-off.

Counted on a private Redis through its own command statistics: a real server, no mocks.
"""

from __future__ import annotations

import anyio
import redis

from aiotooz import Lock

from .support.helpers import make_coordinator
from .support.procs import holding_process
from .support.servers import PrivateRedis


def _calls(url: str, command: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_waiters_of_one_process_poll_the_backend_through_one_task(
    private_redis: PrivateRedis, prefix: str
) -> None:
    url = private_redis.url
    async with make_coordinator(url, prefix, heartbeat=5) as coordinator:
        with holding_process("hold", url, prefix, "crowded"):
            before = _calls(url, "set")
            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(Lock("crowded", coordinator=coordinator).acquire, 1.0)
            tries = _calls(url, "set") - before
    # One head polls, backing off to 50 ms: a few dozen tries in 1 s, not 50 tasks' worth.
    assert 5 <= tries <= 60, tries


async def test_local_hand_off_skips_the_backend_a_bounded_number_of_times(
    private_redis: PrivateRedis, prefix: str
) -> None:
    url = private_redis.url
    order: list[int] = []
    async with make_coordinator(url, prefix, heartbeat=5) as coordinator:
        first = coordinator.get_lock("relay")
        await first.acquire()
        before = _calls(url, "set")

        async def runner(number: int) -> None:
            async with Lock("relay", coordinator=coordinator):
                order.append(number)
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as group:
            for number in range(27):
                group.start_soon(runner, number)
                await anyio.sleep(0.001)  # queue up in order
            await first.release()
        acquisitions = _calls(url, "set") - before
        assert coordinator.statistics().locks_held == 0
    assert order == list(range(27))  # first come, first served, hand-off or not
    # 28 holders in all; every 9th one re-acquires at the backend (8 hand-offs in a row).
    assert acquisitions == 3, acquisitions
