"""The ZooKeeper backend (tooz's kazoo driver)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import tooz.coordination

from .._names import split_rw_key
from . import _options
from ._base import Capability, Driver, HolderRecord, holder_stamp, read_stamp
from ._zkrw import ZooKeeperRW, ZooKeeperRWLock

__all__ = ["ZooKeeperDriver"]

#: The node of the record kept beside a lock: the lock's path and this suffix (no lock
#: key has it: plain keys have no ``~``, mapped keys end in ``~`` and 32 hex digits).
_RECORD_SUFFIX = "~record"
#: The attribute of a tooz lock object that names the session its node was made in.
_SESSION_ATTRIBUTE = "_aiotooz_session"

#: The attribute of a tooz lock object set when a beat found its node deleted from
#: outside while its session lives: the lock was broken.
_BROKEN_ATTRIBUTE = "_aiotooz_broken"
#: The node a break writes (beside tooz's ``locks`` node), so that every coordinator's
#: beat, which reads it in place of the root, knows to check its lock nodes.
_BREAKS_NODE = "aiotooz-breaks"

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
            Capability.ARMS_WATCHES,
            Capability.NAMES_LEADER,
            Capability.KEEPS_RECORDS,
            Capability.NAMES_HOLDERS,
            Capability.LISTS_HOLDERS,
            Capability.BREAKS_LOCKS,
            Capability.SHARES_LOCKS,
        }
    )
    _rw: ZooKeeperRW | None = None

    def __init__(self, coordinator: Any, call_timeout: float) -> None:
        super().__init__(coordinator, call_timeout)
        #: The breaks node's last write (its mzxid; 0: none) as this driver last read it.
        self._breaks_seen: int | None = None

    @property
    def _client(self) -> Any:
        return self.tooz._coord  # type: ignore[attr-defined]

    @property
    def lock_ttl(self) -> float:
        """The session timeout: the one the server negotiated, if it is shorter."""
        negotiated = self._client._session_timeout / 1000  # kazoo keeps milliseconds
        return min(float(self.tooz.timeout), float(negotiated))  # type: ignore[attr-defined]

    def start(self) -> None:
        super().start()
        self._breaks_changed()  # from now on, a break makes the next beat check our nodes

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
        self._read_breaks()

    def _breaks_changed(self) -> bool:
        """Whether a break happened since the last beat asked (the breaks node changed)."""
        seen, self._breaks_seen = self._breaks_seen, self._read_breaks()
        return seen is not None and seen != self._breaks_seen

    def _read_breaks(self) -> int:
        """Read the breaks node (the beat's one read): its last write's zxid, 0 if none.

        Raises ``ToozConnectionError`` if the server does not answer within half the
        session: the read proves the session.
        """
        self._check_connected()
        deadline = self.lock_ttl / 2
        try:
            stat = self._client.exists_async(self._breaks_path()).get(timeout=deadline)
        except self._client.handler.timeout_exception as exc:
            raise tooz.coordination.ToozConnectionError(
                f"ZooKeeper did not answer within {deadline:g} s"
            ) from exc
        return 0 if stat is None else int(stat.mzxid)

    def _breaks_path(self) -> str:
        locks = self.get_lock("K")._lock.path.rsplit("/", 1)[0]
        return f"{locks.rsplit('/', 1)[0]}/{_BREAKS_NODE}"

    def beat(self, locks: Sequence[Any]) -> list[bool | None]:
        """Prove the session; a lock granted in this session is still ours.

        The session carries its ephemeral lock nodes: while it is the one a lock was
        granted in, the node is there, and no read per lock is needed (tooz's check
        reads each node: a round trip per held lock per beat). A session that expired
        and was replaced by kazoo took its nodes with it: each lock granted in it reads
        lost.
        """
        broke = self._breaks_changed()
        session = self._session_id()
        owned = [
            None
            if lock is None or not lock.acquired
            else getattr(lock, _SESSION_ATTRIBUTE, None) == session
            for lock in locks
        ]
        if broke:  # a break somewhere: are our nodes still there? (reads sent together)
            asked = [(at, lock) for at, lock in enumerate(locks) if owned[at]]
            answers = [self._client.exists_async(_node(lock)) for _, lock in asked]
            for (at, lock), answer in zip(asked, answers, strict=True):
                if answer.get(timeout=self.lock_ttl / 2) is None:
                    setattr(lock, _BROKEN_ATTRIBUTE, True)
                    owned[at] = False
        return owned

    def was_broken(self, lock: Any) -> bool:
        return bool(getattr(lock, _BROKEN_ATTRIBUTE, False))

    def _session_id(self) -> int:
        return int(self._client.client_id[0])

    def _rwlocks(self) -> ZooKeeperRW:
        if self._rw is None:
            member = self.tooz._member_id
            self._rw = ZooKeeperRW(lambda: self._client, member)
        return self._rw

    def get_lock(self, key: str) -> Any:
        rw = split_rw_key(key)
        if rw is None:
            return super().get_lock(key)
        # The read-write lock's node is where tooz would put a lock of its family key.
        path = super().get_lock(rw[0])._lock.path
        return ZooKeeperRWLock(path, key, rw[1])

    def try_acquire(self, lock: Any, key: str) -> bool:
        self._check_connected()
        session = self._session_id()
        if isinstance(lock, ZooKeeperRWLock):
            return self._rwlocks().try_acquire(lock, session)
        # The holder record is the contender node's data (``NAMES_HOLDERS``): written
        # with the node, gone with it. Plain tooz puts its member id there.
        member = self.tooz._member_id.decode("utf-8", "replace")
        lock._lock.data = holder_stamp(member)
        setattr(lock, _BROKEN_ATTRIBUTE, False)
        granted = super().try_acquire(lock, key)
        if granted:
            # The session the node was made in (read before: a session replaced during
            # the try makes the grant read lost at the next beat, never the reverse).
            setattr(lock, _SESSION_ATTRIBUTE, session)
        return granted

    def release(self, lock: Any) -> bool:
        """Delete our node; ``False`` if it was gone (deleted, or its session ended).

        kazoo's release ignores a missing node, so it cannot say "not ours".
        """
        from kazoo.exceptions import NoNodeError

        # The lock node is ephemeral: it goes with the session if we cannot release it.
        self._check_connected()
        if isinstance(lock, ZooKeeperRWLock):
            return self._rwlocks().release(lock)
        recipe = lock._lock
        if not recipe.is_acquired or recipe.node is None:
            return False
        try:
            self._client.delete(f"{recipe.path}/{recipe.node}")
        except NoNodeError:
            ours = False
        else:
            ours = True
        # What kazoo's own release does once the node is deleted (or found gone).
        recipe.is_acquired = False
        recipe.node = None
        return ours

    def fencing_token(self, lock: Any) -> int | None:
        """The zxid of a write to our lock node.

        ZooKeeper's transaction id grows with every write to the ensemble; the node, and
        the token with it, is gone with our session.
        """
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        if isinstance(lock, ZooKeeperRWLock):
            return self._rwlocks().fencing_token(lock)
        recipe = lock._lock
        if recipe.node is None:
            return None
        try:
            stat = self._client.set(f"{recipe.path}/{recipe.node}", recipe.data)
        except NoNodeError:
            return None
        return int(stat.mzxid)

    def read_holder(self, key: str) -> HolderRecord | None:
        """The data of the holder's node: the contender with the lowest sequence number.

        The node is ephemeral: it goes with its session, and the answer with it. A write
        to it after it was made was its holder's fence (the write's zxid, the token).
        """
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        path = self.get_lock(key)._lock.path
        try:
            children = self._client.get_children(path)
        except NoNodeError:
            return None
        contenders = _by_sequence(children)
        for at, child in enumerate(contenders):
            try:
                data, stat = self._client.get(f"{path}/{child}")
            except NoNodeError:
                continue  # released or tried and given up meanwhile: the next one
            fenced = int(stat.mzxid) if stat.mzxid != stat.czxid else None
            data = bytes(data)
            return read_stamp(
                key,
                data,
                member_id=data.decode("utf-8", "replace") or None,  # plain tooz's
                fencing_token=fenced,
                waiters=len(contenders) - at - 1,
            )
        return None

    def list_holders(self, key_prefix: str) -> list[HolderRecord]:
        """The lock nodes under the prefix (one listing), then each one's holder."""
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        locks = self.get_lock("K")._lock.path.rsplit("/", 1)[0]
        try:
            keys = self._client.get_children(locks)
        except NoNodeError:
            return []
        holders = []
        for key in keys:
            # Read-write locks are not listed (their nodes are not the recipe's).
            if (
                key.startswith(key_prefix)
                and not key.endswith(_RECORD_SUFFIX)
                and split_rw_key(key) is None
            ):
                holder = self.read_holder(key)
                if holder is not None:
                    holders.append(holder)
        return holders

    def break_lock(self, key: str) -> HolderRecord | None:
        """Delete the holder's node, then write the breaks node: every beat reads it.

        ZooKeeper's zxid is the fencing counter: the delete moves it past the holder's
        token. The holder's session lives on, so only its next beat can tell it: the
        breaks node makes that beat check its nodes.
        """
        from kazoo.exceptions import NodeExistsError, NoNodeError

        self._check_connected()
        path = self.get_lock(key)._lock.path
        for _ in range(3):
            holder = self.read_holder(key)
            if holder is None:
                return None
            try:
                children = _by_sequence(self._client.get_children(path))
                self._client.delete(f"{path}/{children[0]}")
            except (NoNodeError, IndexError):
                continue  # released meanwhile: look again
            breaks = self._breaks_path()
            try:
                self._client.set(breaks, b"")
            except NoNodeError:
                with contextlib.suppress(NodeExistsError):
                    self._client.create(breaks, b"", makepath=True)
                self._client.set(breaks, b"")
            return holder
        return None

    def read_record(self, lock: Any) -> bytes | None:
        """The data of a node beside the lock's (not a child: those are its contenders)."""
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        try:
            data, _ = self._client.get(lock._lock.path + _RECORD_SUFFIX)
        except NoNodeError:
            return None
        return bytes(data).partition(b" ")[2]

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        """Set (or create) the node in a transaction that checks our lock node is there.

        Our ephemeral node is there as long as we hold the lock. The transaction also
        checks that the record is the version whose token was read.
        """
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        recipe = lock._lock
        if recipe.node is None:
            return False
        path, value = recipe.path + _RECORD_SUFFIX, b"%d %s" % (token, record)
        for _ in range(3):
            try:
                stored, stat = self._client.get(path)
            except NoNodeError:
                stored, stat = None, None
            if stored is not None and int(bytes(stored).partition(b" ")[0] or 0) > token:
                return False
            txn = self._client.transaction()
            txn.check(f"{recipe.path}/{recipe.node}", -1)  # -1: any version
            if stat is None:
                txn.create(path, value)
            else:
                txn.set_data(path, value, stat.version)
            results = txn.commit()
            if not any(isinstance(result, Exception) for result in results):
                return True
            if isinstance(results[0], NoNodeError):
                return False  # our lock node is gone: the lock is not ours
            # The record was written or removed meanwhile: read it again.
        return False

    def arm_release_watch(self, lock: Any, fire: Callable[..., object]) -> bool:
        """A watch on the holder's node: the contender with the lowest sequence number.

        It fires when the holder releases or its session ends; our own tries (which make
        and delete nodes of their own) never fire it.
        """
        from kazoo.exceptions import NoNodeError

        self._check_connected()
        if isinstance(lock, ZooKeeperRWLock):
            return self._rwlocks().arm(lock, fire)
        path = lock._lock.path
        try:
            children = self._client.get_children(path)
        except NoNodeError:
            return True
        contenders = _by_sequence(children)
        if not contenders:
            return True
        return self._client.exists(f"{path}/{contenders[0]}", watch=fire) is None

    def disarm_release_watch(self, lock: Any) -> None:
        """A read-write waiter that stops waiting gives up its place (its node)."""
        if isinstance(lock, ZooKeeperRWLock) and self._rw is not None:
            self._rw.disarm(lock)


def _node(lock: Any) -> str:
    """The path of the contender node a held lock object made."""
    return f"{lock._lock.path}/{lock._lock.node}"


def _by_sequence(children: list[str]) -> list[str]:
    """The lock recipe's contender nodes among ``children``, the holder's first."""
    return sorted(
        (child for child in children if _NODE_MARK in child),
        key=lambda child: child.rpartition(_NODE_MARK)[2],
    )
