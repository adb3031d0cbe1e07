"""@synchronized: one lock per resource, named from the call's arguments.

The functions are decorated at import time, before any coordinator exists; the default
coordinator is looked up at each call, so one installed at startup serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio

import aiotooz
from aiotooz import Coordinator, synchronized


@dataclass
class Share:
    """A shared file system, as far as this example cares."""

    id: str
    size_gb: int


@synchronized("{f_name}-{share.id}")
async def resize(share: Share, new_size_gb: int, *, dry_run: bool = False) -> None:
    # Calls for the same share run one at a time, across every process on the backend;
    # calls for different shares run side by side.
    print(f"resizing {share.id}: {share.size_gb} -> {new_size_gb} GB")
    await anyio.sleep(0.1)
    if not dry_run:
        share.size_gb = new_size_gb


@synchronized("{f_name}-{share.id}", blocking=False)
async def snapshot(share: Share) -> None:
    print(f"snapshot of {share.id}")
    await anyio.sleep(0.1)


async def main() -> None:
    shares = [Share("a", 10), Share("b", 20)]
    async with Coordinator(prefix="example-") as coordinator:
        aiotooz.set_default_coordinator(coordinator)  # uninstalled again on stop
        started = anyio.current_time()
        async with anyio.create_task_group() as group:
            for share in shares:
                for size in (30, 40):
                    group.start_soon(resize, share, size)
        print(f"4 resizes of 2 shares took {anyio.current_time() - started:.1f} s (2 x 0.1 s)")

        async with coordinator.get_lock("snapshot-a"):
            try:
                await snapshot(shares[0])
            except aiotooz.LockAcquireFailed as exc:
                print(f"as expected with blocking=False: {exc}")
        await snapshot(shares[0])


if __name__ == "__main__":
    anyio.run(main)
