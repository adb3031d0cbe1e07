"""Read-write locks on ZooKeeper: sequential nodes under the lock's path (Curator's recipe).

A reader or writer makes an ephemeral sequential child of the lock's node,
``read-<seq>`` or ``write-<seq>``, holding its member id. A writer holds the lock while
its node is the lowest; a reader while no ``write-`` node is lower than its own. So a
writer's node, once made, holds back every reader that comes after it: writer
preference is the order itself.

A try that fails deletes its node, unless its waiter waits (the driver armed a watch
for it): then the node stays, keeping its place in the order, until the waiter is
granted or gives up (``disarm``, which deletes it from a thread of its own).
Nodes are ephemeral: they go with the session, and every grant with them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, final

__all__ = ["ZooKeeperRW", "ZooKeeperRWLock"]

_READ = "read-"
_WRITE = "write-"


def _sequence(child: str) -> str:
    return child[-10:]  # ZooKeeper's sequence suffix: ten digits


@final
class ZooKeeperRWLock:
    """One reader's or writer's lock on a read-write lock's node (one key of its family)."""

    __slots__ = ("_aiotooz_session", "acquired", "key", "node", "path", "write")

    def __init__(self, path: str, key: str, write: bool) -> None:
        #: The lock's node; contenders are its children.
        self.path = path
        self.key = key
        self.write = write
        self.acquired = False
        #: Our child node while held (``<path>/<child>``), or ``None``.
        self.node: str | None = None
        #: The session the node was made in (see ``ZooKeeperDriver.beat``).
        self._aiotooz_session: int | None = None


def _blocker(children: list[str], mine: str, write: bool) -> str | None:
    """The child ``mine`` waits for (the nearest one before it that blocks it), or ``None``."""
    ordered = sorted(children, key=_sequence)
    before = ordered[: ordered.index(mine)] if mine in ordered else ordered
    if not write:
        before = [child for child in before if child.startswith(_WRITE)]
    return before[-1] if before else None


@final
class ZooKeeperRW:
    """The read-write locks of one ZooKeeper driver: tries, waits and releases.

    Args:
        client: returns the driver's kazoo client.
        member_id: the coordinator's member id (each node's data).
    """

    def __init__(self, client: Callable[[], Any], member_id: bytes) -> None:
        self._client = client
        self._member_id = member_id
        self._guard = threading.Lock()
        #: Nodes kept for waiters that wait (armed), by key.
        self._waiting: dict[str, str] = {}

    def _make_node(self, lock: ZooKeeperRWLock) -> str:
        prefix = f"{lock.path}/{_WRITE if lock.write else _READ}"
        created: str = self._client().create(
            prefix, self._member_id, ephemeral=True, sequence=True, makepath=True
        )
        return created

    def try_acquire(self, lock: ZooKeeperRWLock, session: int) -> bool:
        """One try: our node (made now, or kept for the waiter) is let in, or not."""
        with self._guard:
            node = self._waiting.get(lock.key)
        made = node is None
        if node is None:
            node = self._make_node(lock)
        children = self._client().get_children(lock.path)
        mine = node.rpartition("/")[2]
        if mine in children and _blocker(children, mine, lock.write) is None:
            with self._guard:
                if self._waiting.get(lock.key) == node:
                    del self._waiting[lock.key]
            lock.node, lock.acquired, lock._aiotooz_session = node, True, session
            return True
        if made:  # a try alone keeps no place: only a waiter does (arm)
            from kazoo.exceptions import NoNodeError

            try:
                self._client().delete(node)
            except NoNodeError:
                pass
        elif mine not in children:  # gone (a session replaced): make a new one next time
            with self._guard:
                self._waiting.pop(lock.key, None)
        return False

    def release(self, lock: ZooKeeperRWLock) -> bool:
        """Delete our node; ``False`` if it was gone (its session ended)."""
        from kazoo.exceptions import NoNodeError

        node, lock.node, lock.acquired = lock.node, None, False
        if node is None:
            return False
        try:
            self._client().delete(node)
        except NoNodeError:
            return False
        return True

    def fencing_token(self, lock: ZooKeeperRWLock) -> int | None:
        """The zxid of a write to our node (as for a lock)."""
        from kazoo.exceptions import NoNodeError

        if lock.node is None:
            return None
        try:
            stat = self._client().set(lock.node, self._member_id)
        except NoNodeError:
            return None
        return int(stat.mzxid)

    def arm(self, lock: ZooKeeperRWLock, fire: Callable[..., object]) -> bool:
        """Queue (keep a node for the waiter) and watch the node it waits for.

        ``True`` if nothing blocks it now (try again at once).
        """
        with self._guard:
            node = self._waiting.get(lock.key)
        if node is None:
            node = self._make_node(lock)
            with self._guard:
                self._waiting[lock.key] = node
        children = self._client().get_children(lock.path)
        mine = node.rpartition("/")[2]
        if mine not in children:
            with self._guard:
                self._waiting.pop(lock.key, None)
            return True
        blocker = _blocker(children, mine, lock.write)
        if blocker is None:
            return True
        return self._client().exists(f"{lock.path}/{blocker}", watch=fire) is None

    def disarm(self, lock: ZooKeeperRWLock) -> None:
        """The waiter stops waiting: delete its node, in a thread (called on the loop).

        kazoo's own ``delete_async`` writes to its connection's wake-up pipe on the
        caller's thread; a thread of its own keeps the event loop out of kazoo.
        """
        with self._guard:
            node = self._waiting.pop(lock.key, None)
        if node is not None:
            name = "aiotooz-zookeeper-rw-give-up"
            threading.Thread(target=self._delete, args=(node,), name=name, daemon=True).start()

    def _delete(self, node: str) -> None:
        from kazoo.exceptions import KazooException

        try:
            self._client().delete(node)
        except KazooException:
            pass  # gone already; or the session is, and the ephemeral node with it
