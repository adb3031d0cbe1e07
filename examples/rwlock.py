"""RWLock: many readers of a configuration at once, a rare writer alone, in every process.

Runs on the embedded default backend (a lock directory on this machine); set
AIOTOOZ_BACKEND_URL=redis://127.0.0.1:6379 or postgresql://... to share the lock across
machines. Start it in two terminals at once: no write ever overlaps a read, anywhere.
"""

from __future__ import annotations

import os

import anyio

from aiotooz import (
    CoordinationSettings,
    Coordinator,
    LockAcquireFailed,
    RWLock,
    fencing_token,
)

readers_inside = peak_readers = 0
writer_inside = False


async def read_config(config: RWLock, number: int) -> None:
    global readers_inside, peak_readers
    for _ in range(5):
        async with config.read():  # shared with every other reader
            assert not writer_inside
            readers_inside += 1
            peak_readers = max(peak_readers, readers_inside)
            await anyio.sleep(0.02)  # read the configuration
            readers_inside -= 1


async def migrate(config: RWLock) -> None:
    global writer_inside
    await anyio.sleep(0.03)  # arrives while readers stream in: they let it go first
    async with config.write(blocking=5):  # alone: no reader, no other writer
        assert readers_inside == 0
        writer_inside = True
        # With fencing=True each write grant has a token larger than every earlier one:
        # send it with the write, and have the store refuse smaller ones.
        print(f"migration (pid {os.getpid()}) writes with fencing token {fencing_token()}")
        await anyio.sleep(0.05)
        writer_inside = False


async def main() -> None:
    settings = CoordinationSettings()  # AIOTOOZ_BACKEND_URL and friends, or defaults
    print(f"backend: {settings.redacted_backend_url}")
    async with Coordinator(prefix="rwlock-example-", settings=settings) as coordinator:
        config = RWLock("config", coordinator=coordinator, fencing=True)
        async with anyio.create_task_group() as group:
            for number in range(6):
                group.start_soon(read_config, config, number)
            group.start_soon(migrate, config)
        # No upgrade: a reader that wants to write must let go first (no deadlock).
        async with config.read():
            try:
                await config.acquire_write()
            except LockAcquireFailed as refused:
                print(f"refused at once: {refused}")
    print(f"peak readers at once in this process: {peak_readers}")
    assert peak_readers >= 2


if __name__ == "__main__":
    anyio.run(main)
