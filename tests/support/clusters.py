"""Private three-node clusters for the failover scenarios, and the network faults on them.

Each node listens on a loopback address of its own (127.<w>.<c>.11, .12, .13 ...), so one
can be found, killed, paused or cut off without the others; each runs as a user id of
its own, so a firewall rule can match every packet it sends (``meta skuid``). Nodes
have the interface of tests/support/servers.py (``start/stop/kill/pause/resume/restart``).

:class:`Firewall` cuts nodes off with nftables rules in a table of its own. It refuses
to run in the machine's own network namespace: the failover session runs pytest in a
private one (``unshare --net``, see noxfile.py), whose loopback carries only the
test's own traffic and which disappears, rules and all, when the session ends.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .helpers import missing_backend
from .servers import PrivateServer, _binary, free_port

__all__ = [
    "CLIENT_UID",
    "Cluster",
    "EtcdCluster",
    "Firewall",
    "RedisClusterOfSix",
    "RedisSentinelCluster",
    "ZooKeeperCluster",
    "as_client_user",
    "in_private_netns",
]

#: Node user ids (no account needed: setpriv sets the ids directly).
_UIDS = itertools.count(61011)
#: The user id a client that a test cuts off runs as (see ``as_client_user``).
CLIENT_UID = 61500


def _blocks() -> Iterator[str]:
    """Each cluster's own /24 of loopback addresses, ``127.<w>.<n>``: ``w`` is this test
    process's own (pytest-xdist's worker number; 0 alone), so clusters of processes
    running at once never share an address (they did, each counting from the same
    start: a port free on 127.0.0.1 was taken on the other's address, and a node failed
    to bind). ``n`` runs over 201-254 and wraps (clusters before are closed by then)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw-1").removeprefix("gw")
    second = int(worker) + 1 if worker.lstrip("-").isdigit() else 0
    for third in itertools.cycle(range(201, 255)):
        yield f"127.{second}.{third}"


_BLOCKS = _blocks()


def as_client_user(command: list[str]) -> list[str]:
    """``command`` run as ``CLIENT_UID``, so that a firewall rule can match its packets.

    It keeps the right to read and write any file (ambient CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH): the interpreter and the shared history may live in root's
    directories.
    """
    caps = "+dac_override,+dac_read_search"
    return [
        _binary("setpriv"),
        f"--reuid={CLIENT_UID}",
        f"--regid={CLIENT_UID}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        *command,
    ]


def in_private_netns() -> bool:
    """This process's network namespace has no interface but loopback: one of our own.

    (The machine's has its real interfaces; a namespace made by ``unshare --net`` has
    only ``lo``, so no rule made here can reach beyond this machine's test traffic.)
    """
    return [name for _, name in socket.if_nameindex()] == ["lo"]


class ClusterNode(PrivateServer):
    """A node: a server on its own address, as its own user id, with its own data dir."""

    def __init__(self, index: int, host: str) -> None:
        self.uid = next(_UIDS)
        # The data directory must belong to the node's user; pytest's tmp dirs are
        # private to root, so it lives in a temporary directory of its own.
        super().__init__(Path(tempfile.mkdtemp(prefix=f"aiotooz-{self.name}{index}-")))
        os.chmod(self._workdir, 0o755)
        self.index = index
        self.host = host
        self.port = free_port(host)
        self.address = f"{host}:{self.port}"
        self.url = self.address  # for repr; clusters make the client URLs

    def _as_node_user(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        return [
            _binary("setpriv"),
            f"--reuid={self.uid}",
            f"--regid={self.uid}",
            "--clear-groups",
            *command,
        ]

    def _own(self, path: Path) -> Path:
        """Make ``path`` a directory that belongs to the node's user."""
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for root, dirs, files in os.walk(path):
                for name in [*dirs, *files]:
                    os.chown(os.path.join(root, name), self.uid, self.uid)
            os.chown(path, self.uid, self.uid)
        return path


class Cluster:
    """Nodes started together; ``close()`` stops them all and deletes their data."""

    nodes: list[ClusterNode]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.leader() is not None:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{type(self).__name__} has no leader after {timeout} s")

    def leader(self) -> ClusterNode | None:
        raise NotImplementedError

    def close(self) -> None:
        for node in self.nodes:
            node.close()


# -- etcd --------------------------------------------------------------------------------


class EtcdNode(ClusterNode):
    name = "etcd"

    def __init__(self, index: int, host: str) -> None:
        self._binary = _binary("etcd")
        super().__init__(index, host)
        self.peer_port = free_port(self.host)
        self.initial_cluster = ""

    @property
    def member(self) -> str:
        return f"n{self.index}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def _prepare(self) -> None:
        self._own(self._workdir / "data")

    def _command(self) -> list[str]:
        client = f"http://{self.address}"
        return self._as_node_user(
            [
                self._binary,
                "--name",
                self.member,
                "--data-dir",
                str(self._workdir / "data" / "etcd"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                self.peer_url,
                "--initial-advertise-peer-urls",
                self.peer_url,
                "--initial-cluster",
                self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                # etcd's default from 3.5 (Debian ships 3.4, where it is off): without it a
                # member cut off from the others comes back with a higher term and forces
                # an election, and for about 2 s no member answers. Beats then outlast
                # call_timeout and the coordinators lose their locks (the several-endpoint
                # scenarios: 2 of 8 partitions, traced).
                "--pre-vote=true",
                "--log-level",
                "warn",
            ]
        )

    def status(self) -> dict[str, object]:
        request = urllib.request.Request(
            f"http://{self.address}/v3/maintenance/status", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=1) as answer:
            return dict(json.load(answer))


class EtcdCluster(Cluster):
    """Three etcd members (heartbeat 100 ms, election timeout 1 s, pre-vote)."""

    def __init__(self, size: int = 3) -> None:
        block = next(_BLOCKS)
        self.nodes = [EtcdNode(i, f"{block}.{10 + i}") for i in range(1, size + 1)]
        initial = ",".join(f"{node.member}={node.peer_url}" for node in self.etcd_nodes)
        for node in self.etcd_nodes:
            node.initial_cluster = initial

    @property
    def etcd_nodes(self) -> list[EtcdNode]:
        return [node for node in self.nodes if isinstance(node, EtcdNode)]

    def url(self, node: ClusterNode, lock_timeout: int) -> str:
        """etcd3gw talks to one endpoint: the URL names one node."""
        return self.url_at(node.address, lock_timeout)

    @staticmethod
    def url_at(address: str, lock_timeout: int) -> str:
        """The URL of one endpoint at ``address`` (a node, or a proxy in front of one)."""
        return f"etcd3+http://{address}?lock_timeout={lock_timeout}&timeout=2"

    def leader(self) -> ClusterNode | None:
        for node in self.etcd_nodes:
            if not node.running:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):
                status = node.status()
                header = status["header"]
                assert isinstance(header, dict)
                if status.get("leader") and status["leader"] == header["member_id"]:
                    return node
        return None


# -- ZooKeeper ---------------------------------------------------------------------------


class ZooKeeperNode(ClusterNode):
    name = "zookeeper"
    JARS = ("/usr/share/java/zookeeper.jar", "/usr/share/zookeeper/lib/zookeeper.jar")

    def __init__(self, index: int, host: str) -> None:
        self._java = _binary("java")
        jar = next((jar for jar in self.JARS if os.path.exists(jar)), None)
        if jar is None:
            missing_backend("ZooKeeper is not installed (Debian package: zookeeper)")
        self._jar = str(jar)
        super().__init__(index, host)
        self.quorum_port = free_port(self.host)
        self.election_port = free_port(self.host)
        self.servers = ""

    def _prepare(self) -> None:
        data = self._workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "myid").write_text(f"{self.index}\n")
        (self._workdir / "zoo.cfg").write_text(
            "tickTime=500\n"
            "initLimit=10\n"
            "syncLimit=4\n"
            f"dataDir={data}\n"
            f"clientPort={self.port}\n"
            f"clientPortAddress={self.host}\n"
            "maxClientCnxns=0\n"
            f"{self.servers}"
        )
        self._own(data)

    def _command(self) -> list[str]:
        return self._as_node_user(
            [
                self._java,
                "-Xmx128m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-XX:-UsePerfData",
                "-Dzookeeper.admin.enableServer=false",
                "-Dzookeeper.4lw.commands.whitelist=ruok,srvr",
                "-cp",
                self._jar,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                str(self._workdir / "zoo.cfg"),
            ]
        )

    def mode(self) -> str | None:
        with socket.create_connection((self.host, self.port), 1) as sock:
            sock.sendall(b"srvr")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        for line in answer.decode(errors="replace").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None


class ZooKeeperCluster(Cluster):
    """A three-server ZooKeeper ensemble (tick 500 ms: sessions of 1 s and more)."""

    def __init__(self, size: int = 3) -> None:
        block = next(_BLOCKS)
        self.nodes = [ZooKeeperNode(i, f"{block}.{10 + i}") for i in range(1, size + 1)]
        servers = "".join(
            f"server.{node.index}={node.host}:{node.quorum_port}:{node.election_port}\n"
            for node in self.zk_nodes
        )
        for node in self.zk_nodes:
            node.servers = servers

    @property
    def zk_nodes(self) -> list[ZooKeeperNode]:
        return [node for node in self.nodes if isinstance(node, ZooKeeperNode)]

    def url(self, nodes: list[ClusterNode], timeout: int) -> str:
        """kazoo takes a connect string of several servers (tooz passes the netloc on)."""
        return self.url_at([node.address for node in nodes], timeout)

    @staticmethod
    def url_at(addresses: list[str], timeout: int) -> str:
        """The URL of servers at ``addresses`` (nodes, or proxies in front of them)."""
        return f"zookeeper://{','.join(addresses)}?timeout={timeout}"

    def leader(self) -> ClusterNode | None:
        modes = {}
        for node in self.zk_nodes:
            if node.running:
                with contextlib.suppress(OSError):
                    modes[node] = node.mode()
        if sum(1 for mode in modes.values() if mode in ("leader", "follower")) < 2:
            return None
        return next((node for node, mode in modes.items() if mode == "leader"), None)


# -- Redis with Sentinel -----------------------------------------------------------------


class RedisNode(ClusterNode):
    name = "redis"

    def __init__(self, index: int, host: str, primary: RedisNode | None = None) -> None:
        self._binary = _binary("redis-server")
        super().__init__(index, host)
        self._primary = primary

    def _prepare(self) -> None:
        self._own(self._workdir / "data")

    def _command(self) -> list[str]:
        replica = (
            ["--replicaof", self._primary.host, str(self._primary.port)] if self._primary else []
        )
        return self._as_node_user(
            [
                self._binary,
                "--bind",
                self.host,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._workdir / "data"),
                "--replica-announce-ip",
                self.host,  # connections leave from 127.0.0.1: say which is this node's
                *replica,
            ]
        )


class SentinelNode(ClusterNode):
    name = "sentinel"

    def __init__(self, index: int, host: str, primary: RedisNode, master: str) -> None:
        self._binary = _binary("redis-server")
        super().__init__(index, host)
        self._primary = primary
        self._master = master

    def _prepare(self) -> None:
        data = self._own(self._workdir / "data")
        config = data / "sentinel.conf"
        config.write_text(
            f"bind {self.host}\n"
            f"port {self.port}\n"
            f"dir {data}\n"
            f"sentinel monitor {self._master} {self._primary.host} {self._primary.port} 2\n"
            f"sentinel down-after-milliseconds {self._master} 1000\n"
            f"sentinel failover-timeout {self._master} 4000\n"
            f"sentinel parallel-syncs {self._master} 1\n"
            # Connections leave from 127.0.0.1: say which address is this node's.
            f"sentinel announce-ip {self.host}\n"
            f"sentinel announce-port {self.port}\n"
        )
        self._own(data)

    def _command(self) -> list[str]:
        config = str(self._workdir / "data" / "sentinel.conf")
        return self._as_node_user([self._binary, config, "--sentinel"])


class RedisSentinelCluster(Cluster):
    """A Redis primary, one replica, and three Sentinels (down after 1 s, quorum 2)."""

    MASTER = "aiotooz"

    def __init__(self) -> None:
        block = next(_BLOCKS)
        primary = RedisNode(1, f"{block}.11")
        replica = RedisNode(2, f"{block}.12", primary)
        self.redis_nodes = [primary, replica]
        self.sentinels = [
            SentinelNode(i, f"{block}.{20 + i}", primary, self.MASTER) for i in (1, 2, 3)
        ]
        self.nodes = [*self.redis_nodes, *self.sentinels]

    def url(self, lock_timeout: int) -> str:
        first, *others = self.sentinels
        fallbacks = "".join(f"&sentinel_fallback={node.address}" for node in others)
        return (
            f"redis://{first.address}?sentinel={self.MASTER}{fallbacks}&lock_timeout={lock_timeout}"
        )

    def leader(self) -> ClusterNode | None:
        """The primary the Sentinels agree on (a majority of those that answer)."""
        import redis

        votes: dict[str, int] = {}
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(sentinel.host, sentinel.port, socket_timeout=1)
                with contextlib.closing(client):
                    answer = client.sentinel_get_master_addr_by_name(self.MASTER)
                    host, port = answer  # type: ignore[misc]  # redis-py's stub is wrong
                address = f"{host.decode() if isinstance(host, bytes) else host}:{port}"
                votes[address] = votes.get(address, 0) + 1
        for node in self.redis_nodes:
            if votes.get(node.address, 0) >= 2 and node.running and self._is_primary(node):
                return node
        return None

    @staticmethod
    def _is_primary(node: RedisNode) -> bool:
        import redis

        try:
            client = redis.Redis(node.host, node.port, socket_timeout=1)
            with contextlib.closing(client):
                return bool(client.info("replication")["role"] == "master")
        except redis.RedisError:
            return False


# -- Redis Cluster -----------------------------------------------------------------------


class RedisClusterNode(ClusterNode):
    name = "redis-cluster"

    def __init__(self, index: int, host: str) -> None:
        self._binary = _binary("redis-server")
        super().__init__(index, host)
        self.bus_port = free_port(self.host)

    def _prepare(self) -> None:
        self._own(self._workdir / "data")

    def _command(self) -> list[str]:
        data = self._workdir / "data"
        return self._as_node_user(
            [
                self._binary,
                "--bind",
                self.host,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(data / "nodes.conf"),
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",
                str(self.bus_port),
                # Connections leave from 127.0.0.1: say which address is this node's.
                "--cluster-announce-ip",
                self.host,
            ]
        )

    def ask(self, *command: str) -> bytes:
        return subprocess.run(
            [_binary("redis-cli"), "-h", self.host, "-p", str(self.port), *command],
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout


class RedisClusterOfSix(Cluster):
    """A Redis Cluster of three primaries with a replica each (node timeout 1 s)."""

    def __init__(self) -> None:
        block = next(_BLOCKS)
        self.nodes = [RedisClusterNode(i, f"{block}.{10 + i}") for i in range(1, 7)]
        self._created = False

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        if not self._created:
            subprocess.run(
                [_binary("redis-cli"), "--cluster", "create"]
                + [node.address for node in self.nodes]
                + ["--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self._created = True
        self.wait_healthy()

    def url(self, lock_timeout: int) -> str:
        addresses = ",".join(node.address for node in self.nodes)
        return f"redis+cluster://{addresses}?lock_timeout={lock_timeout}"

    def leader(self) -> ClusterNode | None:
        """A primary, once every running node says the cluster is ok and every replica
        is in sync (else none: a replica out of sync could not take over)."""
        primary = None
        for node in self.nodes:
            if not isinstance(node, RedisClusterNode) or not node.running:
                continue
            info = node.ask("cluster", "info") + node.ask("info", "replication")
            if b"cluster_state:ok" not in info:
                return None
            if b"role:master" in info:
                primary = primary or node
            elif b"master_link_status:up" not in info:
                return None
        return primary


# -- network faults ----------------------------------------------------------------------


class Firewall:
    """nftables rules that cut nodes off, in a table of its own; ``heal()`` drops them all."""

    def __init__(self) -> None:
        if not in_private_netns():
            missing_backend(
                "network faults need a private network namespace: run `nox -s failover` "
                "(or pytest under `unshare --net`)"
            )
        self._nft = _binary("nft")
        self.table = f"aiotooz_fo_{os.getpid()}"
        self._nft_run(f"add table inet {self.table}")
        self._nft_run(
            f"add chain inet {self.table} out "
            "{ type filter hook output priority 0 ; policy accept ; }"
        )

    def _nft_run(self, command: str) -> None:
        subprocess.run([self._nft, *command.split()], check=True, capture_output=True)

    def isolate(self, node: ClusterNode, others: list[ClusterNode]) -> None:
        """Drop every packet between ``node`` and ``others`` (either way)."""
        addresses = ", ".join(other.host for other in others)
        uids = ", ".join(str(other.uid) for other in others)
        self._nft_run(
            f"add rule inet {self.table} out meta skuid {node.uid} ip daddr {{ {addresses} }} drop"
        )
        self._nft_run(
            f"add rule inet {self.table} out meta skuid {{ {uids} }} ip daddr {node.host} drop"
        )

    def cut_off(self, uid: int) -> None:
        """Drop every packet the processes of user ``uid`` send (a client, cut off).

        Its TCP connections stall both ways: nothing it sends, acknowledgements
        included, reaches a node.
        """
        self._nft_run(f"add rule inet {self.table} out meta skuid {uid} drop")

    def lose(self, percent: int) -> None:
        """Drop ``percent`` % of all packets, at random (this kernel has no netem)."""
        self._nft_run(f"add rule inet {self.table} out numgen random mod 100 < {percent} drop")

    def heal(self) -> None:
        self._nft_run(f"flush chain inet {self.table} out")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._nft_run(f"delete table inet {self.table}")


@contextlib.contextmanager
def firewall() -> Iterator[Firewall]:
    wall = Firewall()
    try:
        yield wall
    finally:
        wall.close()
