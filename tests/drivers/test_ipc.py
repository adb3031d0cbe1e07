"""The ipc backend (System V semaphores): a try that does not wait, where tooz's ipc
driver cannot make one."""

from __future__ import annotations

from pathlib import Path

import anyio

from aiotooz import Lock

from ..support.helpers import make_coordinator


async def test_ipc_tries_without_waiting(tmp_path: Path, prefix: str) -> None:
    """tooz's ipc driver refuses non-blocking tries where sysv_ipc has no semaphore
    timeouts (PyPI's wheels); aiotooz's own try works there and where it has them (a
    build from source, as `nox -s tests_lowest` installs sysv-ipc 1.0)."""
    async with (
        make_coordinator("ipc://", prefix) as first,
        make_coordinator("ipc://", prefix) as second,
    ):
        async with first.get_lock("sem"):
            with anyio.fail_after(2):
                assert await Lock("sem", coordinator=second).acquire(blocking=False) is False
        lock = Lock("sem", coordinator=second)
        assert await lock.acquire(blocking=False) is True
        await lock.release()
