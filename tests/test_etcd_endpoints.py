"""etcd with several endpoints (``etcd3+http://h1:2379,h2:2379,h3:2379``).

etcd3gw talks to one member: when it died, the client's lease went with it although the
cluster still had quorum. With several endpoints the client moves to the next member
that answers, and keeps its lease (and every lock on it) alive through that one. The
partition scenarios (a member cut off rather than killed) are in the failover suite.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from aiotooz import ConfigurationError, CoordinationSettings, Lock

from ._clusters import EtcdCluster
from ._servers import free_port
from .helpers import make_coordinator

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


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_killing_the_clients_member_loses_no_lock(
    etcd_cluster: EtcdCluster, prefix: str, role: str
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
