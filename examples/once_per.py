"""@once_per: a scheduled job that runs once per window, however many replicas call it.

Three replicas (three coordinators, as three processes or hosts would have) each run the
same plain scheduler loop: call the job every 0.25 s for 2 s. With 1 s windows, each window's
job runs exactly once, on whichever replica claims it first; every other call returns
``None`` without running it. Replace the loop with APScheduler, cron or a Kubernetes
CronJob: every replica may fire, one runs.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import anyio

from aiotooz import Coordinator, once_per

EVERY = 1.0  # seconds; a datetime.timedelta works too (timedelta(hours=1))


async def replica(number: int, prefix: str, runs: Counter[int]) -> None:
    async with Coordinator(prefix=prefix) as coordinator:

        @once_per("report", EVERY, coordinator=coordinator)
        async def send_report() -> str:
            window = int(time.time() // EVERY * EVERY)  # windows are aligned to the epoch
            print(f"replica {number} sends the report of window {window}")
            await anyio.sleep(0.05)  # the work
            return f"sent by {number}"

        await anyio.sleep(number / 10)  # replicas' schedulers are never quite in step
        for _ in range(8):  # a plain scheduler: every 0.25 s for 2 s
            result = await send_report()
            if result is not None:
                runs[number] += 1
            await anyio.sleep(EVERY / 4)


async def main() -> None:
    prefix = f"example-{uuid.uuid4().hex[:6]}-"  # a fresh job name for each run
    runs: Counter[int] = Counter()
    started = anyio.current_time()
    async with anyio.create_task_group() as group:
        for number in (1, 2, 3):
            group.start_soon(replica, number, prefix, runs)
    elapsed = anyio.current_time() - started
    print(
        f"{sum(runs.values())} runs in {elapsed:.1f} s of 1 s windows, 24 calls "
        f"(by replica: {dict(sorted(runs.items()))})"
    )


if __name__ == "__main__":
    anyio.run(main)
