"""Quickstart: several workers take turns on one distributed lock.

Runs on the embedded default backend (a lock directory on this machine); set
AIOTOOZ_BACKEND_URL=redis://127.0.0.1:6379 (or any tooz URL) to share it across machines.
Start it in two terminals at once to see the workers of both processes take turns.
"""

from __future__ import annotations

import os

import anyio
import anyio.lowlevel

from aiotooz import CoordinationSettings, Coordinator


async def worker(coordinator: Coordinator, number: int, rounds: int) -> None:
    me = f"worker-{number} (pid {os.getpid()})"
    for _ in range(rounds):
        async with coordinator.get_lock("printer"):
            print(f"{me} holds the lock")
            await anyio.sleep(0.05)  # the critical section: nobody else holds it now
        await anyio.lowlevel.checkpoint()


async def main() -> None:
    settings = CoordinationSettings()  # AIOTOOZ_BACKEND_URL and friends, or defaults
    print(f"backend: {settings.redacted_backend_url}")
    async with Coordinator(prefix="quickstart-", settings=settings) as coordinator:
        async with anyio.create_task_group() as group:
            for number in range(1, 4):
                group.start_soon(worker, coordinator, number, 2)
        # A lock can also be tried without waiting, or for a bounded time.
        lock = coordinator.get_lock("printer")
        if await lock.acquire(blocking=2.5):
            print("main took the lock within 2.5 s")
            await lock.release()
    print("done: every lock was released when the coordinator stopped")


if __name__ == "__main__":
    anyio.run(main)
