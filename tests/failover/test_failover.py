"""Mutual exclusion on real three-node clusters under faults (``nox -s failover``).

Three holder processes take turns on one fenced lock while the test kills, pauses or
cuts off the backend's leader (or pauses a holder); the checker then verifies the
history (tests/_checker.py). Holder ``h1`` talks to the leader alone where the client
takes a single endpoint, so that it is the one cut off with it. Lock TTLs are 2 s;
every fault lasts 2.5 TTLs. Measured figures are printed (``FAILOVER {...}``) and
collected by the nox session; docs/failover.md quotes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .._checker import Report
from .._clusters import (
    Cluster,
    ClusterNode,
    EtcdCluster,
    Firewall,
    RedisSentinelCluster,
    ZooKeeperCluster,
)
from ._scenario import Scenario

pytestmark = pytest.mark.failover

TTL = 2
FAULT = 2.5 * TTL
#: How long the holders run before the fault and after the heal.
SETTLE = 2.0


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


def _run(cluster: Cluster, tmp_path: Path, fault: str, inject: Callable[..., object]) -> Report:
    cluster.wait_healthy()
    leader = cluster.leader()
    assert leader is not None
    scenario = Scenario(tmp_path / "history", f"{type(cluster).__name__}: {fault}")
    try:
        scenario.start_holders(_urls(cluster, leader))
        time.sleep(SETTLE)
        scenario.wait_for_section(["h1"])  # the fault hits the holder that uses the leader
        inject(scenario, leader)
        scenario.event("heal")
        cluster.wait_healthy()
        time.sleep(SETTLE)
        report = scenario.finish()
    finally:
        scenario.close()
    fault_at = next(e["t"] for e in report.events if e["event"] == "fault")
    heal_at = next(e["t"] for e in report.events if e["event"] == "heal")
    assert any(s.enter < fault_at for s in report.sections), "no section before the fault"
    assert any(s.enter > heal_at for s in report.sections), "no progress after the heal"
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
    wall = Firewall()

    def partition(scenario: Scenario, leader: ClusterNode) -> None:
        scenario.event("fault", what=f"leader {leader.address} cut off from the other nodes")
        wall.isolate(leader, _peers(cluster, leader))
        try:
            time.sleep(FAULT)
        finally:
            wall.heal()

    try:
        _run(cluster, tmp_path, "leader partitioned", partition)
    finally:
        wall.close()


def test_holder_paused(cluster: Cluster, tmp_path: Path) -> None:
    """A holder stopped mid-section (a GC pause): the classic stale write."""

    def pause(scenario: Scenario, leader: ClusterNode) -> None:
        holder = scenario.wait_for_section(list(scenario.holders))
        scenario.pause_holder(holder)
        scenario.event("fault", what=f"SIGSTOP holder {holder} inside its section")
        try:
            time.sleep(FAULT)
        finally:
            scenario.resume_holder(holder)

    _run(cluster, tmp_path, "holder paused", pause)
