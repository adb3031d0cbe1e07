"""Who holds a lock, and breaking one: ``holder()``, ``holders()`` and ``break_lock()``.

The holders are other processes (tests/support/worker.py), on private servers: the record
the grant writes must be readable from elsewhere, name the right process, never name an
ended hold, and a break must reach the old holder (``LockLost``, reason "broken") and
move the fencing counter past its token.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import anyio
import pytest

from aiotooz import Coordinator, Holder, Lock, LockNameError, UnsupportedOperation

from .support.helpers import ServerPool, make_coordinator, url_for
from .support.procs import holding_process, worker_process

#: The backends that say who holds a lock and list the locks held.
HOLDER_BACKENDS = ["file", "redis", "zookeeper", "etcd3+http", "postgresql", "mysql"]
#: Where the holder record names the holding process (the SQL servers know a session).
KNOWS_PID = {"file", "redis", "zookeeper", "etcd3+http", "mysql"}
#: Where the record is written with each grant: it knows when, and the grant's token.
KNOWS_GRANT = {"file", "redis", "zookeeper", "etcd3+http"}
#: Where another process can break a lock.
BREAKS = ["redis", "zookeeper", "etcd3+http"]
#: Where a break is refused: the lock belongs to the holder's process or session.
REFUSES = ["file", "postgresql", "mysql"]
#: Short TTLs and sessions, so that a lost lock is noticed quickly.
OPTIONS = {"redis": "lock_timeout=3", "etcd3+http": "lock_timeout=3", "zookeeper": "timeout=3"}


def _url(backend: str, pool: ServerPool, tmp_path: Path) -> str:
    url = url_for(backend, pool, tmp_path)
    option = OPTIONS.get(backend)
    return url if option is None else f"{url}{'&' if '?' in url else '?'}{option}"


@pytest.fixture(params=HOLDER_BACKENDS)
def holder_url(request: pytest.FixtureRequest, server_pool: ServerPool, tmp_path: Path) -> str:
    return _url(str(request.param), server_pool, tmp_path)


def _backend(url: str) -> str:
    return url.split(":", 1)[0]


async def _eventually(read: object, within: float = 15.0) -> object:
    """Call ``read`` (an async callable) until it answers something true; its answer."""
    deadline = time.monotonic() + within
    while True:
        answer = await read()  # type: ignore[operator]
        if answer or time.monotonic() > deadline:
            return answer
        await anyio.sleep(0.05)


async def _all(coordinator: Coordinator, prefix: str = "") -> list[Holder]:
    return [holder async for holder in coordinator.holders(prefix)]


async def test_holder_names_a_holder_in_another_process(holder_url: str, prefix: str) -> None:
    backend = _backend(holder_url)
    async with make_coordinator(holder_url, prefix) as observer:
        assert await observer.holder("volume-42") is None
        with holding_process("hold", holder_url, prefix, "volume-42") as worker:
            before = time.time()
            holder = await observer.holder("volume-42")
            assert holder is not None
            assert holder.name == "volume-42"
            assert holder.member_id is not None
            assert holder.member_id.startswith(prefix)
            assert holder.member_id != observer.member_id
            if backend in KNOWS_PID:
                assert holder.pid == worker.pid
                assert holder.host == socket.gethostname()
            if backend in KNOWS_GRANT:
                assert holder.since is not None
                assert before - 60 < holder.since <= time.time()
            assert holder.fencing_token is None  # the worker did not fence
            assert await observer.holder("volume-43") is None
        # The hold ended (the worker released and exited): nobody is named.
        assert await observer.holder("volume-42") is None


async def test_holders_lists_the_names_held_under_a_prefix(holder_url: str, prefix: str) -> None:
    async with make_coordinator(holder_url, prefix) as observer:
        assert await _all(observer) == []
        with (
            holding_process("hold-many", holder_url, prefix, "vol", "2"),
            holding_process("hold", holder_url, prefix, "other"),
        ):
            async with observer.get_lock("mine"):
                names = [holder.name for holder in await _all(observer)]
                assert sorted(names) == ["mine", "other", "vol-0", "vol-1"]
                held = await _all(observer, "vol-")
                assert [holder.name for holder in held] == ["vol-0", "vol-1"]
                assert all(h.member_id and h.member_id.startswith(prefix) for h in held)
                assert held[0].member_id == held[1].member_id != observer.member_id
                assert await _all(observer, "nothing-") == []
        # Another prefix's locks are not this coordinator's to list.
        async with make_coordinator(holder_url, prefix + "x") as elsewhere:
            with holding_process("hold", holder_url, prefix, "xvol"):
                assert [holder.name for holder in await _all(elsewhere)] == ["vol"]
        assert await _all(observer) == []


async def test_a_holder_in_this_process_is_named_with_its_token(
    holder_url: str, prefix: str
) -> None:
    backend = _backend(holder_url)
    async with make_coordinator(holder_url, prefix) as coordinator:
        async with Lock("fenced", coordinator=coordinator, fencing=True) as lock:
            holder = await coordinator.holder("fenced")
            assert holder is not None
            assert holder.member_id == coordinator.member_id
            if backend in KNOWS_PID:
                assert holder.pid == os.getpid()
            if backend in KNOWS_GRANT:
                assert holder.fencing_token == lock.fencing_token
        assert await coordinator.holder("fenced") is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("backend", BREAKS)
async def test_break_lock_tells_the_holder_and_moves_the_fencing_counter(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    url = _url(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix) as operator:
        with worker_process("hold-fenced", url, prefix, "stuck") as worker:
            held = await anyio.to_thread.run_sync(worker.readline)
            assert held.startswith("held "), held
            _, member, token = held.split()
            holder = await operator.holder("stuck")
            assert holder is not None
            assert (holder.member_id, holder.pid) == (member, worker.pid)
            assert holder.fencing_token == int(token)
            broken_at = time.monotonic()
            assert await operator.break_lock("stuck") is True
            # The old holder is told within its heartbeat (0.3 s; generous here).
            with anyio.fail_after(15):
                told = await anyio.to_thread.run_sync(worker.readline, abandon_on_cancel=True)
            assert told.startswith("lost "), told
            assert "broken" in told
            assert time.monotonic() - broken_at < 15
            with anyio.fail_after(15):
                async with Lock("stuck", coordinator=operator, fencing=True) as lock:
                    assert lock.fencing_token > int(token)
            assert await operator.break_lock("stuck") is False  # nobody holds it


@pytest.mark.parametrize("backend", REFUSES)
async def test_break_lock_is_refused_with_the_holder_and_what_to_do(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    url = _url(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix) as operator:
        with holding_process("hold", url, prefix, "stuck") as worker:
            with pytest.raises(UnsupportedOperation) as refused:
                await operator.break_lock("stuck")
            message = str(refused.value)
            assert "cannot break 'stuck'" in message
            assert "redis" in message  # where it can be done
            if backend == "file":
                assert f"pid {worker.pid}" in message
                assert socket.gethostname() in message
            else:
                assert "session" in message
            holder = await operator.holder("stuck")
            assert holder is not None  # still held: nothing was done
            assert holder.member_id is not None
            assert holder.member_id.startswith(prefix)


async def test_memcached_names_the_member_but_lists_no_holders(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    url = url_for("memcached", server_pool, tmp_path)
    async with make_coordinator(url, prefix) as coordinator:
        with pytest.raises(UnsupportedOperation, match=r"list the locks held.*redis"):
            await _all(coordinator)
        assert await coordinator.holder("job") is None
        with holding_process("hold", url, prefix, "job"):
            holder = await coordinator.holder("job")
            assert holder is not None
            assert holder.member_id is not None
            assert holder.member_id.startswith(prefix)
            assert holder.member_id != coordinator.member_id
            with pytest.raises(UnsupportedOperation, match=r"cannot break 'job'.*fencing"):
                await coordinator.break_lock("job")


async def test_ipc_names_the_holding_process_and_refuses_to_break(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    url = url_for("ipc", server_pool, tmp_path)
    async with make_coordinator(url, prefix) as coordinator:
        with holding_process("hold", url, prefix, "job") as worker:
            holder = await coordinator.holder("job")
            assert holder is not None
            assert (holder.pid, holder.host) == (worker.pid, socket.gethostname())
            with pytest.raises(UnsupportedOperation, match=f"kill {worker.pid}"):
                await coordinator.break_lock("job")
            with pytest.raises(UnsupportedOperation, match="list the locks held"):
                await _all(coordinator)
        assert await coordinator.holder("job") is None


async def test_plain_tooz_holders_are_held_but_unnamed(redis_url: str, prefix: str) -> None:
    async with make_coordinator(redis_url, prefix) as observer:
        with holding_process("tooz-hold", redis_url, prefix, "plain"):
            holder = await observer.holder("plain")
            assert holder is not None
            assert (holder.member_id, holder.pid, holder.since) == (None, None, None)


async def test_bad_arguments_get_clear_errors(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        with pytest.raises(LockNameError):
            await coordinator.holder("")
        with pytest.raises(LockNameError):
            await coordinator.break_lock(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="prefix must be a str"):
            await _all(coordinator, 42)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="not started"):
        await coordinator.holder("x")


def test_holder_is_a_frozen_record() -> None:
    holder = Holder("n", "m", 1, "h", 2.0, 3, None)
    with pytest.raises(AttributeError):
        holder.name = "other"  # type: ignore[misc]
    assert Holder.__module__ == "aiotooz"
