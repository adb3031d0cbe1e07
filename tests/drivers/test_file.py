"""The file backend: one directory under several spellings, URLs with '.' or '..', a
forked child, fcntl locks shared by the coordinators of one process, and its calls made
inline on the event loop until they are slow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from aiotooz import Coordinator, Lock
from aiotooz import _calls as calls_module
from aiotooz._drivers import Capability

from ..support.helpers import connection_of, make_coordinator
from ..support.procs import holding_process, run_worker


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


# A parent holds a file lock through a coordinator whose event loop runs in a thread,
# forks, and releases the lock once the child says it waits. The child (one thread) tries
# the parent's coordinator (refused), then takes the lock with a coordinator of its own.
FORKED = """\
import os, select, signal, sys
import anyio, anyio.from_thread
from aiotooz import Coordinator, CoordinationSettings, WrongEventLoop

url, prefix, loop = sys.argv[1:4]
settings = CoordinationSettings(backend_url=url)


async def child(parent, ready):
    try:
        with anyio.fail_after(5):
            await parent.get_lock("other").acquire()
    except WrongEventLoop as exc:
        assert "this process was forked from it" in str(exc), exc
    else:
        return "the parent's coordinator was not refused"
    async with Coordinator(prefix=prefix, settings=settings) as fresh:
        lock = fresh.get_lock("forked")
        if await lock.acquire(blocking=False):
            return "the child got the lock while the parent held it"
        os.write(ready, b"waiting")
        if not await lock.acquire(blocking=30):
            return "the child never got the lock the parent released"
        await lock.release()
    return "ok"


parent = Coordinator(prefix=prefix, settings=settings)
with anyio.from_thread.start_blocking_portal(loop) as portal:
    portal.call(parent.start)
    held = parent.get_lock("forked")
    assert portal.call(held.acquire)
    ready_read, ready = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            outcome = anyio.run(child, parent, ready, backend=loop)
        except BaseException as exc:
            outcome = repr(exc)
        print(outcome, flush=True)
        os._exit(0 if outcome == "ok" else 1)
    if not select.select([ready_read], [], [], 60)[0]:
        os.kill(pid, signal.SIGKILL)  # it hangs: leave no orphan behind
        print("the child never said it waits", flush=True)
    portal.call(held.release)
    _, status = os.waitpid(pid, 0)
    portal.call(parent.stop)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_forked_child_starts_afresh(tmp_path: Path, loop: str, prefix: str) -> None:
    """The child inherited the process's file lock objects, which said "held" for the
    parent's lock: its own coordinator never got that lock, even once the parent let go."""
    url = (tmp_path / "locks").as_uri()
    done = subprocess.run(
        [sys.executable, "-c", FORKED, url, prefix, loop],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok", done.stdout + done.stderr


async def test_coordinators_sharing_a_directory_never_free_each_others_locks(
    file_url: str, prefix: str
) -> None:
    """fcntl locks die with any descriptor of the file that the process closes.

    Two coordinators of one process wait while another process holds the lock; one
    wins it, the other gives up and drops its handle. The winner must still hold it.
    """
    outcomes: list[bool] = []
    checked = anyio.Event()
    async with (
        make_coordinator(file_url, prefix) as first,
        make_coordinator(file_url, prefix) as second,
    ):

        async def contend(coordinator: Coordinator) -> None:
            lock = coordinator.get_lock("shared-dir")
            if await lock.acquire(blocking=1.5):
                outcomes.append(True)
                # Held until the other process has looked (not for a fixed time: a
                # worker process can take a second to start on a loaded machine).
                await checked.wait()
                await lock.release()
            else:
                outcomes.append(False)

        async with anyio.create_task_group() as group:
            with holding_process("hold", file_url, prefix, "shared-dir") as holder:
                group.start_soon(contend, first)
                group.start_soon(contend, second)
                await anyio.sleep(0.3)
                holder.end_input()
                await anyio.to_thread.run_sync(holder.wait)
            with anyio.fail_after(30):
                while len(outcomes) < 2:  # the loser gives up 1.5 s after it began
                    await anyio.sleep(0.05)
            assert sorted(outcomes) == [False, True]
            outcome = await anyio.to_thread.run_sync(
                run_worker, "try", file_url, prefix, "shared-dir"
            )
            checked.set()
            assert outcome == "busy"


async def test_a_polled_file_lock_is_fully_released(
    file_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """tooz counts every lost try as a reference; a waiter that polled must not leave the
    lock object believing it is still held (tooz logs "Unreleased lock" when it goes)."""
    import gc

    async with make_coordinator(file_url, prefix) as coordinator:
        lock = coordinator.get_lock("polled")
        with holding_process("hold", file_url, prefix, "polled") as holder:

            async def free_soon() -> None:
                await anyio.sleep(0.3)
                holder.end_input()

            async with anyio.create_task_group() as group:
                group.start_soon(free_soon)
                assert await lock.acquire(blocking=10)
        await lock.release()
        gc.collect()
    assert not [record for record in caplog.records if "Unreleased lock" in record.getMessage()]
    assert run_worker("try", file_url, prefix, "polled") == "acquired"


async def test_file_tries_and_releases_run_inline_until_they_are_slow(
    file_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        connection = connection_of(coordinator)
        assert Capability.LOCAL_CALLS in connection.capabilities
        for _ in range(3):
            async with Lock("inline", coordinator=coordinator):
                pass
        assert connection.threads == 0
        # Calls that are slow on the loop (a network file system, say) go back to threads.
        monkeypatch.setattr(calls_module, "_INLINE_LIMIT", -1.0)
        for _ in range(calls_module._INLINE_STRIKES):
            async with Lock("inline", coordinator=coordinator):
                pass
        async with Lock("inline", coordinator=coordinator):
            pass
        assert connection.threads > 0
