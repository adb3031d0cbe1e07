"""The etcd backend (tooz's etcd3gw driver, over etcd's HTTP gateway)."""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from . import _options
from ._base import Capability, Driver, client_timeout_options

__all__ = ["EtcdDriver"]


class EtcdDriver(Driver):
    """etcd locks: a key with a lease of ``lock_timeout`` seconds, refreshed each beat.

    tooz leaks leases (one per try, and one per release) and cannot tell a lock's owner;
    this driver revokes what it leaves and reads the key to tell.
    """

    extra = "etcd"
    accepted_options = _options.ETCD
    capabilities = frozenset(
        {
            Capability.EXPIRES,
            Capability.KNOWS_OWNER,
            Capability.FENCES,
            Capability.WAKES_WAITERS,
            Capability.NAMES_LEADER,
        }
    )

    #: Watches (streams and threads) a coordinator keeps at most; past that, waiters poll.
    watch_limit: ClassVar[int] = 16

    def __init__(self, coordinator: Any, call_timeout: float) -> None:
        super().__init__(coordinator, call_timeout)
        #: Armed watches (a thread and an HTTP stream each), by lock object.
        self._watchers: dict[int, Any] = {}
        self._watchers_guard = threading.Lock()

    @classmethod
    def options(cls, query: Mapping[str, list[str]]) -> dict[str, str]:
        """A bounded client timeout, so that a dead or hung server is noticed in seconds."""
        return client_timeout_options(query)

    @property
    def lock_ttl(self) -> float:
        return float(self.tooz.lock_timeout)  # type: ignore[attr-defined]

    def try_acquire(self, lock: Any, key: str) -> bool:
        """One try that leaks no lease.

        tooz grants a new lease (``lock_timeout`` long) on every try and never revokes
        the ones that lose: a waiter polling a busy lock would pile up hundreds of live
        leases. A key that exists is busy without asking for a lease, and the lease of a
        try that loses the race is revoked at once.
        """
        if self.tooz.client.get(lock._key):  # type: ignore[attr-defined]
            return False
        if lock.acquire(blocking=False):
            return True
        lock._lease.revoke()
        return False

    def release(self, lock: Any) -> bool:
        """Release with tooz, then revoke the lock's lease, which tooz leaves alive.

        Without the revoke every acquire and release left a lease living
        ``lock_timeout`` seconds. A lock that was lost is also dropped from the driver's
        refresh list, which tooz keeps it in.
        """
        try:
            return bool(lock.release())
        finally:
            self.tooz._acquired_locks.discard(lock)  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):  # gone already: nothing left to revoke
                lock._lease.revoke()

    def still_owner(self, lock: Any) -> bool:
        """Whether the lock's key holds this lock's token, on the lease the heartbeat refreshes.

        tooz cannot tell (``is_still_owner`` is not implemented) and its heartbeat
        ignores a lease that is gone (etcd answers a keepalive of an unknown lease
        without a TTL, not with an error), so a key deleted or a lease revoked from
        outside would go unnoticed. The token alone is not enough either: a tooz try
        on the same lock object gives the object a new lease (and ours revokes it when
        the try fails), so the key can hold our token on a lease that nobody refreshes
        any more, and expire while its token still reads "ours".
        """
        if not lock.acquired:
            return False  # not in tooz's refresh list: its lease is not refreshed
        values = self.tooz.client.get(lock._key, metadata=True)  # type: ignore[attr-defined]
        if not values:
            return False
        value, meta = values[0]
        on_our_lease = int(meta.get("lease", 0)) == lock._lease.id
        return on_our_lease and bytes(value) == base64.b64decode(lock._uuid)

    def fencing_token(self, lock: Any) -> int | None:
        """The revision etcd gives a write to the lock key.

        The key is written again (same value, same lease) in a transaction that first
        checks it still holds our token; the cluster-wide revision of that write is the
        token.
        """
        client = self.tooz.client  # type: ignore[attr-defined]
        txn = {
            "compare": [
                {"key": lock._key_b64, "result": "EQUAL", "target": "VALUE", "value": lock._uuid}
            ],
            "success": [
                {
                    "request_put": {
                        "key": lock._key_b64,
                        "value": lock._uuid,
                        "lease": lock._lease.id,
                    }
                }
            ],
            "failure": [],
        }
        result = client.transaction(txn)
        if not result.get("succeeded", False):
            return None
        return int(result["header"]["revision"])

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """A record key on the lock's lease, naming the lock's token and the member id.

        Written in a transaction that checks the lock key still holds our token; on the
        lease, the record goes when the lock's lease ends (expiry or release).
        """
        record = base64.b64encode(base64.b64decode(lock._uuid) + member_id.encode())
        txn = {
            "compare": [
                {"key": lock._key_b64, "result": "EQUAL", "target": "VALUE", "value": lock._uuid}
            ],
            "success": [
                {
                    "request_put": {
                        "key": base64.b64encode(_leader_key(lock)).decode("ascii"),
                        "value": record.decode("ascii"),
                        "lease": lock._lease.id,
                    }
                }
            ],
            "failure": [],
        }
        self.tooz.client.transaction(txn)  # type: ignore[attr-defined]

    def read_leader(self, key: str) -> str | None:
        """The record, if the lock key holds the token it names."""
        lock = self.get_lock(key)
        client = self.tooz.client  # type: ignore[attr-defined]
        records = client.get(_leader_key(lock))
        values = client.get(lock._key)
        if not records or not values:
            return None
        record = bytes(records[0])  # the lock's 16-byte token, then the member id
        token, member_id = record[:_TOKEN_BYTES], record[_TOKEN_BYTES:]
        return member_id.decode("utf-8", "replace") if token == values[0] else None

    def arm_release_watch(self, lock: Any, fire: Callable[..., object]) -> bool:
        """A watch on the lock key's deletion, from the revision after the one read.

        Reading first, then watching from that revision on, means a release between the
        two is replayed, never missed. Each watch is a stream with a thread of its own:
        one per waiting name, stopped when the waiter stops waiting; at most
        ``watch_limit`` per coordinator.
        """
        from etcd3gw import watch

        with self._watchers_guard:
            previous = self._watchers.get(id(lock))
            if previous is None and len(self._watchers) >= self.watch_limit:
                return False  # no watch: this waiter polls
            self._watchers[id(lock)] = None  # the slot is ours until the watch runs
        watcher = None
        try:
            client = self.tooz.client  # type: ignore[attr-defined]
            values = client.get(lock._key, metadata=True)
            if not values:
                return True
            revision = int(values[0][1]["mod_revision"]) + 1

            def on_event(_event: Any) -> None:
                fire()

            watcher = watch.Watcher(
                client, lock._key, on_event, start_revision=revision, filters=["NOPUT"]
            )
        finally:
            with self._watchers_guard:
                if watcher is None:
                    self._watchers.pop(id(lock), None)
                else:
                    self._watchers[id(lock)] = watcher
            if previous is not None:
                previous.stop()
        return False

    @property
    def release_watchers(self) -> int:
        return len(self._watchers)

    def disarm_release_watch(self, lock: Any) -> None:
        with self._watchers_guard:
            watcher = self._watchers.pop(id(lock), None)
        if watcher is not None:
            watcher.stop()

    def stop(self) -> None:
        with self._watchers_guard:
            watchers, self._watchers = list(self._watchers.values()), {}
        for watcher in watchers:
            if watcher is not None:
                watcher.stop()  # their threads would otherwise hold up interpreter exit
        super().stop()


#: tooz's lock token: a UUID's 16 bytes.
_TOKEN_BYTES = 16


def _leader_key(lock: Any) -> bytes:
    """The key of a lock's leader record (the lock key with a suffix no lock key has)."""
    return bytes(lock._key) + b"~leader"
