"""Semaphore: at most 3 calls at once to a rate-limited API, from every process.

Runs on the embedded default backend (a lock directory on this machine); set
AIOTOOZ_BACKEND_URL=redis://127.0.0.1:6379 (or any tooz URL) to share the limit across
machines. Start it in two terminals at once: together they still stay at 3.
"""

from __future__ import annotations

import os

import anyio

from aiotooz import CoordinationSettings, Coordinator, Semaphore

LIMIT = 3
inside = peak = 0


async def call_partner_api(semaphore: Semaphore, number: int) -> None:
    global inside, peak
    async with semaphore:  # waits for a free slot, first come, first served
        inside += 1
        peak = max(peak, inside)
        print(f"call {number:>2} (pid {os.getpid()}) runs in slot {semaphore.slot}")
        await anyio.sleep(0.05)  # the call; at most LIMIT run at once, anywhere
        inside -= 1


async def main() -> None:
    settings = CoordinationSettings()  # AIOTOOZ_BACKEND_URL and friends, or defaults
    print(f"backend: {settings.redacted_backend_url}")
    async with Coordinator(prefix="semaphore-example-", settings=settings) as coordinator:
        partner_api = Semaphore("partner-api", LIMIT, coordinator=coordinator)
        async with anyio.create_task_group() as group:
            for number in range(10):
                group.start_soon(call_partner_api, partner_api, number)
        # A slot can also be tried without waiting, or for a bounded time.
        async with partner_api(blocking=2.5):
            print("main got a slot within 2.5 s")
    print(f"peak concurrency in this process: {peak} (limit {LIMIT})")
    assert 1 <= peak <= LIMIT


if __name__ == "__main__":
    anyio.run(main)
