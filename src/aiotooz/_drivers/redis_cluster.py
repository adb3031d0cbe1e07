"""The Redis Cluster backend (``redis+cluster://h1:7000,h2:7001``): locks of aiotooz's own.

tooz has no Redis Cluster driver, so this one is its own client (redis-py's cluster
clients: the blocking one in worker threads, the asyncio one on asyncio's loop). A lock's
keys share a hash tag, ``<namespace>:{<key>}:…``, so that the lock key, its fencing
counter, its records and its release channel fall in one slot and every script touches
one slot only. Releases are told with a plain ``PUBLISH`` from the release script, on
the node of the lock's slot, where waiters subscribe.

Plain tooz processes cannot lock on Redis Cluster: nothing here has to match tooz's keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

from . import _options
from ._base import Capability, Driver, ReleaseSignal
from .redis import (
    _FENCE_SCRIPT,
    _LEADER_SCRIPT,
    _RECORD_SCRIPT,
    _REFRESH_BATCH,
    _REFRESH_SCRIPT,
    _RELEASE_SCRIPT,
    _Channels,
)

__all__ = ["RedisClusterDriver"]

#: ``redis://``'s options that mean the same on a cluster (``db``: a cluster has database
#: 0 only; Sentinel and tooz's executor and membership keys have no part here).
OPTIONS: Final[Mapping[str, _options.Option]] = {
    name: option
    for name, option in _options.REDIS.items()
    if name not in {"db", "executor", "membership_timeout", "timeout", "encoding"}
    and not name.startswith("sentinel")
}

#: The client options a URL's query sets, and how their text is read.
_FLAG_OPTIONS: Final = frozenset({"retry_on_timeout", "socket_keepalive", "ssl"})
_SECONDS_OPTIONS: Final = frozenset(
    {"socket_timeout", "socket_connect_timeout", "health_check_interval"}
)
_TEXT_OPTIONS: Final = frozenset({"ssl_certfile", "ssl_keyfile", "ssl_ca_certs"})

#: tooz's default lock TTL on Redis, and the namespace of keys when the URL sets none.
_DEFAULT_LOCK_TIMEOUT: Final = 30
_DEFAULT_NAMESPACE: Final = "aiotooz"

# A beat's refresh script is :data:`redis._REFRESH_SCRIPT`, run once per node for the
# keys of many slots that node serves (or the run fails, and the beat tries those keys
# again after reading the cluster's slots anew). It names its keys only in ``ARGV``
# (no ``#!lua`` line), which is what lets it touch several slots of its node: Redis 6
# knows no other way, and Redis 7 keeps it for such scripts.


def _hosts(parts: urllib.parse.SplitResult) -> list[tuple[str, int]]:
    """The ``(host, port)`` of each node a ``redis+cluster://`` URL lists.

    Raises:
        ValueError: no node, an empty entry, a path, or a port that is not a number.
    """
    netloc = parts.netloc.rpartition("@")[2]
    hosts = []
    for entry in netloc.split(","):
        node = urllib.parse.urlsplit(f"//{entry}")
        if not entry or not node.hostname:
            raise ValueError(
                "a redis+cluster:// URL lists its nodes as host:port, separated by commas "
                "and nothing else, such as redis+cluster://h1:7000,h2:7001,h3:7002"
            )
        hosts.append((node.hostname, node.port or 6379))
    if parts.path not in ("", "/"):
        raise ValueError(
            "a redis+cluster:// URL has no path: Redis Cluster has database 0 only "
            "(redis+cluster://h1:7000,h2:7001)"
        )
    namespace = urllib.parse.parse_qs(parts.query).get("namespace", [""])
    if any("{" in value or "}" in value for value in namespace):
        raise ValueError(
            "the namespace of a redis+cluster:// URL may not hold { or }: they would "
            "change which keys Redis Cluster keeps together"
        )
    return hosts


class _ClusterLock:
    """One lock's keys, and the token of the grant held through this object (or ``None``)."""

    __slots__ = ("channel", "fence", "leader", "name", "record", "token")

    def __init__(self, namespace: str, key: str) -> None:
        if "{" in key or "}" in key:
            # The key cannot be its own hash tag: a digest of it is (injective, as the
            # key itself follows, and no brace-free key starts with the digest's ``#``
            # and holds a ``}``).
            tag = "#" + hashlib.sha256(key.encode("ascii")).hexdigest()[:24]
            base = f"{namespace}:{{{tag}}}:{key}".encode("ascii")
        else:
            base = f"{namespace}:{{{key}}}".encode("ascii")
        self.name = base + b":lock"
        self.fence = base + b":fence"
        self.leader = base + b":leader"
        self.record = base + b":record"
        self.channel = base + b":released"
        self.token: bytes | None = None


class _NodeChannels:
    """Release signals on the node that serves each channel's slot.

    A lock's release runs its ``PUBLISH`` on the node of the lock's slot, and a plain
    ``PUBLISH`` on a cluster counts the subscribers of that node only (it reaches the
    others over the cluster bus, uncounted). Subscribing there, as every process does,
    makes the count right: a release tells how many waiters elsewhere it woke (fairness
    between processes). One pub/sub connection per node (``_Channels``); when it
    breaks, every signal on it fires, and the next watch subscribes on the node the
    cluster's map names then.
    """

    def __init__(self, cluster: Any, options: Mapping[str, Any]) -> None:
        self._cluster = cluster
        self._options = options
        self._by_node: dict[str, tuple[Any, _Channels]] = {}
        self._watched: dict[ReleaseSignal, _Channels] = {}
        self._closed = False

    async def watch(self, channel: bytes) -> ReleaseSignal:
        import redis.asyncio

        await self._cluster.initialize()  # the map of slots (once; then at once)
        if self._closed:  # closed meanwhile: a client made now would never be closed
            raise RuntimeError("the release watches are closed")
        node = self._cluster.get_node_from_key(channel)
        entry = self._by_node.get(node.name)
        if entry is None:
            client = redis.asyncio.Redis(host=node.host, port=node.port, **self._options)
            entry = self._by_node[node.name] = (client, _Channels(client))
        signal = await entry[1].watch(channel)
        self._watched[signal] = entry[1]
        return signal

    async def unwatch(self, channel: bytes, signal: ReleaseSignal) -> None:
        channels = self._watched.pop(signal, None)
        if channels is not None:
            await channels.unwatch(channel, signal)

    async def close(self) -> None:
        self._closed = True
        entries, self._by_node = list(self._by_node.values()), {}
        self._watched.clear()
        for client, channels in entries:
            await channels.close()
            await client.aclose()


class RedisClusterDriver(Driver):
    """Redis Cluster locks: a key with a TTL of ``lock_timeout`` seconds, refreshed each beat.

    The same locks as on a single Redis (a token under ``SET NX PX``, compare-and-delete
    releases, a fencing counter and records beside the key, release signals), with a
    lock's keys in one slot. A beat refreshes every held key in one script run per node
    (per thousand keys), the runs sent node by node.
    """

    extra = "redis"
    accepted_options = OPTIONS
    capabilities = frozenset(
        {
            Capability.EXPIRES,
            Capability.KNOWS_OWNER,
            Capability.NATIVE_ASYNC,
            Capability.FENCES,
            Capability.WATCHES_ON_LOOP,
            Capability.NAMES_LEADER,
            Capability.KEEPS_RECORDS,
        }
    )
    #: Bounded socket waits, so that a dead or hung node is noticed in seconds.
    default_options: ClassVar[Mapping[str, str]] = {
        "socket_timeout": "2",
        "socket_connect_timeout": "2",
    }

    def __init__(self, url: str, options: Mapping[str, Any], call_timeout: float) -> None:
        # No tooz coordinator: this driver is its own client of the cluster.
        self.call_timeout = call_timeout
        parts = urllib.parse.urlsplit(url)
        self._hosts = _hosts(parts)
        query = {name: values[-1] for name, values in urllib.parse.parse_qs(parts.query).items()}
        query.update({name: value for name, value in options.items() if name not in query})
        self._ttl = int(query.get("lock_timeout", _DEFAULT_LOCK_TIMEOUT))
        self._namespace = query.get("namespace", _DEFAULT_NAMESPACE)
        client_options: dict[str, Any] = {}
        if parts.username:
            client_options["username"] = urllib.parse.unquote(parts.username)
        if parts.password:
            client_options["password"] = urllib.parse.unquote(parts.password)
        for name, value in query.items():
            if name in _FLAG_OPTIONS:
                client_options[name] = value.strip().lower() in ("1", "t", "true", "on", "y", "yes")
            elif name in _SECONDS_OPTIONS:
                client_options[name] = float(value)
            elif name in _TEXT_OPTIONS:
                client_options[name] = value
        self._client_options = client_options
        self._client: Any = None
        self._async_client: Any = None
        self._channels: _NodeChannels | None = None
        #: ``close_async`` ran: no watch opens a connection from now on.
        self._async_closed = False
        #: The token of every lock this connection holds, by key: what a beat refreshes.
        self._held: dict[bytes, bytes] = {}
        self._held_guard = threading.Lock()  # never held across a network call

    @classmethod
    def load(
        cls, url: str, member_id: str, options: Mapping[str, Any], call_timeout: float
    ) -> RedisClusterDriver:
        import redis.cluster  # noqa: F401  (a missing client library is told here)

        return cls(url, options, call_timeout)

    @classmethod
    def check_url(cls, parts: urllib.parse.SplitResult) -> None:
        """Every node is ``host:port``; no path (database 0 only); a namespace without braces."""
        _hosts(parts)

    # -- the connection ------------------------------------------------------------------

    def start(self) -> None:
        """Connect, reading the cluster's slots from the first node that answers."""
        import redis.cluster

        nodes = [
            redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in self._hosts
        ]
        self._client = redis.cluster.RedisCluster(startup_nodes=nodes, **self._client_options)

    def stop(self) -> None:
        client, self._client = self._client, None
        with self._held_guard:
            held, self._held = self._held, {}
        if client is None:
            return
        try:
            # Whatever is still held goes at once, not a TTL later (compare and delete).
            for key, token in held.items():
                channel = key[: -len(b":lock")] + b":released"
                client.eval(_RELEASE_SCRIPT, 2, key, channel, token)
        except Exception:
            pass
        finally:
            client.close()

    @property
    def requires_beating(self) -> bool:
        return True

    @property
    def lock_ttl(self) -> float:
        return float(self._ttl)

    def heartbeat(self) -> None:
        self.beat(())

    def beat(self, locks: Sequence[Any]) -> list[bool | None]:
        """Refresh every held key and check ``locks``: one script run per node and thousand keys.

        Keys are grouped by the node that serves their slot, as the client's map of the
        cluster says. Keys whose node fails (it died, the cluster is down while a replica
        takes over, or a key moved) are tried again, on the map read anew, every 0.2 s
        for half the TTL at most (and within the call timeout): a failover shorter than
        that costs no lock whose key reached the replica. A key still failing then is
        no longer ours (its refresh is not known to have happened); if no node answered
        at all, the beat fails (the cluster is unreachable).
        """
        client = self._live_client()
        with self._held_guard:
            held = self._held.copy()
        if any(b"\n" in key for key in held):  # cannot be joined (a namespace's newline)
            held = {key: token for key, token in held.items() if b"\n" not in key}
        ttl_ms = int(self._ttl * 1000)
        deadline = time.monotonic() + min(0.9 * self.call_timeout, 0.5 * self._ttl)
        pending, answered = self._refresh(client, held, ttl_ms, every_node=True)
        while (pending or not answered) and time.monotonic() < deadline:
            time.sleep(0.2)
            with contextlib.suppress(Exception):
                client.nodes_manager.initialize()
            asked = pending
            retried = {key: held[key] for key in asked}
            pending, answered_now = self._refresh(client, retried, ttl_ms, not answered)
            answered = answered or answered_now
            for key in asked.difference(retried):
                del held[key]  # found not ours on this try
        for key in pending:
            held.pop(key, None)
        if not answered:
            raise ConnectionError("no node of the Redis Cluster answered the heartbeat")
        return [
            None if lock is None or lock.token is None else held.get(lock.name) == lock.token
            for lock in locks
        ]

    def _refresh(
        self, client: Any, held: dict[bytes, bytes], ttl_ms: int, every_node: bool
    ) -> tuple[set[bytes], bool]:
        """One refresh of the keys in ``held``; those found not ours are removed from it.

        Returns the keys whose node failed (still in ``held``), and whether any node
        answered. ``every_node``: a node that serves none of them is asked too (an empty
        run), so that a beat with nothing held still proves the cluster answers.
        """
        by_node: dict[str, list[bytes]] = {}
        if every_node:
            by_node.update({node.name: [] for node in client.get_primaries()})
        for key in held:
            by_node.setdefault(client.get_node_from_key(key).name, []).append(key)
        failed: set[bytes] = set()
        answered = False
        for name, keys in by_node.items():
            try:
                node = client.get_node(node_name=name)
                pipeline = client.get_redis_connection(node).pipeline(transaction=False)
                starts = range(0, max(len(keys), 1), _REFRESH_BATCH)
                for at in starts:
                    batch = keys[at : at + _REFRESH_BATCH]
                    joined_keys = b"\n".join(batch)
                    joined_tokens = b"\n".join(held[key] for key in batch)
                    pipeline.eval(_REFRESH_SCRIPT, 0, ttl_ms, joined_keys, joined_tokens)
                answers = pipeline.execute()
            except Exception:
                failed.update(keys)
                continue
            answered = True
            for at, positions in zip(starts, answers, strict=True):
                for position in positions:
                    del held[keys[at + int(position) - 1]]
        return failed, answered

    def _live_client(self) -> Any:
        client = self._client
        if client is None:
            raise ConnectionError("the connection is closed")
        return client

    # -- locks ---------------------------------------------------------------------------

    def get_lock(self, key: str) -> _ClusterLock:
        return _ClusterLock(self._namespace, key)

    def try_acquire(self, lock: Any, key: str) -> bool:
        token = uuid.uuid1().hex.encode()
        lock.token = token  # before the call: a caller that gives up has it released
        granted = self._live_client().set(lock.name, token, nx=True, px=self._ttl * 1000)
        if not granted:
            lock.token = None
            return False
        self._keep(lock, token)
        return True

    def release(self, lock: Any) -> bool:
        """Compare and delete, telling waiters on the lock's channel."""
        token = lock.token
        self._forget(lock)
        if token is None:
            return False
        try:
            told = self._live_client().eval(_RELEASE_SCRIPT, 2, lock.name, lock.channel, token)
        finally:
            lock.token = None
        return int(told) >= 0

    def still_owner(self, lock: Any) -> bool | None:
        if lock.token is None:
            return None
        return bool(self._live_client().get(lock.name) == lock.token)

    def fencing_token(self, lock: Any) -> int | None:
        """From a counter key in the lock's slot, bumped by a script that checks the lock."""
        token = lock.token
        if token is None:
            return None
        answer = self._live_client().eval(_FENCE_SCRIPT, 2, lock.name, lock.fence, token)
        return None if answer is None else int(answer)

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """The record names the lock's token: it is void once the key holds another."""
        lock_token = lock.token
        if lock_token is not None:
            client = self._live_client()
            client.eval(_LEADER_SCRIPT, 2, lock.name, lock.leader, lock_token, member_id)

    def read_leader(self, key: str) -> str | None:
        """The record, if the lock's key holds the token it names (one ``MGET``, one slot)."""
        lock = self.get_lock(key)
        lock_token, record = self._live_client().mget([lock.name, lock.leader])
        if lock_token is None or record is None:
            return None
        token, _, member_id = bytes(record).partition(b" ")
        return member_id.decode("utf-8", "replace") if token == lock_token else None

    def read_record(self, lock: Any) -> bytes | None:
        stored = self._live_client().get(lock.record)
        return None if stored is None else bytes(stored).partition(b" ")[2]

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        """One script: the lock's key must hold our token; no TTL (it outlives the lock)."""
        lock_token = lock.token
        if lock_token is None:
            return False
        keys = (lock.name, lock.record)
        client = self._live_client()
        return bool(client.eval(_RECORD_SCRIPT, 2, *keys, lock_token, str(token), record))

    def _keep(self, lock: _ClusterLock, token: bytes) -> None:
        with self._held_guard:
            self._held[lock.name] = token

    def _forget(self, lock: _ClusterLock) -> None:
        token = lock.token
        with self._held_guard:
            if token is not None and self._held.get(lock.name) == token:
                del self._held[lock.name]

    # -- on the event loop ---------------------------------------------------------------

    def native_async_ready(self) -> bool:
        return True

    def _async(self) -> Any:
        if self._async_client is None:
            import redis.asyncio.cluster

            if self._async_closed:
                # A call racing stop(): a client made now would never be closed.
                raise redis.exceptions.ConnectionError("the connection is closed")

            nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in self._hosts]
            self._async_client = redis.asyncio.cluster.RedisCluster(
                startup_nodes=nodes, **self._client_options
            )
        return self._async_client

    async def try_acquire_async(self, lock: Any, key: str) -> bool:
        client = self._async()
        token = uuid.uuid1().hex.encode()
        # Set before the command is sent: a try that fails or gets no answer may have
        # been applied, and has the blocking release run for it (compare and delete:
        # harmless if not granted).
        lock.token = token
        granted = await client.set(lock.name, token, nx=True, px=self._ttl * 1000)
        if not granted:
            lock.token = None
            return False
        self._keep(lock, token)
        return True

    async def release_async(self, lock: Any) -> int:
        """Release, telling waiters; how many were told, or -1 if the lock was not ours."""
        token = lock.token
        self._forget(lock)
        if token is None:
            return -1
        client = self._async()
        told = await client.eval(_RELEASE_SCRIPT, 2, lock.name, lock.channel, token)
        lock.token = None
        return int(told)

    async def watch_releases(self, lock: Any) -> ReleaseSignal | None:
        if self._async_closed:
            return None  # stopping: a new client now would never be closed
        if self._channels is None:
            self._channels = _NodeChannels(self._async(), self._client_options)
        return await self._channels.watch(lock.channel)

    async def unwatch_releases(self, lock: Any, signal: ReleaseSignal) -> None:
        if self._channels is not None:
            await self._channels.unwatch(lock.channel, signal)

    async def close_async(self) -> None:
        self._async_closed = True
        channels, self._channels = self._channels, None
        if channels is not None:
            await channels.close()
        client, self._async_client = self._async_client, None
        if client is not None:
            await client.aclose()
            # aclose() skips the nodes of a client without a topology, as a first connect
            # cut short by a cancel leaves it (its cleanup is cancelled too): close all.
            manager = client.nodes_manager
            for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]:
                with contextlib.suppress(Exception):
                    await node.disconnect()
