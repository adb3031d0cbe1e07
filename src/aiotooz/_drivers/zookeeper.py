"""The ZooKeeper backend (tooz's kazoo driver)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tooz.coordination

from . import _options
from ._base import Capability, Driver

__all__ = ["ZooKeeperDriver"]

#: What kazoo's lock recipe puts in a contender node's name, before its sequence number.
_NODE_MARK = "__lock__"


class ZooKeeperDriver(Driver):
    """ZooKeeper locks: ephemeral nodes that live as long as the kazoo session.

    kazoo queues a call made while it reconnects, and its synchronous API waits for the
    answer with no timeout: with the server down, a heartbeat, try or release would park
    its worker thread until the server came back. Every call is refused while kazoo is
    not connected instead.
    """

    extra = "zookeeper"
    accepted_options = _options.ZOOKEEPER
    capabilities = frozenset(
        {
            Capability.EXPIRES,
            Capability.KNOWS_OWNER,
            Capability.FENCES,
            Capability.WAKES_WAITERS,
            Capability.NAMES_LEADER,
        }
    )

    @property
    def _client(self) -> Any:
        return self.tooz._coord  # type: ignore[attr-defined]

    @property
    def lock_ttl(self) -> float:
        """The session timeout: the one the server negotiated, if it is shorter."""
        negotiated = self._client._session_timeout / 1000  # kazoo keeps milliseconds
        return min(float(self.tooz.timeout), float(negotiated))  # type: ignore[attr-defined]

    def stop(self) -> None:
        super().stop()
        # tooz stops its kazoo client but never closes it, leaking a socket pair.
        self._client.close()

    def _check_connected(self) -> None:
        state = self._client.state
        if state != "CONNECTED":
            raise tooz.coordination.ToozConnectionError(f"the ZooKeeper session is {state}")

    def heartbeat(self) -> None:
        """A read that proves the session, with a deadline of half the session."""
        self._check_connected()
        deadline = self.lock_ttl / 2
        try:
            self._client.exists_async("/").get(timeout=deadline)
        except self._client.handler.timeout_exception as exc:
            raise tooz.coordination.ToozConnectionError(
                f"ZooKeeper did not answer within {deadline:g} s"
            ) from exc

    def try_acquire(self, lock: Any, key: str) -> bool:
        self._check_connected()
        return super().try_acquire(lock, key)

    def release(self, lock: Any) -> bool:
        # The lock node is ephemeral: it goes with the session if we cannot release it.
        self._check_connected()
        return super().release(lock)

    def fencing_token(self, lock: Any) -> int | None:
        """The zxid of a write to our lock node.

        ZooKeeper's transaction id grows with every write to the ensemble; the node, and
        the token with it, is gone with our session.
        """
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        recipe = lock._lock
        if recipe.node is None:
            return None
        try:
            stat = self._client.set(f"{recipe.path}/{recipe.node}", recipe.data)
        except NoNodeError:
            return None
        return int(stat.mzxid)

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """Nothing to write: tooz puts the member id in the lock's contender node."""

    def read_leader(self, key: str) -> str | None:
        """The data of the holder's node: the contender with the lowest sequence number.

        The node is ephemeral: it goes with its session, and the answer with it.
        """
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        path = self.get_lock(key)._lock.path
        try:
            children = self._client.get_children(path)
        except NoNodeError:
            return None
        for child in _by_sequence(children):
            try:
                data, _ = self._client.get(f"{path}/{child}")
            except NoNodeError:
                continue  # released or tried and given up meanwhile: the next one
            return bytes(data).decode("utf-8", "replace") or None
        return None

    def arm_release_watch(self, lock: Any, fire: Callable[..., object]) -> bool:
        """A watch on the holder's node: the contender with the lowest sequence number.

        It fires when the holder releases or its session ends; our own tries (which make
        and delete nodes of their own) never fire it.
        """
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        path = lock._lock.path
        try:
            children = self._client.get_children(path)
        except NoNodeError:
            return True
        contenders = _by_sequence(children)
        if not contenders:
            return True
        return self._client.exists(f"{path}/{contenders[0]}", watch=fire) is None


def _by_sequence(children: list[str]) -> list[str]:
    """The lock recipe's contender nodes among ``children``, the holder's first."""
    return sorted(
        (child for child in children if _NODE_MARK in child),
        key=lambda child: child.rpartition(_NODE_MARK)[2],
    )
