"""Mutual exclusion on real three-node clusters under faults (``nox -s failover``).

Three holder processes take turns on one fenced lock while the test kills, pauses or
cuts off the backend's leader, cuts a holder off, drops or delays packets, or pauses a
holder; the checker then verifies the history (tests/support/checker.py). Holder ``h1``
talks to the leader alone where the client takes a single endpoint, so that it is the one
cut off with it. Lock TTLs are 2 s; every fault lasts 2 TTLs. Measured figures are printed
(``FAILOVER {...}``) and collected by the nox session; docs/failover.md quotes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from ..support.checker import Report
from ..support.clusters import (
    CLIENT_UID,
    Cluster,
    ClusterNode,
    EtcdCluster,
    Firewall,
    RedisClusterOfSix,
    RedisSentinelCluster,
    ZooKeeperCluster,
)
from ..support.proxy import DelayProxy
from ._scenario import Scenario

pytestmark = pytest.mark.failover

TTL = 2
FAULT = 2 * TTL


def _urls(cluster: Cluster, leader: ClusterNode) -> dict[str, str]:
    """Holder name -> URL. ``h1`` reaches the backend through the leader only."""
    others = [node for node in cluster.nodes if node is not leader]
    if isinstance(cluster, EtcdCluster):  # etcd3gw takes one endpoint
        return {f"h{i}": cluster.url(node, TTL) for i, node in enumerate([leader, *others], 1)}
    if isinstance(cluster, ZooKeeperCluster):
        everyone = cluster.url(cluster.nodes, TTL)
        return {"h1": cluster.url([leader], TTL), "h2": everyone, "h3": everyone}
    assert isinstance(cluster, RedisSentinelCluster)
    return dict.fromkeys(("h1", "h2", "h3"), cluster.url(TTL))


@pytest.fixture(scope="module", params=["etcd", "zookeeper", "redis"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    made: Cluster = {
        "etcd": EtcdCluster,
        "zookeeper": ZooKeeperCluster,
        "redis": RedisSentinelCluster,
    }[request.param]()
    try:
        made.start()
        yield made
    finally:
        made.close()


def _peers(cluster: Cluster, node: ClusterNode) -> list[ClusterNode]:
    return [other for other in cluster.nodes if other is not node]


def _run(
    cluster: Cluster,
    tmp_path: Path,
    fault: str,
    inject: Callable[..., object],
    backend_breaks: bool = False,
    cut_off: str | None = None,
    urls: Callable[[ClusterNode], dict[str, str]] | None = None,
    hits_any_holder: bool = False,
) -> Report:
    """Holders on ``cluster``; ``inject`` the fault; wait for progress; check the history.

    ``cut_off``: the holder that runs as ``CLIENT_UID``; ``backend_breaks``: see
    ``tests.support.checker.check``; ``urls``: the holders' URLs, given the leader (else
    ``_urls``); ``hits_any_holder``: the fault comes as any holder enters its section,
    not only ``h1`` (a fault on every holder's traffic).
    """
    cluster.wait_healthy()
    leader = cluster.leader()
    assert leader is not None
    scenario = Scenario(tmp_path / "history", f"{type(cluster).__name__}: {fault}")
    try:
        scenario.start_holders((urls or partial(_urls, cluster))(leader), cut_off)
        # The fault hits a holder that just entered its section: on etcd and ZooKeeper,
        # the one that talks to the leader alone (all Redis holders ask the Sentinels).
        alone = not isinstance(cluster, RedisSentinelCluster) and not hits_any_holder
        scenario.wait_for_section(["h1"] if alone else list(scenario.holders))
        inject(scenario, leader)
        healed = scenario.event("heal")
        cluster.wait_healthy()
        scenario.wait_for_entry(healed)  # progress after the heal
        report = scenario.finish(backend_breaks)
    finally:
        scenario.close()
    fault_at = next(e["t"] for e in report.events if e["event"] == "fault")
    heal_at = next(e["t"] for e in report.events if e["event"] == "heal")
    assert any(s.enter < fault_at for s in report.sections), "no section before the fault"
    assert any(s.enter > heal_at for s in report.sections)
    return report


def test_leader_killed(cluster: Cluster, tmp_path: Path) -> None:
    def kill(scenario: Scenario, leader: ClusterNode) -> None:
        scenario.event("fault", what=f"SIGKILL leader {leader.address}")
        leader.kill()
        time.sleep(FAULT)
        leader.start()

    _run(cluster, tmp_path, "leader killed", kill)


def test_leader_paused(cluster: Cluster, tmp_path: Path) -> None:
    def pause(scenario: Scenario, leader: ClusterNode) -> None:
        scenario.event("fault", what=f"SIGSTOP leader {leader.address}")
        leader.pause()
        try:
            time.sleep(FAULT)
        finally:
            leader.resume()

    _run(cluster, tmp_path, "leader paused", pause)


def test_leader_partitioned(cluster: Cluster, tmp_path: Path) -> None:
    """The leader is cut off from the other nodes (not from the clients).

    Redis Sentinel promotes the replica while clients still reach the old primary
    through their open connections: two primaries grant the lock at once, and neither
    holder is told (docs/failover.md shows the history). That overlap is the backend's,
    so it is reported rather than failed; the fenced store must still refuse every
    stale write.
    """
    wall = Firewall()

    def partition(scenario: Scenario, leader: ClusterNode) -> None:
        scenario.event("fault", what=f"leader {leader.address} cut off from the other nodes")
        wall.isolate(leader, _peers(cluster, leader))
        try:
            time.sleep(FAULT)
        finally:
            wall.heal()

    try:
        redis = isinstance(cluster, RedisSentinelCluster)
        _run(cluster, tmp_path, "leader partitioned", partition, backend_breaks=redis)
    finally:
        wall.close()


def test_client_partitioned(cluster: Cluster, tmp_path: Path) -> None:
    """A holder cut off from every node for 2 TTLs: it must be told before anyone is granted."""
    wall = Firewall()

    def partition(scenario: Scenario, leader: ClusterNode) -> None:
        if not scenario.in_section("h1"):
            scenario.wait_for_section(["h1"])
        scenario.event("fault", what="holder h1 cut off from every node")
        wall.cut_off(CLIENT_UID)
        try:
            time.sleep(FAULT)
        finally:
            wall.heal()

    try:
        _run(cluster, tmp_path, "client partitioned", partition, cut_off="h1")
    finally:
        wall.close()


def test_lossy_network(cluster: Cluster, tmp_path: Path) -> None:
    """A fifth of all packets lost (clients and nodes alike) for 2 TTLs.

    Loss is injected by nftables; latency (not in nftables, and netem is not in this
    kernel) by proxies, in ``test_latency``.
    """
    wall = Firewall()

    def lose(scenario: Scenario, leader: ClusterNode) -> None:
        scenario.event("fault", what="20% of all packets dropped")
        wall.lose(20)
        try:
            time.sleep(FAULT)
        finally:
            wall.heal()

    try:
        _run(cluster, tmp_path, "20% packet loss", lose)
    finally:
        wall.close()


#: Each chunk of client traffic is held 100 ms plus up to 200 ms (jitter), each way.
LATENCY = (0.1, 0.2)


def test_latency(cluster: Cluster, tmp_path: Path) -> None:
    """Every holder's traffic held 100-300 ms each way, for 2 TTLs.

    netem is not in this kernel, so the holders talk to the nodes through userspace
    TCP proxies (tests/support/proxy.py) that hold each chunk back; a round trip then takes
    0.2-0.6 s, and a heartbeat of several requests longer than the lease rule allows.
    On Redis the holders talk to the primary through a proxy, without Sentinel (whose
    answer names the primary's own address, which would bypass the proxy).
    """
    proxies: dict[str, DelayProxy] = {}

    def via(node: ClusterNode) -> str:
        """The address of a (new or existing) proxy in front of ``node``."""
        proxy = proxies.get(node.address)
        if proxy is None:
            proxy = proxies[node.address] = DelayProxy(node.host, node.port, 0.0)
        return f"127.0.0.1:{proxy.port}"

    def urls(leader: ClusterNode) -> dict[str, str]:
        others = [node for node in cluster.nodes if node is not leader]
        if isinstance(cluster, EtcdCluster):
            nodes = [leader, *others]
            return {f"h{i}": cluster.url_at(via(node), TTL) for i, node in enumerate(nodes, 1)}
        if isinstance(cluster, ZooKeeperCluster):
            everyone = cluster.url_at([via(node) for node in cluster.nodes], TTL)
            return {"h1": cluster.url_at([via(leader)], TTL), "h2": everyone, "h3": everyone}
        return dict.fromkeys(("h1", "h2", "h3"), f"redis://{via(leader)}?lock_timeout={TTL}")

    def slow(scenario: Scenario, leader: ClusterNode) -> None:
        scenario.event("fault", what="client traffic held 100-300 ms each way")
        for proxy in proxies.values():
            proxy.set_delay(*LATENCY)
        try:
            time.sleep(FAULT)
        finally:
            for proxy in proxies.values():
                proxy.set_delay(0.0)

    try:
        # Any holder: on ZooKeeper, h1 (behind the leader's proxy alone) can lose every
        # race for the lock to the others for longer than the scenario waits.
        _run(cluster, tmp_path, "latency", slow, urls=urls, hits_any_holder=True)
    finally:
        for proxy in proxies.values():
            proxy.close()


def test_holder_paused(cluster: Cluster, tmp_path: Path) -> None:
    """A holder stopped mid-section (a GC pause): the classic stale write."""

    def pause(scenario: Scenario, leader: ClusterNode) -> None:
        holder = next(h for h in scenario.holders if scenario.in_section(h))
        scenario.pause_holder(holder)
        scenario.event("fault", what=f"SIGSTOP holder {holder} inside its section")
        try:
            time.sleep(FAULT)
        finally:
            scenario.resume_holder(holder)

    _run(cluster, tmp_path, "holder paused", pause)


@pytest.fixture
def sentinel_cluster() -> Iterator[RedisSentinelCluster]:
    made = RedisSentinelCluster()
    try:
        made.start()
        yield made
    finally:
        made.close()


def test_redis_promotes_a_replica_without_the_lock(
    sentinel_cluster: RedisSentinelCluster, tmp_path: Path
) -> None:
    """Replication is cut, a holder is granted on the primary alone, the primary dies.

    Redis replicates asynchronously: the replica that Sentinel promotes never saw the
    grant, so the lock is free on the new primary while its holder is inside its
    section. The holder's connection to the dead primary fails, so it is told; the
    new primary's grant carries a larger token (Redis fencing tokens are floored at the
    server's clock in microseconds), so a late write of the old holder is refused.
    """
    cluster = sentinel_cluster
    primary, replica = cluster.redis_nodes
    wall = Firewall()
    scenario = Scenario(
        tmp_path / "history", "RedisSentinelCluster: replica promoted without the lock"
    )
    try:
        scenario.start_holders(dict.fromkeys(("h1", "h2", "h3"), cluster.url(TTL)))
        scenario.wait_for_section(list(scenario.holders))
        wall.isolate(replica, [primary])  # replication stops; Sentinels still see both
        cut = scenario.event("replication-cut")
        holder = scenario.wait_for_entry(cut)
        scenario.event("fault", what=f"SIGKILL primary {primary.address}; {holder} holds")
        primary.kill()
        time.sleep(FAULT)
        wall.heal()
        primary.start()
        healed = scenario.event("heal")
        cluster.wait_healthy()
        scenario.wait_for_entry(healed)
        report = scenario.finish()
    finally:
        scenario.close()
        wall.close()
    assert cluster.leader() is replica, "Sentinel did not promote the replica"
    heal_at = next(e["t"] for e in report.events if e["event"] == "heal")
    assert any(s.enter > heal_at for s in report.sections), "no progress after the heal"


# -- etcd with several endpoints: the client's own member fails --------------------------

#: The lease of the multi-endpoint scenarios, and the client's wait for one member: a
#: member that stops answering is left after 1 s, and the lease rule (3/4 of the TTL)
#: must outlast that and the beat it delayed.
MULTI_TTL = 4


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    made = EtcdCluster()
    try:
        made.start()
        yield made
    finally:
        made.close()


def _run_on_the_clients_member(
    cluster: EtcdCluster, tmp_path: Path, fault: str, inject: Callable[[ClusterNode], object]
) -> None:
    """Every holder lists every member, a follower first; ``inject`` the fault on it.

    The holder inside its section must neither lose its lock (its lease is kept alive
    through another member) nor stall the others: a new grant comes during the fault.
    """
    cluster.wait_healthy()
    leader = cluster.leader()
    first = next(node for node in cluster.nodes if node is not leader)
    addresses = ",".join(node.address for node in [first, *_peers(cluster, first)])
    url = f"etcd3+http://{addresses}?lock_timeout={MULTI_TTL}&timeout=1"
    scenario = Scenario(tmp_path / "history", f"EtcdCluster, several endpoints: {fault}")
    try:
        scenario.start_holders(dict.fromkeys(("h1", "h2", "h3"), url))
        holder = scenario.wait_for_section(list(scenario.holders))
        faulted = scenario.event("fault", what=f"{fault} ({first.address}); {holder} holds")
        inject(first)
        scenario.wait_for_entry(faulted, timeout=FAULT * 3)  # a grant during the fault
        healed = scenario.event("heal")
        if not first.running:
            first.start()
        cluster.wait_healthy()
        scenario.wait_for_entry(healed)
        report = scenario.finish()
    finally:
        scenario.close()
    assert not report.lost(), f"locks lost: {report.lost()}"
    # A holder that waited its 5 s in the queue records it and waits again: not a fault.
    # (Each error is shown with its holder and its time from the fault, and the history
    # with it: what a failure needs to be understood.)
    errors = [
        (e["holder"], round(e["t"] - faulted, 3), e["error"])
        for e in report.events
        if e["event"] == "error"
    ]
    history = [
        (e["holder"], round(e["t"] - faulted, 3), e["event"], e.get("how"))
        for e in report.events
        if e["event"] in ("enter", "exit", "error")
    ]
    assert not [error for error in errors if "LockAcquireFailed" not in error[2]], (
        errors,
        history,
    )


def test_etcd_clients_member_killed(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    def kill(member: ClusterNode) -> None:
        member.kill()

    _run_on_the_clients_member(etcd_cluster, tmp_path, "the clients' member killed", kill)


def test_etcd_clients_member_partitioned(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """The member is cut off from the others (not from the clients): it answers nothing
    that needs the cluster, until the client leaves it for one that does."""
    wall = Firewall()
    try:

        def partition(member: ClusterNode) -> None:
            wall.isolate(member, _peers(etcd_cluster, member))
            time.sleep(FAULT)
            wall.heal()

        _run_on_the_clients_member(
            etcd_cluster, tmp_path, "the clients' member partitioned", partition
        )
    finally:
        wall.close()


# -- Redis Cluster: a primary killed, its replica promoted --------------------------------


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterOfSix]:
    made = RedisClusterOfSix()
    try:
        made.start()
        yield made
    finally:
        made.close()


def test_redis_cluster_primary_killed(redis_cluster: RedisClusterOfSix, tmp_path: Path) -> None:
    """The primary serving the lock's slot is SIGKILLed; its replica takes over.

    Every slot is refused while the slot range has no primary (about the node timeout,
    1 s, and an election), longer than the beat's retries within a 2 s TTL: the holder
    inside its section is told, and the next grant comes from the promoted replica.
    Replication is asynchronous, as under Sentinel: a grant that had not reached the
    replica would be lost with the primary (the fenced store refuses a stale write).
    """
    import redis.cluster

    from aiotooz._names import backend_key

    cluster = redis_cluster
    scenario = Scenario(tmp_path / "history", "RedisClusterOfSix: primary of the lock killed")
    try:
        scenario.start_holders(dict.fromkeys(("h1", "h2", "h3"), cluster.url(TTL)))
        key = f"aiotooz:{{{backend_key(scenario.prefix, 'lock')}}}:lock"
        first = cluster.nodes[0]
        client = redis.cluster.RedisCluster(host=first.host, port=first.port)
        try:
            served = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
        finally:
            client.close()
        primary = next(node for node in cluster.nodes if node.port == served.port)
        holder = scenario.wait_for_section(list(scenario.holders))
        scenario.event("fault", what=f"SIGKILL primary {primary.address}; {holder} holds")
        primary.kill()
        time.sleep(FAULT)
        primary.start()  # it comes back as a replica of its successor
        healed = scenario.event("heal")
        cluster.wait_healthy()
        scenario.wait_for_entry(healed)
        report = scenario.finish()
    finally:
        scenario.close()
    heal_at = next(e["t"] for e in report.events if e["event"] == "heal")
    assert any(s.enter > heal_at for s in report.sections), "no progress after the heal"
