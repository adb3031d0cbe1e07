"""The file backend: one directory under several spellings, and URLs with '.' or '..'."""

from __future__ import annotations

from pathlib import Path

import anyio

from aiotooz import Lock

from ._procs import run_worker
from .helpers import make_coordinator


async def test_one_directory_under_two_spellings_is_one_lock(tmp_path: Path, prefix: str) -> None:
    """Through a symlinked directory (/var/lock -> /run/lock), two coordinators of one
    process both held one name; releasing one closed a descriptor, and POSIX dropped the
    other's fcntl lock, so a third process got it too."""
    real = tmp_path / "run-lock"
    await anyio.Path(real).mkdir()
    link = tmp_path / "var-lock"
    await anyio.Path(link).symlink_to(real, target_is_directory=True)
    async with (
        make_coordinator(real.as_uri(), prefix) as first,
        make_coordinator(link.as_uri(), prefix) as second,
    ):
        held = Lock("spelled", coordinator=first)
        await held.acquire()
        other = Lock("spelled", coordinator=second)
        assert await other.acquire(blocking=False) is False
        assert await other.acquire(blocking=0.1) is False
        # The failed tries closed nothing the holder needs: another process is kept out.
        assert run_worker("try", link.as_uri(), prefix, "spelled") == "busy"
        assert run_worker("try", real.as_uri(), prefix, "spelled") == "busy"
        await held.release()
        assert await other.acquire(blocking=False) is True
        assert run_worker("try", real.as_uri(), prefix, "spelled") == "busy"
        await other.release()
    assert run_worker("try", real.as_uri(), prefix, "spelled") == "acquired"


async def test_a_url_with_dot_segments_locks_the_directory_it_names(
    tmp_path: Path, prefix: str
) -> None:
    """tooz refused every lock under 'file:///x/./locks' ("outside of parent directory"),
    and aiotooz took that for an unavailable backend, so blocking=True retried forever."""
    await anyio.Path(tmp_path / "a").mkdir()
    plain = (tmp_path / "locks").as_uri()
    for spelled in (
        tmp_path.as_uri() + "/./locks",
        tmp_path.as_uri() + "/a/../locks",
        tmp_path.as_uri() + "/locks/",
    ):
        async with make_coordinator(spelled, prefix) as coordinator:
            with anyio.fail_after(5):
                async with Lock("dotted", coordinator=coordinator):
                    assert run_worker("try", plain, prefix, "dotted") == "busy"
            assert run_worker("try", plain, prefix, "dotted") == "acquired"
