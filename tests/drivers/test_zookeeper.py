"""ZooKeeper: the session carries the lock nodes. A beat proves the session; the locks
of a session that expired are lost."""

from __future__ import annotations

from pathlib import Path

import anyio

from aiotooz import Lock

from ..support.helpers import ServerPool, close_zookeeper_session, make_coordinator, url_for


async def test_zookeeper_locks_of_an_expired_session_are_lost(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """A beat reads no lock node: it proves the session. A session that expired (here:
    closed from outside with its id and password) took its nodes with it, and kazoo
    makes a new one; every lock granted in the old one must read lost."""
    url = url_for("zookeeper", server_pool, tmp_path) + "?timeout=3"
    async with make_coordinator(url, prefix, heartbeat=0.2) as coordinator:
        locks = [
            Lock(f"session-{n}", coordinator=coordinator, cancel_on_loss=False) for n in range(3)
        ]
        for lock in locks:
            assert await lock.acquire()
        await close_zookeeper_session(coordinator)
        with anyio.fail_after(10):
            for lock in locks:
                await lock.wait_lost()
        for lock in locks:
            await lock.release()
        again = Lock("session-0", coordinator=coordinator)
        with anyio.fail_after(15):
            assert await again.acquire()
        await again.release()
