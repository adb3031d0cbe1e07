"""The etcd backend (tooz's etcd3gw driver, over etcd's HTTP gateway)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Mapping
from typing import Any

from ._base import Capability, Driver, client_timeout_options

__all__ = ["EtcdDriver"]


class EtcdDriver(Driver):
    """etcd locks: a key with a lease of ``lock_timeout`` seconds, refreshed each beat.

    tooz leaks leases (one per try, and one per release) and cannot tell a lock's owner;
    this driver revokes what it leaves and reads the key to tell.
    """

    extra = "etcd"
    capabilities = frozenset({Capability.EXPIRES, Capability.KNOWS_OWNER, Capability.FENCES})

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
        """Whether the lock's key still holds this lock's token, read from etcd.

        tooz cannot tell (``is_still_owner`` is not implemented) and its heartbeat
        ignores a lease that is gone, so a key deleted or a lease revoked from outside
        would go unnoticed.
        """
        values = self.tooz.client.get(lock._key)  # type: ignore[attr-defined]
        return bool(values) and values[0] == base64.b64decode(lock._uuid)

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
