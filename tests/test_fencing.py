"""Fencing tokens: for one name, every grant's token is larger than every earlier one's.

On all eight backends: across processes, coordinators, local hand-offs and restarts of
the backend's server; a stale holder's token is smaller than its successor's.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import aiotooz
from aiotooz import ConfigurationError, Lock, LockNotHeld, synchronized

from .support.helpers import ServerPool, make_coordinator, url_for
from .support.procs import run_worker


async def _tokens(url: str, prefix: str, name: str, times: int) -> list[int]:
    tokens = []
    async with make_coordinator(url, prefix) as coordinator:
        for _ in range(times):
            async with Lock(name, coordinator=coordinator, fencing=True) as lock:
                tokens.append(lock.fencing_token)
    return tokens


async def test_tokens_grow_across_coordinators_and_processes(
    any_backend_url: str, prefix: str
) -> None:
    seen: list[int] = []
    for _ in range(3):
        seen += await _tokens(any_backend_url, prefix, "fenced", 2)
        out = await anyio.to_thread.run_sync(
            run_worker, "fence", any_backend_url, prefix, "fenced", "2"
        )
        seen += [int(line) for line in out.split()]
    assert len(seen) == 12
    assert all(a < b for a, b in itertools.pairwise(seen)), seen


async def test_a_local_hand_off_gets_a_larger_token(any_backend_url: str, prefix: str) -> None:
    """Tasks of one process hand the backend lock on without a round trip for the lock,
    but each grant still gets a new token."""
    tokens: list[int] = []
    async with make_coordinator(any_backend_url, prefix) as coordinator:

        async def worker() -> None:
            for _ in range(3):
                async with Lock("handed", coordinator=coordinator, fencing=True) as lock:
                    tokens.append(lock.fencing_token)
                    await anyio.sleep(0.001)

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(worker)
    assert len(tokens) == 12
    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens


async def test_reading_the_token_needs_a_fenced_held_lock(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        lock = Lock("plain", coordinator=coordinator, fencing=True)
        with pytest.raises(LockNotHeld, match="not held"):
            lock.fencing_token  # noqa: B018
        with pytest.raises(LockNotHeld, match="no fenced lock"):
            aiotooz.fencing_token()
        async with Lock("unfenced", coordinator=coordinator) as unfenced:
            with pytest.raises(ConfigurationError, match="fencing=True"):
                unfenced.fencing_token  # noqa: B018
            with pytest.raises(LockNotHeld):
                aiotooz.fencing_token()
        async with lock:
            assert aiotooz.fencing_token() == lock.fencing_token
            async with Lock("inner", coordinator=coordinator, fencing=True) as inner:
                assert aiotooz.fencing_token() == inner.fencing_token
                assert aiotooz.fencing_token("plain") == lock.fencing_token
                with pytest.raises(LockNotHeld, match="'other'"):
                    aiotooz.fencing_token("other")
            assert aiotooz.fencing_token() == lock.fencing_token
        with pytest.raises(LockNotHeld):
            aiotooz.fencing_token()
        with pytest.raises(LockNotHeld):
            lock.fencing_token  # noqa: B018


async def test_synchronized_functions_read_their_token(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:

        @synchronized("job-{n}", coordinator=coordinator, fencing=True)
        async def job(n: int) -> int:
            return aiotooz.fencing_token()

        first, second = await job(1), await job(1)
        assert first < second


@pytest.mark.parametrize(
    "backend", ["redis", "memcached", "etcd", "zookeeper", "postgresql", "mysql"]
)
async def test_tokens_keep_growing_across_a_server_restart(
    backend: str, private_server: Any, prefix: str
) -> None:
    """Redis (no persistence here) and memcached lose the counter with a restart: the
    clock floor keeps tokens growing; the others keep it."""
    server = private_server(backend)
    url = server.url
    before = await _tokens(url, prefix, "restarted", 2)
    server.restart()
    after = await _tokens(url, prefix, "restarted", 2)
    assert before[-1] < after[0], (before, after)
    assert after[0] < after[1]


@pytest.mark.parametrize(
    ("backend", "options", "stall"),
    [
        ("redis", "lock_timeout=1", 1.3),
        ("memcached", "lock_timeout=2", 2.2),  # items may vanish 1 s early
        ("etcd3+http", "lock_timeout=2", 3.5),  # etcd checks for expired leases every 0.5 s
    ],
)
async def test_a_stale_holder_has_a_smaller_token_than_its_successor(
    backend: str,
    options: str,
    stall: float,
    server_pool: ServerPool,
    tmp_path: Path,
    prefix: str,
) -> None:
    """A holder whose event loop stalls past its TTL loses the lock; the next holder's
    token is larger, so a resource that checks tokens refuses the stale holder."""
    base = url_for(backend, server_pool, tmp_path)
    url = f"{base}?{options}"
    async with make_coordinator(url, prefix, heartbeat=0.2) as stale:
        lock = Lock("stale", coordinator=stale, fencing=True, cancel_on_loss=False)
        async with lock:
            old = lock.fencing_token
            time.sleep(stall)  # noqa: ASYNC251 - the event loop stalls past the TTL
            assert lock.check_lost()  # the lease rule, on the spot: no await since the stall
            with anyio.fail_after(10):
                successor = await _tokens(base, prefix, "stale", 1)
            assert successor[0] > old


async def test_fencing_costs_nothing_without_it(redis_url: str, prefix: str) -> None:
    """Without fencing=True nothing extra is sent: the fence counter is never made."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        async with make_coordinator(redis_url, prefix) as coordinator:
            async with Lock("unfenced", coordinator=coordinator):
                pass
        assert client.exists(f"_tooz_{prefix}unfenced_fence".encode()) == 0
        await _tokens(redis_url, prefix, "fenced", 1)
        assert client.exists(f"_tooz_{prefix}fenced_fence".encode()) == 1
    finally:
        client.delete(f"_tooz_{prefix}fenced_fence".encode())
        client.close()


def _counter_path(coordinator: aiotooz.Coordinator, backend: str, name: str) -> Path:
    """Where the file or ipc backend keeps the fencing counter of lock ``name``."""
    connection = coordinator._lock_table.connection
    assert connection is not None
    tooz_lock: Any = connection.driver.get_lock(coordinator.prefix + name)
    if backend == "file":
        directory, key = os.path.split(tooz_lock.name)
        return Path(directory, "fencing", key)
    from aiotooz._drivers.ipc import _FENCING_DIR

    return Path(_FENCING_DIR, str(tooz_lock.key))


@pytest.mark.parametrize("backend", ["file", "ipc"])
@pytest.mark.parametrize("content", [b"\0\0\0\0", b"garbage", b"1.5", b"-7", b"1_000", b"9" * 5000])
async def test_a_corrupt_counter_is_a_clear_error_and_leaves_nothing_held(
    backend: str, content: bytes, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """A counter that is not a whole number made a fenced acquire of a free lock wait
    forever (the error counted as a backend failure to ride out), and blocking=False
    raised BackendUnavailable for a local file."""
    url = url_for(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix) as coordinator:
        counter = _counter_path(coordinator, backend, "corrupt")
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_bytes(content)
        try:
            for blocking in (True, 2.0, False):
                with anyio.fail_after(10):
                    with pytest.raises(ConfigurationError, match="corrupt") as caught:
                        await Lock("corrupt", coordinator=coordinator, fencing=True).acquire(
                            blocking=blocking
                        )
                assert str(counter) in str(caught.value)
                assert "delete it" in str(caught.value)
                assert coordinator.statistics().locks_held == 0
                # Nothing left held: the lock is free for anyone.
                plain = Lock("corrupt", coordinator=coordinator)
                assert await plain.acquire(blocking=False)
                await plain.release()
            assert counter.read_bytes() == content  # left for the operator to mend
            counter.unlink()  # what the error says to do
            async with Lock("corrupt", coordinator=coordinator, fencing=True) as lock:
                assert lock.fencing_token > 0
        finally:
            counter.unlink(missing_ok=True)


@pytest.mark.parametrize("backend", ["file", "ipc"])
async def test_a_counter_of_many_digits_never_goes_back(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """Only the first 32 bytes were read: after 10**32 came 10**31 + 1."""
    url = url_for(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix) as coordinator:
        counter = _counter_path(coordinator, backend, "huge")
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(10**32 - 1))
        try:
            tokens = []
            for _ in range(3):
                async with Lock("huge", coordinator=coordinator, fencing=True) as lock:
                    tokens.append(lock.fencing_token)
            assert tokens == [10**32, 10**32 + 1, 10**32 + 2]
        finally:
            counter.unlink(missing_ok=True)
