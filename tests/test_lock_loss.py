"""Lock loss reaches the holder: takeover, stalls, dead or hung servers, stop(), crashes."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
import redis
from structlog.testing import capture_logs

from aiotooz import ConfigurationError, Lock, LockLost, synchronized

from .support.helpers import (
    ServerPool,
    etcd_client,
    etcd_lock_key,
    make_coordinator,
    take_away,
    url_for,
)
from .support.procs import run_worker, worker_process
from .support.proxy import DelayProxy
from .support.servers import PrivateRedis


def _redis_key(prefix: str, name: str) -> bytes:
    """The key tooz's redis driver stores a lock under (default namespace)."""
    return f"_tooz_{prefix}{name}_lock".encode()


async def test_a_taken_over_lock_cancels_the_body(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    body_finished = False
    async with make_coordinator(redis_url, prefix, heartbeat=0.1) as coordinator:
        started = anyio.current_time()
        with pytest.raises(LockLost, match="another owner") as raised:
            async with coordinator.get_lock("taken"):
                # Somebody else's token now sits on our key, as after an expiry + grant.
                client.set(_redis_key(prefix, "taken"), b"someone-else", px=30_000)
                await anyio.sleep(10)
                body_finished = True
        assert anyio.current_time() - started < 5
    assert not body_finished
    assert raised.value.lock_name == "taken"
    # Releasing a lost lock never deletes the new owner's key.
    assert client.get(_redis_key(prefix, "taken")) == b"someone-else"
    client.delete(_redis_key(prefix, "taken"))
    client.close()


async def test_cancel_on_loss_false_lets_the_body_run(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with capture_logs() as logs:
        async with make_coordinator(redis_url, prefix, heartbeat=0.1) as coordinator:
            lock = Lock("watched", coordinator=coordinator, cancel_on_loss=False)
            async with lock:
                assert not lock.lost
                client.delete(_redis_key(prefix, "watched"))
                with anyio.fail_after(5):
                    await lock.wait_lost()
                assert lock.lost and lock.lost_reason
                await anyio.sleep(0.05)  # still running: nothing was cancelled
            assert lock.lost  # remembered after release, until the next acquire
    assert any(entry["event"] == "lock lost" and entry["log_level"] == "warning" for entry in logs)
    client.close()


async def test_synchronized_raises_lock_lost(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    async with make_coordinator(redis_url, prefix, heartbeat=0.1) as coordinator:

        @synchronized("job-{n}", coordinator=coordinator)
        async def job(n: int) -> None:
            client.delete(_redis_key(prefix, f"job-{n}"))
            await anyio.sleep(10)

        with anyio.fail_after(5), pytest.raises(LockLost):
            await job(1)
    client.close()


async def test_a_stalled_event_loop_is_told_by_the_lease_rule(redis_url: str, prefix: str) -> None:
    """A holder whose loop was blocked past 3/4 of the TTL must not carry on writing."""
    async with make_coordinator(f"{redis_url}?lock_timeout=2", prefix, heartbeat=0.2) as coord:
        lock = coord.get_lock("stalled")
        with pytest.raises(LockLost, match="no refresh reached the backend"):
            async with lock:
                time.sleep(1.8)  # noqa: ASYNC251 - blocking the loop is the point
                assert not lock.lost  # reading the property changes nothing
                assert lock.check_lost()  # known at once, before any await
                assert lock.lost
                await anyio.sleep(5)


async def test_wait_lost_returns_on_release_too(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        lock = coordinator.get_lock("plain")
        await lock.acquire()
        async with anyio.create_task_group() as group:
            group.start_soon(lock.wait_lost)
            await anyio.sleep(0.05)
            await lock.release()
        assert not lock.lost


async def test_heartbeat_must_fit_in_the_lock_ttl(redis_url: str, prefix: str) -> None:
    coordinator = make_coordinator(f"{redis_url}?lock_timeout=1", prefix, heartbeat=0.6)
    with pytest.raises(ConfigurationError, match=r"heartbeat .* must be under half the lock TTL"):
        await coordinator.start()
    assert not coordinator.is_started


async def test_a_dead_redis_is_noticed_within_5_s_with_default_settings(
    private_redis: PrivateRedis, prefix: str
) -> None:
    async with make_coordinator(private_redis.url, prefix) as coordinator:
        with pytest.raises(LockLost, match="connection to the backend failed"):
            async with coordinator.get_lock("doomed"):
                private_redis.kill()
                killed = anyio.current_time()
                try:
                    await anyio.sleep(30)
                finally:
                    noticed = anyio.current_time() - killed
        assert noticed < 5.0, noticed
        private_redis.start()
        with anyio.fail_after(30):
            await coordinator.wait_connected()
        async with coordinator.get_lock("after"):
            pass


async def test_a_hung_server_stops_the_holder_before_anyone_else_gets_the_lock(
    redis_url: str, prefix: str
) -> None:
    """The holder reaches Redis through a proxy that then hangs; another process,
    talking to Redis directly, waits for the lock. The holder must hear of the loss
    before the other process is granted the lock (when its TTL runs out at Redis)."""
    parts = urlsplit(redis_url)
    # The holder's margin is the TTL's last quarter (the lease rule): 1.5 s here. With a
    # 3 s TTL, a run beside other work once starved the holder's process past its 0.75 s
    # and it heard of the loss 3 ms after the grant, as any paused holder would.
    with DelayProxy(parts.hostname or "127.0.0.1", parts.port or 6379, 0.0) as proxy:
        holder_url = f"redis://127.0.0.1:{proxy.port}?lock_timeout=6"
        async with make_coordinator(holder_url, prefix, heartbeat=0.5) as coordinator:
            waiter_url = f"{redis_url}?lock_timeout=6"
            with worker_process("grant", waiter_url, prefix, "hung", grace=0) as waiter:
                try:
                    with pytest.raises(LockLost):
                        async with coordinator.get_lock("hung"):
                            waiter.expect("waiting")
                            proxy.freeze()
                            try:
                                await anyio.sleep(30)
                            finally:
                                lost_at = time.time()
                    out = await anyio.to_thread.run_sync(waiter.finish, 30)
                finally:
                    proxy.thaw()
    granted_at = float(out)
    assert lost_at < granted_at, (lost_at, granted_at)


async def test_stop_inside_a_lock_block_of_the_same_task_ends_the_block_with_lock_lost(
    file_url: str, prefix: str
) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        with pytest.raises(LockLost, match="stopped"):
            async with coordinator.get_lock("inside"):
                await coordinator.stop()
                await anyio.sleep(10)  # pragma: no cover - cancelled by the loss
        assert not coordinator.is_started


# -- batched ownership checks: one beat for every lock held -----------------------------


def _take_from_outside(backend: str, url: str, prefix: str, name: str, delete: bool) -> None:
    """Delete a held lock's key, or give it to another owner, as a foreign process could."""
    parts = urlsplit(url)
    if backend == "redis":
        client = redis.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)
        key = _redis_key(prefix, name)
        if delete:
            client.delete(key)
        else:
            client.set(key, b"someone-else", px=30_000)
        client.close()
    elif backend == "memcached":
        from pymemcache.client.base import Client

        memcached = Client((parts.hostname or "127.0.0.1", parts.port or 11211))
        key = f"__TOOZ_LOCK_{prefix}{name}".encode()
        if delete:
            memcached.delete(key)
        else:
            memcached.set(key, b"someone-else", expire=30)
        memcached.close()
    else:
        key = etcd_lock_key(prefix, name)
        with etcd_client(url) as client:
            if delete:
                client.delete(key)
            else:
                client.put(key, "someone-else")  # on no lease: not on ours any more


@pytest.mark.parametrize("backend", ["redis", "memcached", "etcd3+http"])
async def test_a_lock_taken_among_many_is_told_to_its_holder_only(
    server_pool: ServerPool, tmp_path: Path, prefix: str, backend: str
) -> None:
    """The beat refreshes and checks every held lock at once: each lock's answer must
    still be its own (a key deleted, a key given to another owner), the others kept."""
    url = url_for(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix, heartbeat=0.2) as coordinator:
        locks = {
            f"many-{n}": Lock(f"many-{n}", coordinator=coordinator, cancel_on_loss=False)
            for n in range(40)
        }
        for lock in locks.values():
            assert await lock.acquire()
        _take_from_outside(backend, url, prefix, "many-7", delete=True)
        _take_from_outside(backend, url, prefix, "many-23", delete=False)
        with anyio.fail_after(5):
            await locks["many-7"].wait_lost()
            await locks["many-23"].wait_lost()
        await anyio.sleep(1)  # more beats
        assert [name for name, lock in locks.items() if lock.lost] == ["many-7", "many-23"]
        assert coordinator.statistics().locks_lost == 2
        for lock in locks.values():
            await lock.release()
    _take_from_outside(backend, url, prefix, "many-23", delete=True)


# -- a loss found at the release: the lease rule, and the backend's "not ours" -----------


async def test_a_block_that_outlives_its_lease_without_an_await_raises_lock_lost(
    redis_url: str, prefix: str
) -> None:
    """The body blocks the event loop past the lease (another process takes the lock
    meanwhile) and ends without an await: the exit must not pass quietly."""
    url = f"{redis_url}?lock_timeout=1"
    async with make_coordinator(url, prefix, heartbeat=0.2) as coordinator:
        with pytest.raises(LockLost, match="no refresh reached the backend"):
            async with coordinator.get_lock("overrun"):
                time.sleep(1.6)  # noqa: ASYNC251 - blocking the loop is the point
                assert run_worker("try", redis_url, prefix, "overrun") == "acquired"
        # An explicit release tells it too, through `lost`.
        lock = coordinator.get_lock("overrun")
        await lock.acquire()
        time.sleep(1.6)  # noqa: ASYNC251
        await lock.release()
        assert lock.lost
        assert "no refresh reached the backend" in (lock.lost_reason or "")


@pytest.mark.parametrize(
    "backend", ["redis", "memcached", "etcd3+http", "zookeeper", "postgresql", "mysql"]
)
async def test_a_release_answered_not_ours_is_a_loss(
    server_pool: ServerPool, tmp_path: Path, prefix: str, backend: str
) -> None:
    """Taken away from outside before the next beat could tell: the release is the first
    to know. The block raises LockLost; an explicit release leaves `lost` true."""
    url = url_for(backend, server_pool, tmp_path)
    # No beat within the test (the first comes 4 s after the start): the release tells.
    async with make_coordinator(url, prefix, heartbeat=4) as coordinator:
        with pytest.raises(LockLost, match="said at release"):
            async with coordinator.get_lock("block"):
                await anyio.to_thread.run_sync(take_away, backend, url, f"{prefix}block")
        lock = coordinator.get_lock("explicit")
        await lock.acquire()
        await anyio.to_thread.run_sync(take_away, backend, url, f"{prefix}explicit")
        await lock.release()
        assert lock.lost
        assert "said at release" in (lock.lost_reason or "")
        assert coordinator.statistics().locks_lost == 2


async def test_a_loss_that_cut_the_body_short_is_raised_after_a_release_inside(
    redis_url: str, prefix: str
) -> None:
    """A body cancelled by the loss that releases in its ``finally`` must not pass as
    finished: the exit is quiet after a release inside the block, but not then."""
    client = redis.Redis.from_url(redis_url)
    async with make_coordinator(redis_url, prefix, heartbeat=0.1) as coordinator:
        lock = coordinator.get_lock("cut")
        with pytest.raises(LockLost, match="another owner"):
            async with lock:
                try:
                    client.set(_redis_key(prefix, "cut"), b"someone-else", px=30_000)
                    await anyio.sleep(10)
                finally:
                    await lock.release()
    client.close()


async def test_a_grant_too_late_to_use_is_not_handed_out(redis_url: str, prefix: str) -> None:
    """A try that takes more than the lease rule's share of the TTL (a backend slowed
    down) is granted a lock the lease rule already calls lost: the block would be
    cancelled at once, or, with no await, raise LockLost at its exit. It is given back
    and tried again instead."""
    parts = urlsplit(redis_url)
    with DelayProxy(parts.hostname or "127.0.0.1", parts.port or 6379, 0.0) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}?lock_timeout=1"
        async with make_coordinator(url, prefix, heartbeat=0.2) as coordinator:
            lock = coordinator.get_lock("late")
            proxy.set_delay(0.5)  # a round trip takes 1 s: more than 3/4 of the TTL
            assert await lock.acquire(blocking=5) is False
            proxy.set_delay(0.0)
            # Nothing was left held: given back at once, it is free now.
            with anyio.fail_after(10):
                async with lock:
                    pass
            assert not lock.lost
