"""Redis and Redis Cluster: what holds beyond the conformance suite.

Redis: its calls never run inline, run on the event loop through the asyncio client on
asyncio only, a grant that reaches the server after its taker left is released, and the
asyncio client's pub/sub wakes a waiter (on trio, the control, waiters poll).

Redis Cluster (``redis+cluster://``): the conformance, fencing, semaphore, leadership and
wake-up suites run on a private cluster of three primaries too (``redis+cluster`` in
``ALL_BACKENDS``). Here: exclusion for names whose keys fall on every node, a lock's keys
in one slot whatever its name, the heartbeat batched per node (not per lock) and still
catching a key taken away, and URLs refused with a reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

from aiotooz import ConfigurationError, CoordinationSettings, Lock
from aiotooz import _tries as tries
from aiotooz._drivers import Capability
from aiotooz._names import backend_key

from ..support.helpers import (
    WOKEN_WITHIN,
    connection_of,
    handoffs,
    make_coordinator,
    missing_backend,
)
from ..support.proxy import DelayProxy
from ..support.servers import PrivateRedisCluster

pytestmark = pytest.mark.redis

# -- Redis: calls on the event loop (asyncio), wake-ups -----------------------------------


async def test_redis_calls_never_run_inline(redis_url: str, prefix: str) -> None:
    async with make_coordinator(redis_url, prefix) as coordinator:
        assert Capability.LOCAL_CALLS not in connection_of(coordinator).capabilities


@pytest.mark.parametrize("overtaken", [False, True], ids=["in-order", "overtaken"])
async def test_a_grant_that_reaches_redis_after_its_taker_left_is_released(
    redis_url: str, prefix: str, overtaken: bool
) -> None:
    """Through a proxy that holds every chunk 0.5 s, the taker gives up (cancelled)
    while its SET is on the wire: the lock the server grants must be released, on the
    event loop's asyncio client (asyncio) as through the worker threads (trio).

    ``overtaken``: what is sent after the SET overtakes it (the proxy's delay drops to
    nothing). A release sent at once, on another connection, found no key, and the SET,
    arriving later, held it for its TTL (30 s) with nobody to release it (a clean-clone
    run's cancellation storm). The try runs on to its answer instead, released then."""
    parts = urlsplit(redis_url)
    with DelayProxy(parts.hostname or "127.0.0.1", parts.port or 6379, 0.0) as proxy:
        slow_url = f"redis://127.0.0.1:{proxy.port}"
        async with (
            make_coordinator(slow_url, prefix) as slow,
            make_coordinator(redis_url, prefix) as direct,
        ):
            lock = Lock("late-grant", coordinator=slow)
            async with lock:  # the clients' connections are open: the SET goes at once
                pass

            async def overtake() -> None:
                await anyio.sleep(0.1)  # the SET is on the wire
                proxy.set_delay(0.0)

            proxy.set_delay(0.5)
            async with anyio.create_task_group() as group:
                if overtaken:
                    group.start_soon(overtake)
                with anyio.move_on_after(0.2) as scope:
                    await lock.acquire()
            assert scope.cancelled_caught
            assert not lock.locked()
            await anyio.sleep(1.0)  # the SET has reached Redis (0.5 s after it was sent)
            # Granted at the server after the taker left, then released for it.
            other = Lock("late-grant", coordinator=direct)
            assert await other.acquire(blocking=10)  # well within the key's TTL of 30 s
            await other.release()


async def test_redis_runs_on_the_event_loop_on_asyncio_only(
    redis_url: str, prefix: str, anyio_backend: str
) -> None:
    async with make_coordinator(redis_url, prefix) as coordinator:
        assert connection_of(coordinator)._calls.native is (anyio_backend == "asyncio")
        for _ in range(3):
            async with Lock("native", coordinator=coordinator):
                pass
        # No worker thread was needed for the tries and releases on asyncio.
        if anyio_backend == "asyncio":
            assert connection_of(coordinator)._calls.acquire_lane.threads == frozenset()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_wakes_a_waiter_on_release(
    redis_url: str, prefix: str, slow_polls: None
) -> None:
    latencies = await handoffs(redis_url, prefix, 5)
    assert 0 < min(latencies) and max(latencies) < WOKEN_WITHIN, latencies


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_cluster_wakes_a_waiter_on_release(
    private_server: Any, prefix: str, slow_polls: None
) -> None:
    """The waiter subscribes on the node of the lock's slot, where its release publishes."""
    server = private_server("redis-cluster")
    latencies = await handoffs(server.url, prefix, 5)
    assert 0 < min(latencies) and max(latencies) < WOKEN_WITHIN, latencies


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_without_a_wake_up_a_waiter_polls(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: on trio, Redis waiters poll (the asyncio client is asyncio's)."""
    monkeypatch.setattr(tries, "_POLL_FIRST", 1.0)
    monkeypatch.setattr(tries, "_POLL_CAP", 1.0)
    latencies = await handoffs(redis_url, prefix, 2)
    assert min(latencies) > 0.2, latencies


# -- Redis Cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisCluster]:
    server = PrivateRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    server.start()
    try:
        yield server
    finally:
        server.close()


def _client(cluster: PrivateRedisCluster) -> Any:
    """A plain redis-py cluster client, to look at (or tamper with) keys from outside."""
    try:
        import redis.cluster
    except ImportError:
        missing_backend("redis-py is not installed (pip install 'aiotooz[redis]')")
    nodes = [
        redis.cluster.ClusterNode("127.0.0.1", node.port)  # type: ignore[no-untyped-call]
        for node in cluster.nodes
    ]
    return redis.cluster.RedisCluster(startup_nodes=nodes)


def _lock_key(prefix: str, name: str) -> bytes:
    """The key the driver locks for ``name`` (names without braces: the key is its tag)."""
    return f"aiotooz:{{{backend_key(prefix, name)}}}:lock".encode()


def _spread(prefix: str, client: Any, per_node: int) -> list[str]:
    """Names whose keys fall ``per_node`` on each node, from every quarter of the slots."""
    picked: dict[tuple[str, int], list[str]] = {}
    for number in itertools.count():
        name = f"job-{number}"
        key = _lock_key(prefix, name)
        where = (client.get_node_from_key(key).name, client.keyslot(key) * 4 // 16384)
        names = picked.setdefault(where, [])
        if len(names) < per_node:
            names.append(name)
        full = [len(names) >= per_node for names in picked.values()]
        if (len(picked) >= 6 and all(full)) or number > 5000:
            break
    return [name for names in picked.values() for name in names]


async def test_a_held_lock_excludes_another_coordinator_on_every_node(
    cluster: PrivateRedisCluster, prefix: str
) -> None:
    client = await anyio.to_thread.run_sync(_client, cluster)
    try:
        names = await anyio.to_thread.run_sync(_spread, prefix, client, 3)
        nodes = {client.get_node_from_key(_lock_key(prefix, name)).name for name in names}
        quarters = {client.keyslot(_lock_key(prefix, name)) * 4 // 16384 for name in names}
    finally:
        client.close()
    assert len(nodes) == 3 and quarters == {0, 1, 2, 3}
    async with (
        make_coordinator(cluster.url, prefix) as first,
        make_coordinator(cluster.url, prefix) as second,
    ):
        held = [Lock(name, coordinator=first, fencing=True) for name in names]
        for lock in held:
            assert await lock.acquire(blocking=False)
        for name in names:
            assert not await Lock(name, coordinator=second).acquire(blocking=False), name
        tokens = {lock.name: lock.fencing_token for lock in held}
        for lock in held:
            await lock.release()
        for name in names:
            async with Lock(name, coordinator=second, fencing=True) as lock:
                assert lock.fencing_token > tokens[name]


#: Names whose keys cannot be their own hash tag (braces), or are nearly empty tags.
BRACED = ["{}", "}{", "{a}", "a{b}c", "}", "{", "{{}}"]


async def test_every_name_keeps_its_keys_in_one_slot(
    cluster: PrivateRedisCluster, prefix: str
) -> None:
    """Fencing, leader and window records run scripts over two keys of one lock: a key
    layout that split them over slots would fail them (CROSSSLOT)."""
    async with make_coordinator(cluster.url, prefix) as coordinator:
        for name in BRACED:
            async with Lock(name, coordinator=coordinator, fencing=True) as first:
                token = first.fencing_token
            async with Lock(name, coordinator=coordinator, fencing=True) as second:
                assert second.fencing_token > token
        async with coordinator.leadership("braced{x}") as term:
            assert await coordinator.leader("braced{x}") == term.member_id


def _eval_calls(cluster: PrivateRedisCluster) -> dict[int, int]:
    """Scripts run so far, per node (its command statistics)."""
    import redis

    counts = {}
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as plain:
            stats = plain.info("commandstats")
        counts[node.port] = int(stats.get("cmdstat_eval", {}).get("calls", 0))
    return counts


async def test_a_beat_runs_one_script_per_node_and_still_finds_a_taken_lock(
    cluster: PrivateRedisCluster, prefix: str
) -> None:
    """200 held locks over three nodes: a beat costs each node one refresh script, not
    one per lock, and a key overwritten from outside is still told to its holder."""
    async with make_coordinator(cluster.url, prefix, heartbeat=0.3) as coordinator:
        locks = [Lock(f"beat-{number}", coordinator=coordinator) for number in range(200)]
        for lock in locks:
            await lock.acquire()
        before = await anyio.to_thread.run_sync(_eval_calls, cluster)
        await anyio.sleep(1.5)
        after = await anyio.to_thread.run_sync(_eval_calls, cluster)
        runs = [after[port] - before[port] for port in before]
        # About five beats in 1.5 s: one script per node each (a loaded machine may
        # delay some), against 200 / 3 per node and beat if each lock cost one.
        assert all(1 <= count <= 12 for count in runs), runs

        taken = locks[17]
        client = await anyio.to_thread.run_sync(_client, cluster)
        try:
            key = _lock_key(prefix, taken.name)
            await anyio.to_thread.run_sync(lambda: client.set(key, b"someone else", px=60_000))
            with anyio.fail_after(10):
                while not taken.lost:
                    await anyio.sleep(0.05)
            assert [lock.name for lock in locks if lock.lost] == [taken.name]
        finally:
            await anyio.to_thread.run_sync(lambda: client.delete(key))
            client.close()
        for lock in locks:
            if not lock.lost:
                await lock.release()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the asyncio client: asyncio only
async def test_a_first_try_cut_short_leaves_no_connection_at_stop(
    anyio_backend: str, cluster: PrivateRedisCluster, prefix: str
) -> None:
    """A try given up on while the asyncio client makes its first connection: redis-py's
    cleanup of that first connect is cancelled with it, and its own aclose() then skips
    the nodes (no topology). stop() closes them all the same (33 of 60 such stops left
    connected nodes for the garbage collector before)."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for attempt in range(20):
            async with make_coordinator(cluster.url, prefix) as coordinator:
                # 0 to 9.5 ms: most of these land in the first connect.
                with anyio.move_on_after(0.0005 * attempt):
                    async with Lock(f"cut-short-{attempt}", coordinator=coordinator):
                        pass
        gc.collect()
    left = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not left, left[:3]


async def test_a_dead_first_node_does_not_stop_a_connect(tmp_path: Path, prefix: str) -> None:
    """The URL lists a node that is not there first; the next one answers."""
    cluster = PrivateRedisCluster(tmp_path / "cluster")
    cluster.start()
    try:
        from ..support.servers import free_port

        url = cluster.url.replace("redis+cluster://", f"redis+cluster://127.0.0.1:{free_port()},")
        async with make_coordinator(url, prefix) as coordinator:
            async with Lock("first-dead", coordinator=coordinator):
                pass
    finally:
        cluster.close()


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis+cluster://h1:7000,,h2:7001", "separated by commas"),
        ("redis+cluster://", "host:port"),
        ("redis+cluster://h1:7000,h2:x", "port"),
        ("redis+cluster://h1:7000/2", "database 0 only"),
        ("redis+cluster://h1:7000?db=2", "takes no option 'db'"),
        ("redis+cluster://h1:7000?sentinel=mymaster", "takes no option 'sentinel'"),
        ("redis+cluster://h1:7000?namespace=a{b}", "may not hold { or }"),
        ("redis+cluster://h1:7000?lock_timeout=0", "lock_timeout"),
    ],
)
def test_a_bad_cluster_url_is_refused_with_the_reason(url: str, said: str) -> None:
    with pytest.raises(ConfigurationError, match="backend_url") as raised:
        CoordinationSettings(backend_url=url)
    assert said in str(raised.value)


async def test_a_primary_killed_costs_no_lock_elsewhere_and_its_replica_takes_over(
    tmp_path: Path, prefix: str
) -> None:
    """Three primaries with a replica each; the primary of some held locks is killed.

    Its locks are kept if their keys reached the replica before it took over, or their
    holders are told (replication is asynchronous); the locks on the other primaries
    are kept (the beat tries again while the cluster is down), nothing reconnects, and
    once the replica is promoted a name in the dead primary's slots is granted.
    """
    cluster = PrivateRedisCluster(tmp_path / "cluster", replicas=1)
    await anyio.to_thread.run_sync(cluster.start)
    try:
        client = await anyio.to_thread.run_sync(_client, cluster)
        try:
            names = await anyio.to_thread.run_sync(_spread, prefix, client, 2)
            port_of = {
                name: client.get_node_from_key(_lock_key(prefix, name)).port for name in names
            }
        finally:
            client.close()
        victim_port = port_of[names[0]]
        victim = next(node for node in cluster.nodes if node.port == victim_port)
        on_victim = [name for name in names if port_of[name] == victim_port]
        fresh = on_victim.pop()  # never held: taken after the failover
        url = f"{cluster.url}?lock_timeout=10"
        async with make_coordinator(url, prefix, heartbeat=0.5) as coordinator:
            held = [Lock(name, coordinator=coordinator) for name in names if name != fresh]
            for lock in held:
                await lock.acquire()
            await anyio.to_thread.run_sync(victim.kill)
            await anyio.sleep(1.0)
            await anyio.to_thread.run_sync(cluster.wait_until_ok)  # the replica promoted
            await anyio.sleep(2.0)  # a few beats more
            assert {lock.name for lock in held if lock.lost} <= set(on_victim)
            assert coordinator.statistics().reconnects == 0
            async with make_coordinator(url, prefix, heartbeat=0.5) as other:
                async with Lock(fresh, coordinator=other)(blocking=20):
                    pass
                for lock in held:  # still held at the cluster: kept out
                    if not lock.lost:
                        assert not await Lock(lock.name, coordinator=other).acquire(False)
            for lock in held:
                if not lock.lost:
                    await lock.release()
    finally:
        await anyio.to_thread.run_sync(cluster.close)
