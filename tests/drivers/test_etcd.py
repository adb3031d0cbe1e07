"""etcd: one lease for all of a coordinator's locks, locks taken away from outside, and
several endpoints (``etcd3+http://h1:2379,h2:2379,h3:2379``).

tooz grants a lease per try and cannot tell a lock's owner; aiotooz's coordinator keeps
one lease for every lock it holds, and tells a holder whose key was deleted or whose
lease was revoked.

etcd3gw talks to one member: when it died, the client's lease went with it although the
cluster still had quorum. With several endpoints the client moves to the next member
that answers, and keeps its lease (and every lock on it) alive through that one. The
partition scenarios (a member cut off rather than killed) are in the failover suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

from aiotooz import ConfigurationError, CoordinationSettings, Lock

from ..support.clusters import EtcdCluster
from ..support.helpers import ServerPool, etcd_client, etcd_lock_key, make_coordinator, url_for
from ..support.procs import holding_process, run_worker
from ..support.proxy import DelayProxy
from ..support.servers import free_port

# -- one lease for all locks; a key deleted or a lease revoked from outside ---------------


def test_etcd_tries_waits_and_releases_make_no_lease(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """tooz grants a lease per try, keeps the losers' (30 s each), and leaves a released
    key's lease alive for lock_timeout; aiotooz's coordinator keeps one lease for all."""
    import json
    import urllib.request

    url = url_for("etcd3+http", server_pool, tmp_path)
    endpoint = url.replace("etcd3+http", "http") + "/v3/lease/leases"

    def leases() -> set[str]:
        request = urllib.request.Request(endpoint, data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            return {lease["ID"] for lease in json.load(response).get("leases", [])}

    async def cycle_and_wait_in_vain() -> int:
        async with make_coordinator(url, prefix) as coordinator:
            before = leases()  # the coordinator's own lease included
            for _ in range(30):
                async with Lock("cycled", coordinator=coordinator):
                    pass
            assert await coordinator.get_lock("leases").acquire(blocking=1.0) is False
            # New leases only: plain tooz processes of earlier tests leave leases that
            # expire meanwhile (tests/support/worker.py tooz-hold, waiting).
            return len(leases() - before)

    with holding_process("hold", url, prefix, "leases"):
        assert anyio.run(cycle_and_wait_in_vain) == 0  # 30 cycles, then some 20 tries


def _etcd_revision(client: Any) -> int:
    """The cluster's current revision."""
    result = client.post(client.get_url("/kv/range"), json={"key": "AA==", "count_only": True})
    return int(result["header"]["revision"])


@pytest.mark.parametrize("how", ["key deleted", "lease revoked"])
async def test_etcd_lock_taken_away_from_outside_is_lost(
    server_pool: ServerPool, tmp_path: Path, prefix: str, how: str
) -> None:
    """tooz cannot tell an etcd lock's owner and ignores a dead lease on refresh: a key
    deleted, or its lease revoked, went unnoticed while another process took the lock."""
    url = url_for("etcd3+http", server_pool, tmp_path)
    with etcd_client(url) as client:
        key = etcd_lock_key(prefix, "outside")
        async with make_coordinator(url, prefix, heartbeat=0.2) as coordinator:
            lock = Lock("outside", coordinator=coordinator, cancel_on_loss=False)
            async with lock:
                [(_, meta)] = client.get(key, metadata=True)
                if how == "key deleted":
                    assert client.delete(key)
                else:
                    from etcd3gw.lease import Lease

                    Lease(int(meta["lease"]), client).revoke()
                assert run_worker("try", url, prefix, "outside") == "acquired"
                with anyio.fail_after(5):
                    await lock.wait_lost()
                assert lock.lost
                assert "another owner" in (lock.lost_reason or "")


async def test_etcd_locks_share_one_lease_and_a_revoked_lease_loses_every_one(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """Every lock key of a coordinator is on its one lease (the beat keeps one lease
    alive, whatever is held). Revoked from outside, it takes every key, every holder is
    told, and the next acquire is granted on a new lease."""
    url = url_for("etcd3+http", server_pool, tmp_path) + "?lock_timeout=2"
    with etcd_client(url) as client:
        names = [f"shared-{number}" for number in range(5)]
        async with make_coordinator(url, prefix, heartbeat=0.2) as coordinator:
            locks = [Lock(name, coordinator=coordinator, cancel_on_loss=False) for name in names]
            for lock in locks:
                assert await lock.acquire()
            leases = {
                int(client.get(etcd_lock_key(prefix, name), metadata=True)[0][1]["lease"])
                for name in names
            }
            assert len(leases) == 1
            from etcd3gw.lease import Lease

            [lease] = leases
            assert sorted(Lease(lease, client).keys()) == sorted(
                etcd_lock_key(prefix, name) for name in names
            )
            Lease(lease, client).revoke()
            with anyio.fail_after(5):
                for lock in locks:
                    await lock.wait_lost()
            for lock in locks:
                await lock.release()
            again = Lock(names[0], coordinator=coordinator)
            assert await again.acquire(blocking=5)
            [(_, meta)] = client.get(etcd_lock_key(prefix, names[0]), metadata=True)
            assert int(meta["lease"]) != lease
            await anyio.sleep(1)  # a few beats: the new lease is kept alive
            assert not again.lost
            await again.release()
        assert not client.get(etcd_lock_key(prefix, names[0]))


# -- several endpoints ------------------------------------------------------------------

#: Short leases, so that a lease left to expire would be seen lost within the test: 2 s
#: when the killed member is a follower; 5 s when it is the leader, whose successor is
#: elected after about a second (the election timeout), while no keepalive is answered.
TTL = {"follower": 2, "leader": 5}


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    cluster = EtcdCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _url(addresses: list[str], ttl: int = 2) -> str:
    return f"etcd3+http://{','.join(addresses)}?lock_timeout={ttl}&timeout=1"


# On asyncio only: etcd's client runs in worker threads alike on both event loops, and a
# member's kill takes 4 to 10 s a case.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_killing_the_clients_member_loses_no_lock(
    anyio_backend: str, etcd_cluster: EtcdCluster, prefix: str, role: str
) -> None:
    """The client's first member is killed while it holds locks: it moves to another
    member, its lease stays alive, no lock is lost, and a new acquire is granted."""
    leader = await anyio.to_thread.run_sync(etcd_cluster.leader)
    assert leader is not None
    if role == "leader":
        first = leader
    else:
        first = next(node for node in etcd_cluster.nodes if node is not leader)
    others = [node for node in etcd_cluster.nodes if node is not first]
    ttl = TTL[role]
    url = _url([node.address for node in (first, *others)], ttl)
    async with (
        make_coordinator(url, prefix, heartbeat=0.3) as coordinator,
        make_coordinator(_url([others[0].address], ttl), prefix, heartbeat=0.3) as observer,
    ):
        held = [Lock(f"kept-{number}", coordinator=coordinator) for number in range(20)]
        for lock in held:
            await lock.acquire()
        await anyio.to_thread.run_sync(first.kill)
        await anyio.sleep(2 * ttl)  # past the lease, had nobody kept it alive
        assert not [lock.name for lock in held if lock.lost]
        assert coordinator.statistics().locks_lost == 0
        assert coordinator.statistics().reconnects == 0
        for lock in held:  # still held at etcd: another coordinator is kept out
            assert not await Lock(lock.name, coordinator=observer).acquire(blocking=False)
        async with Lock("after-the-kill", coordinator=coordinator)(blocking=10):
            pass
        for lock in held:
            await lock.release()
        async with Lock(held[0].name, coordinator=observer)(blocking=False):
            pass


async def test_a_dead_first_endpoint_does_not_stop_a_connect(
    etcd_cluster: EtcdCluster, prefix: str
) -> None:
    live = [node.address for node in etcd_cluster.nodes]
    url = _url([f"127.0.0.1:{free_port()}", *live])
    async with make_coordinator(url, prefix, heartbeat=0.3) as coordinator:
        async with Lock("first-dead", coordinator=coordinator, fencing=True) as lock:
            assert lock.fencing_token > 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the client runs in threads on both
@pytest.mark.parametrize("taken_meanwhile", [False, True], ids=["gone", "taken-meanwhile"])
async def test_a_release_applied_by_a_member_that_did_not_answer_is_a_release(
    server_pool: ServerPool, tmp_path: Path, prefix: str, taken_meanwhile: bool
) -> None:
    """The release's delete reaches the first endpoint and is applied, but its answer is
    lost; sent again to the next endpoint it finds the key gone, or already taken by the
    next holder (a waiter woken by that delete). That is our own delete, not a loss: the
    release is clean (it raised LockLost before; with the key taken meanwhile, until the
    failover suite showed it), and the next holder keeps the lock."""
    url = url_for("etcd3+http", server_pool, tmp_path)
    server = urlsplit(url)
    assert server.hostname and server.port
    with DelayProxy(server.hostname, server.port, 0.0) as proxy:
        endpoints = [f"127.0.0.1:{proxy.port}", f"{server.hostname}:{server.port}"]
        # No beat during the test (one would move the client on before the release).
        async with (
            make_coordinator(_url(endpoints, 60), prefix, heartbeat=20) as coordinator,
            make_coordinator(_url([endpoints[1]], 60), prefix) as other,
            anyio.create_task_group() as tg,
        ):
            lock = Lock("answer-lost", coordinator=coordinator)
            await lock.acquire()
            next_holder = Lock("answer-lost", coordinator=other)
            granted, done = anyio.Event(), anyio.Event()

            async def take_next() -> None:
                async with next_holder:
                    granted.set()
                    await done.wait()

            if taken_meanwhile:
                tg.start_soon(take_next)  # woken by the delete, within the withheld answer
                await anyio.sleep(0.5)
            proxy.withhold_answers()
            with anyio.fail_after(10):
                await lock.release()  # raised LockLost: "another owner had it"
            next_granted, next_lost = granted.is_set(), next_holder.lost
            done.set()  # the next holder, if any, releases
            assert not lock.lost and coordinator.statistics().locks_lost == 0
            if taken_meanwhile:
                assert next_granted, "the next holder was not granted before the resend"
                assert not next_lost
                return

            def key_left() -> bool:
                with etcd_client(url) as client:
                    return bool(client.get(etcd_lock_key(prefix, "answer-lost")))

            assert not await anyio.to_thread.run_sync(key_left)
            async with Lock("answer-lost", coordinator=coordinator)(blocking=False):
                pass


@pytest.mark.parametrize("scheme", ["etcd3+http", "etcd3+https"])
@pytest.mark.parametrize(
    ("netloc", "said"),
    [
        ("h1:2379,,h2:2379", "separated by commas"),
        ("h1:2379,", "separated by commas"),
        ("h1:2379,h1:2379", "twice"),
        ("h1:2379,h2:x", "port"),
        ("h1:2379,h2:2379/v3", "has no path"),
    ],
)
def test_a_bad_endpoint_list_is_refused_with_the_reason(
    scheme: str, netloc: str, said: str
) -> None:
    with pytest.raises(ConfigurationError, match="backend_url") as raised:
        CoordinationSettings(backend_url=f"{scheme}://{netloc}")
    assert said in str(raised.value)


def test_several_endpoints_are_a_valid_url() -> None:
    settings = CoordinationSettings(backend_url="etcd3+https://h1:2379,h2:2379,[::1]:2379")
    assert settings.scheme == "etcd3+https"


@pytest.mark.parametrize(("backend", "granted"), [("etcd3+http", False), ("redis", True)])
async def test_a_grant_on_a_stale_shared_lease_is_not_taken(
    server_pool: ServerPool, tmp_path: Path, prefix: str, backend: str, granted: bool
) -> None:
    """An etcd key lives on the coordinator's one lease, which only the beats refresh: a
    key granted when no beat had reached etcd for 1.7 s of a 2 s TTL expires with that
    lease moments later. The holder counted its TTL from the try, and went on beside the
    next holder (20% packet loss in the failover suite). Such a grant must be given
    back; on Redis, where the key gets its own TTL at the grant, it stands.

    The beats that did not reach the backend are simulated by moving the coordinator's
    record of its last refresh back (the lease at etcd is younger, which only makes the
    refusal cautious)."""
    url = url_for(backend, server_pool, tmp_path) + "?lock_timeout=2"
    async with make_coordinator(url, prefix, heartbeat=0.9) as coordinator:
        async with Lock("first", coordinator=coordinator):  # the lease exists at etcd
            pass
        state = coordinator._state
        state.last_refresh = anyio.current_time() - 1.7
        lock = Lock("late", coordinator=coordinator)
        try:
            assert await lock.acquire(blocking=False) is granted
        finally:
            if lock.locked():
                await lock.release()
        assert coordinator.statistics().locks_held == 0
