"""The etcd backend: tooz's etcd3gw coordinator, with locks of this driver's own.

tooz's etcd3gw lock grants a lease per try (three HTTP calls and a lease grant each) and
keeps a lease per held lock, refreshed one HTTP call at a time: a coordinator holding a
few thousand locks spent its whole heartbeat refreshing them, and lost them all. Here,
as in etcd's own ``concurrency.Session``, one lease per coordinator carries every lock
key; a try is one transaction, the heartbeat keeps the one lease alive and reads back the
keys on it, whatever is held. The key layout and values are tooz's (``/tooz/locks`` +
name, a 16-byte token), so plain tooz processes and aiotooz exclude each other. A URL
may list several endpoints; the client then moves to another member when its own fails
(``_endpoints``).
"""

from __future__ import annotations

import base64
import contextlib
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

from .._names import split_rw_key
from . import _options
from ._base import (
    Capability,
    Driver,
    HolderRecord,
    client_timeout_options,
    holder_stamp,
    read_stamp,
)
from ._endpoints import endpoints_of, fail_over_between, sent_again_after_a_timeout
from ._etcdrw import EtcdRW, EtcdRWLock

__all__ = ["EtcdDriver"]

#: Where tooz's etcd3gw driver keeps lock keys (``Etcd3Lock.LOCK_PREFIX``): the key of
#: lock ``name`` is this and the name, with nothing between.
_LOCK_PREFIX: Final = b"/tooz/locks"


def _b64(data: bytes) -> str:
    """How the HTTP gateway takes keys and values."""
    return base64.b64encode(data).decode("ascii")


class _EtcdLock:
    """One lock key as this driver tries and holds it.

    ``token`` is the value the grant wrote (a fresh one per grant, as tooz's value: 16
    random bytes) and ``lease`` the coordinator's lease it was written with; both are
    ``None`` while the key is not held through this object.
    """

    __slots__ = ("key", "key_b64", "lease", "token")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.key_b64 = _b64(key)
        self.token: bytes | None = None
        self.lease: int | None = None


def _value_is(key_b64: str, token: bytes) -> dict[str, Any]:
    """A transaction's comparison: the key (base64) holds ``token``."""
    return {"key": key_b64, "result": "EQUAL", "target": "VALUE", "value": _b64(token)}


class EtcdDriver(Driver):
    """etcd locks: a key on the coordinator's lease of ``lock_timeout`` seconds.

    A try is one transaction (the key is created on the lease if it does not exist); a
    release deletes the key if it still holds the grant's token; a beat keeps the lease
    alive and asks etcd which keys are on it (two calls, whatever is held). A lease that
    expired or was revoked takes every key on it, and every holder is told; the next try
    grants a new one.
    """

    extra = "etcd"
    accepted_options = _options.ETCD
    capabilities = frozenset(
        {
            Capability.EXPIRES,
            Capability.KNOWS_OWNER,
            Capability.FENCES,
            Capability.ARMS_WATCHES,
            Capability.NAMES_LEADER,
            Capability.NAMES_HOLDERS,
            Capability.LISTS_HOLDERS,
            Capability.BREAKS_LOCKS,
            Capability.KEEPS_RECORDS,
            Capability.SHARES_LOCKS,
            Capability.SHARED_LEASE,
        }
    )
    _rw: EtcdRW | None = None

    #: Watches (streams and threads) a coordinator keeps at most; past that, waiters poll.
    watch_limit: ClassVar[int] = 16

    #: The URL's endpoints, in order (``etcd3+http://h1:2379,h2:2379``); the client
    #: moves to the next when its member fails (``_endpoints``).
    endpoints: tuple[tuple[str, int], ...] = ()

    def __init__(self, coordinator: Any, call_timeout: float) -> None:
        super().__init__(coordinator, call_timeout)
        #: Armed watches (a thread and an HTTP stream each), by lock object.
        self._watchers: dict[int, Any] = {}
        self._watchers_guard = threading.Lock()
        #: The coordinator's lease for lock keys; ``None`` until granted, and once found
        #: gone (the next try grants another).
        self._lease: int | None = None
        self._lease_guard = threading.Lock()
        #: Keys whose release failed, with the token they held (base64 both): still on
        #: our lease, which the beats keep alive, so nobody could take those locks while
        #: this coordinator lives. Each beat deletes them (if they still hold it).
        self._orphans: dict[str, bytes] = {}

    @classmethod
    def options(cls, query: Mapping[str, list[str]]) -> dict[str, str]:
        """A bounded client timeout, so that a dead or hung server is noticed in seconds."""
        return client_timeout_options(query)

    @classmethod
    def check_url(cls, parts: urllib.parse.SplitResult) -> None:
        """One endpoint or several, each ``host:port``, separated by commas; no path."""
        endpoints_of(parts)

    @classmethod
    def load(
        cls, url: str, member_id: str, options: Mapping[str, Any], call_timeout: float
    ) -> Driver:
        """The tooz coordinator, on the first endpoint; the client may move to the others."""
        parts = urllib.parse.urlsplit(url)
        endpoints = endpoints_of(parts)
        userinfo, at, _ = parts.netloc.rpartition("@")
        host, port = endpoints[0]
        first = f"{userinfo}{at}{f'[{host}]' if ':' in host else host}:{port}"
        single = urllib.parse.urlunsplit(parts._replace(netloc=first))
        driver = super().load(single, member_id, options, call_timeout)
        assert isinstance(driver, EtcdDriver)
        driver.endpoints = tuple(endpoints)
        return driver

    def configure(self) -> None:
        """With several endpoints, the client moves to the next when its member fails."""
        fail_over_between(self._client, list(self.endpoints))

    @property
    def lock_ttl(self) -> float:
        return float(self.tooz.lock_timeout)  # type: ignore[attr-defined]

    @property
    def _client(self) -> Any:
        return self.tooz.client  # type: ignore[attr-defined]

    def start(self) -> None:
        super().start()
        self._current_lease()

    def _current_lease(self) -> int:
        """The coordinator's lease, granted now if there is none."""
        with self._lease_guard:
            if self._lease is None:
                self._lease = int(self._client.lease(int(self.tooz.lock_timeout)).id)  # type: ignore[attr-defined]
            return self._lease

    def _drop_lease(self, lease: int) -> None:
        """``lease`` is gone at etcd: the next try grants another."""
        with self._lease_guard:
            if self._lease == lease:
                self._lease = None

    def get_lock(self, key: str) -> Any:
        rw = split_rw_key(key)
        if rw is not None:
            return EtcdRWLock(rw[0], key, rw[1])
        return _EtcdLock(_LOCK_PREFIX + key.encode("ascii"))

    def _rwlocks(self) -> EtcdRW:
        if self._rw is None:
            self._rw = EtcdRW(lambda: self._client, self._current_lease, self._drop_lease)
        return self._rw

    def try_acquire(self, lock: Any, key: str) -> bool:
        """One transaction: create the key on our lease unless it exists (tooz's check).

        A lease that etcd no longer knows (it expired) is replaced, and the try made once
        more with the new one.
        """
        if isinstance(lock, EtcdRWLock):
            return self._rwlocks().try_acquire(lock)
        for _ in range(2):
            lease = self._current_lease()
            # tooz's 16 random bytes, then the holder record (``NAMES_HOLDERS``): the
            # key's value is the record, written by the grant, gone with the key.
            member = self.tooz._member_id.decode("utf-8", "replace")
            token = uuid.uuid4().bytes + b" " + holder_stamp(member)
            # Set before the call: a caller that gives up on the try has the release run
            # with them, which deletes the key only if it holds this token.
            lock.token, lock.lease = token, lease
            txn = {
                "compare": [
                    {
                        "key": lock.key_b64,
                        "result": "EQUAL",
                        "target": "CREATE",
                        "create_revision": 0,
                    }
                ],
                "success": [
                    {"request_put": {"key": lock.key_b64, "value": _b64(token), "lease": lease}}
                ],
                # What the key holds if it exists: our own token if this try was
                # applied already (by a member that answered too late, before the
                # client moved to another one).
                "failure": [{"request_range": {"key": lock.key_b64}}],
            }
            try:
                result = self._client.transaction(txn)
            except Exception as exc:
                lock.token = lock.lease = None
                if "lease not found" not in str(exc):
                    raise
                self._drop_lease(lease)
                continue
            if result.get("succeeded", False) or _holds(result, token):
                return True
            lock.token = lock.lease = None
            return False
        return False

    def release(self, lock: Any) -> bool:
        """Delete the key if it still holds the grant's token."""
        token, lease, lock.token, lock.lease = lock.token, lock.lease, None, None
        if token is None:
            return False
        try:
            if self._delete_if(lock.key_b64, token):
                return True
            # The delete was sent again after a timeout: the first may have been applied.
            return sent_again_after_a_timeout(self._client) and self._deleted_by_us(
                lock, token, lease
            )
        except Exception:
            with self._lease_guard:
                self._orphans[lock.key_b64] = token
            raise

    def _deleted_by_us(self, lock: _EtcdLock, token: bytes, lease: int | None) -> bool:
        """Whether a delete sent again after a timeout found its key deleted by its first send.

        A call sent again to another member after a timeout may have been applied by the
        one that did not answer (its proposal committed late, or across a leader
        change): the send that answers then finds the key without our token, gone or
        already granted to the next holder. While our lease lives (a key on a lease
        ends with it) and no break marked the key, only that first send took it, or a
        delete from outside at that very moment, which this cannot tell apart (a beat
        before the release would have told that loss).
        """
        if lease is None:
            return False
        answer = self._client.post(self._client.get_url("/kv/lease/timetolive"), json={"ID": lease})
        if int(answer.get("TTL", -1)) <= 0:
            return False
        marks = self._client.get(_broken_key(lock))
        return not (marks and bytes(marks[0]) == token)

    def _delete_if(self, key_b64: str, token: bytes) -> bool:
        """Delete the key if it holds ``token``; whether it did."""
        txn = {
            "compare": [_value_is(key_b64, token)],
            "success": [{"request_delete_range": {"key": key_b64}}],
            "failure": [],
        }
        return bool(self._client.transaction(txn).get("succeeded", False))

    def _delete_orphans(self) -> None:
        """Delete the keys whose release failed (a lost lock's, say); the rest next beat."""
        with self._lease_guard:
            orphans = list(self._orphans.items())
        for key_b64, token in orphans:
            try:
                self._delete_if(key_b64, token)
            except Exception:
                continue  # the next beat tries again
            with self._lease_guard:
                if self._orphans.get(key_b64) == token:
                    del self._orphans[key_b64]

    def heartbeat(self) -> None:
        self.beat(())

    def beat(self, locks: Sequence[Any]) -> list[bool | None]:
        """Keep the lease alive, and read which keys are still on it: two calls in all.

        A key deleted from outside (or taken by another after that) is no longer on our
        lease; a lease revoked or expired has no keys left (and etcd answers its
        keepalive without a TTL, not with an error). tooz's own heartbeat runs first: it
        keeps its membership lease (our locks are not in its refresh list).
        """
        super().heartbeat()
        if self._orphans:
            self._delete_orphans()
        checked = self._lease
        alive = False
        on_lease: set[bytes] = set()
        if checked is not None:
            url = self._client.get_url("/lease/keepalive")
            answer = self._client.post(url, json={"ID": checked})
            if int(answer.get("result", {}).get("TTL", -1)) > 0:
                url = self._client.get_url("/kv/lease/timetolive")
                answer = self._client.post(url, json={"ID": checked, "keys": True})
                # A TTL of -1: revoked between the two calls.
                alive = int(answer.get("TTL", -1)) > 0
                on_lease = {base64.b64decode(key) for key in answer.get("keys", ())}
            if not alive:
                self._drop_lease(checked)
        # A lease granted during this beat (the checked one was found gone by a try) is
        # checked by the next beat; its locks are new, and the lease rule covers them.
        newer = self._lease if self._lease != checked else None
        return [_still_on(lock, checked if alive else None, on_lease, newer) for lock in locks]

    def still_owner(self, lock: Any) -> bool | None:
        """Whether the key holds this grant's token, on the lease the heartbeat keeps."""
        token = lock.token
        if token is None:
            return None  # released: not held here any more, and not lost either
        if lock.lease != self._lease:
            return False  # its lease is gone: the key went with it
        values = self._client.get(lock.key, metadata=True)
        if not values:
            return False
        value, meta = values[0]
        return bool(int(meta.get("lease", 0)) == lock.lease and bytes(value) == token)

    def fencing_token(self, lock: Any) -> int | None:
        """The revision etcd gives a write to the lock key.

        The key is written again (same value, same lease) in a transaction that first
        checks it still holds our token; the cluster-wide revision of that write is the
        token.
        """
        token, lease = lock.token, lock.lease
        if token is None:
            return None
        txn = {
            "compare": [_value_is(lock.key_b64, token)],
            "success": [
                {"request_put": {"key": lock.key_b64, "value": _b64(token), "lease": lease}}
            ],
            "failure": [],
        }
        result = self._client.transaction(txn)
        if not result.get("succeeded", False):
            return None
        return int(result["header"]["revision"])

    def read_holder(self, key: str) -> HolderRecord | None:
        """The lock key's value is the record; a write after the grant was its fence."""
        for value, meta in self._client.get(self.get_lock(key).key, metadata=True):
            return _holder(key, value, meta)
        return None

    def list_holders(self, key_prefix: str) -> list[HolderRecord]:
        """One range read of the lock keys under the prefix."""
        start = _LOCK_PREFIX + key_prefix.encode("ascii")
        holders = []
        for value, meta in self._client.get_prefix(start):
            key = bytes(meta["key"])  # decoded by etcd3gw
            name = key[len(_LOCK_PREFIX) :].decode("ascii", "replace")
            # Not records kept beside locks, nor read-write locks' contender keys.
            if not key.endswith(_NOT_LOCKS) and "~rw" not in name:
                holders.append(_holder(name, value, meta))
        return holders

    def break_lock(self, key: str) -> HolderRecord | None:
        """Delete the key if it holds the value read; a mark (that value) tells its holder.

        The delete moves etcd's revision, the fencing counter, past every token.
        """
        lock = self.get_lock(key)
        client = self._client
        for _ in range(3):
            values = client.get(lock.key, metadata=True)
            if not values:
                return None
            value, meta = values[0]
            txn = {
                "compare": [_value_is(lock.key_b64, bytes(value))],
                "success": [
                    {"request_put": {"key": _b64(_broken_key(lock)), "value": _b64(value)}},
                    {"request_delete_range": {"key": lock.key_b64}},
                ],
                "failure": [],
            }
            if client.transaction(txn).get("succeeded", False):
                return _holder(key, value, meta)
        return None  # taken and released again and again meanwhile: nobody to break now

    def was_broken(self, lock: Any) -> bool:
        marks = self._client.get(_broken_key(lock)) if lock.token is not None else []
        return bool(marks) and bytes(marks[0]) == lock.token

    def read_record(self, lock: Any) -> bytes | None:
        records = self._client.get(_record_key(lock))
        return bytes(records[0]).partition(b" ")[2] if records else None

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        """A key beside the lock's, on no lease, written in a transaction that checks the lock.

        The transaction also checks that the record is the one whose token was read
        (its ``mod_revision``; 0 while there is none).
        """
        lock_token = lock.token
        if lock_token is None:
            return False
        client = self._client
        stored = client.get(_record_key(lock), metadata=True)
        revision = 0
        if stored:
            value, meta = stored[0]
            if int(bytes(value).partition(b" ")[0] or 0) > token:
                return False
            revision = int(meta["mod_revision"])
        key = base64.b64encode(_record_key(lock)).decode("ascii")
        value = base64.b64encode(b"%d %s" % (token, record)).decode("ascii")
        txn = {
            "compare": [
                _value_is(lock.key_b64, lock_token),
                {"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": str(revision)},
            ],
            "success": [{"request_put": {"key": key, "value": value}}],
            "failure": [],
        }
        return bool(client.transaction(txn).get("succeeded", False))

    def arm_release_watch(self, lock: Any, fire: Callable[..., object]) -> bool:
        """A watch on the lock key's deletion, from the revision after the one read.

        Reading first, then watching from that revision on, means a release between the
        two is replayed, never missed. Each watch is a stream with a thread of its own:
        one per waiting name, stopped when the waiter stops waiting; at most
        ``watch_limit`` per coordinator.
        """
        from etcd3gw import watch

        watched: tuple[bytes, int] | None = None
        if isinstance(lock, EtcdRWLock):
            watched = self._rwlocks().arm(lock)
            if watched is None:
                return True  # nothing blocks it now: try again at once
        with self._watchers_guard:
            previous = self._watchers.get(id(lock))
            if previous is None and len(self._watchers) >= self.watch_limit:
                return False  # no watch: this waiter polls
            self._watchers[id(lock)] = None  # the slot is ours until the watch runs
        watcher = None
        try:
            client = self._client
            if watched is not None:  # a read-write waiter: the key it waits for
                key, revision = watched[0], watched[1] + 1
            else:
                values = client.get(lock.key, metadata=True)
                if not values:
                    return True
                key, revision = lock.key, int(values[0][1]["mod_revision"]) + 1

            def on_event(_event: Any) -> None:
                fire()

            watcher = watch.Watcher(
                client, key, on_event, start_revision=revision, filters=["NOPUT"]
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
        if isinstance(lock, EtcdRWLock) and self._rw is not None:
            self._rw.give_up(lock)  # its kept key, if any

    def stop(self) -> None:
        with self._watchers_guard:
            watchers, self._watchers = list(self._watchers.values()), {}
        for watcher in watchers:
            if watcher is not None:
                watcher.stop()  # their threads would otherwise hold up interpreter exit
        lease, self._lease = self._lease, None
        if lease is not None:
            # Whatever is still held goes at once, not a TTL later.
            with contextlib.suppress(Exception):
                self._client.post(self._client.get_url("/kv/lease/revoke"), json={"ID": lease})
        super().stop()


#: Keys under the lock prefix that are not locks (records; leader records of old).
_NOT_LOCKS = (b"~record", b"~leader")


def _broken_key(lock: _EtcdLock) -> bytes:
    """The mark a break leaves for the holder: outside the lock prefix, never a lock."""
    return b"/aiotooz/broken" + lock.key


def _holder(key: str, value: bytes, meta: Mapping[str, Any]) -> HolderRecord:
    """The record in a lock key's value, after tooz's token: a rewrite was a fence."""
    revision, created = int(meta.get("mod_revision", 0)), int(meta.get("create_revision", 0))
    token = revision if revision != created else None
    return read_stamp(key, bytes(value)[17:], fencing_token=token)


def _holds(result: Mapping[str, Any], token: bytes) -> bool:
    """Whether a failed try's transaction read the key holding ``token`` (ours)."""
    for response in result.get("responses", ()):
        for kv in response.get("response_range", {}).get("kvs", ()):
            if base64.b64decode(kv.get("value", "")) == token:
                return True
    return False


def _record_key(lock: _EtcdLock) -> bytes:
    """The key of the record kept beside a lock (another suffix no lock key has)."""
    return lock.key + b"~record"


def _still_on(
    lock: _EtcdLock | None, alive: int | None, on_lease: set[bytes], newer: int | None
) -> bool | None:
    """Whether a held ``lock``'s key is among the keys on our live lease ``alive``."""
    if lock is None or lock.token is None:
        return None  # not held through this object (released meanwhile)
    if newer is not None and lock.lease == newer:
        return None  # granted on a lease this beat did not check
    return alive is not None and lock.lease == alive and lock.key in on_lease
