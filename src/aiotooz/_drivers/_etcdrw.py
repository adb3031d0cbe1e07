"""Read-write locks on etcd: contender keys ordered by their create revision (etcd's recipe).

A reader or writer puts a key under the lock's prefix, on the coordinator's lease,
``<prefix>read/<token>`` or ``<prefix>write/<token>``. A writer holds the lock while no
key under the prefix has a lower create revision; a reader while no ``write/`` key
does. A writer's key, once put, holds back every reader that comes after it: writer
preference is the order itself.

A try that fails deletes its key, unless its waiter waits (the driver armed a watch for
it): then the key stays, keeping its place, until the waiter is granted or gives up
(``disarm``, which deletes it from a thread of its own). Keys are on the coordinator's
lease: they go with it, and every grant with them (the beat sees it, as for locks).
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Callable
from typing import Any, Final, Literal, final

__all__ = ["RW_PREFIX", "EtcdRW", "EtcdRWLock"]

#: Where read-write locks' contender keys live (no lock key starts with it).
RW_PREFIX: Final = b"/tooz/rwlocks/"
_READ = b"read/"
_WRITE = b"write/"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _range_end(prefix: bytes) -> bytes:
    """The end of the range of keys starting with ``prefix`` (etcd's ``WithPrefix``)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


@final
class EtcdRWLock:
    """One reader's or writer's key of a read-write lock.

    ``key``, ``key_b64``, ``token`` and ``lease`` are those of a held lock key (so the
    driver's release, beat and fencing take it as they take a lock); ``key`` is set
    while a contender key exists for this object.
    """

    __slots__ = ("key", "key_b64", "lease", "name", "prefix", "token", "write")

    def __init__(self, family: str, name: str, write: bool) -> None:
        self.prefix = RW_PREFIX + family.encode("ascii") + b"/"
        #: The aiotooz key this object is for (a waiter's kept key is found by it).
        self.name = name
        self.write = write
        self.key: bytes = b""
        self.key_b64 = ""
        self.token: bytes | None = None
        self.lease: int | None = None

    def take(self, key: bytes, token: bytes, lease: int) -> None:
        self.key, self.key_b64, self.token, self.lease = key, _b64(key), token, lease


@final
class EtcdRW:
    """The read-write locks of one etcd driver: tries, waits and give-ups.

    Args:
        client: returns the etcd3gw client.
        lease: returns the coordinator's lease (granting one if needed).
        drop_lease: forgets a lease etcd no longer knows (the next ``lease()`` grants one).
    """

    def __init__(
        self,
        client: Callable[[], Any],
        lease: Callable[[], int],
        drop_lease: Callable[[int], None],
    ) -> None:
        self._client = client
        self._lease = lease
        self._drop_lease = drop_lease
        self._guard = threading.Lock()
        #: Keys kept for waiters that wait (armed), by aiotooz key: (key, token, lease).
        self._waiting: dict[str, tuple[bytes, bytes, int]] = {}

    def _put(self, lock: EtcdRWLock) -> tuple[bytes, bytes, int]:
        """A new contender key on the coordinator's lease (a new lease if etcd lost it)."""
        token = uuid.uuid4().bytes
        key = lock.prefix + (_WRITE if lock.write else _READ) + token.hex().encode()
        client = self._client()
        for attempt in range(2):
            lease = self._lease()
            body = {"key": _b64(key), "value": _b64(token), "lease": lease}
            try:
                client.post(client.get_url("/kv/put"), json=body)
            except Exception as exc:
                if attempt or "lease not found" not in str(exc):
                    raise
                self._drop_lease(lease)
                continue
            break
        return key, token, lease

    def _contenders(self, lock: EtcdRWLock) -> list[tuple[int, bytes, int]]:
        """``(create revision, key, mod revision)`` of every contender, oldest first."""
        client = self._client()
        url = client.get_url("/kv/range")
        answer = client.post(
            url, json={"key": _b64(lock.prefix), "range_end": _b64(_range_end(lock.prefix))}
        )
        found = [
            (
                int(kv["create_revision"]),
                base64.b64decode(kv["key"]),
                int(kv["mod_revision"]),
            )
            for kv in answer.get("kvs", ())
        ]
        return sorted(found)

    def _blocker(self, lock: EtcdRWLock, key: bytes) -> tuple[bytes, int] | Literal[False] | None:
        """The contender ``key`` waits for: its key and mod revision.

        ``None`` if none blocks it; ``False`` if ``key`` is gone (its lease ended).
        """
        contenders = self._contenders(lock)
        keys = [found for _, found, _ in contenders]
        if key not in keys:
            return False
        before = contenders[: keys.index(key)]
        if not lock.write:
            write = lock.prefix + _WRITE
            before = [c for c in before if c[1].startswith(write)]
        return (before[-1][1], before[-1][2]) if before else None

    def try_acquire(self, lock: EtcdRWLock) -> bool:
        """One try: our key (put now, or kept for the waiter) is let in, or not."""
        with self._guard:
            kept = self._waiting.get(lock.name)
        made = kept is None
        key, token, lease = self._put(lock) if kept is None else kept
        # Set before asking: a caller that gives up has the release run with it.
        lock.take(key, token, lease)
        blocker = self._blocker(lock, key)
        if blocker is None:
            with self._guard:
                if self._waiting.get(lock.name) == (key, token, lease):
                    del self._waiting[lock.name]
            return True
        lock.token = lock.lease = None
        if blocker is False:  # our kept key is gone (the lease ended): put anew next time
            with self._guard:
                self._waiting.pop(lock.name, None)
        elif made:  # a try alone keeps no place: only a waiter does (arm)
            self._client().delete(key)
        return False

    def arm(self, lock: EtcdRWLock) -> tuple[bytes, int] | None:
        """Queue (keep a key for the waiter); what to watch, or ``None``.

        What to watch: the blocker's key and mod revision. ``None``: nothing blocks it
        now (try again at once).
        """
        with self._guard:
            kept = self._waiting.get(lock.name)
        if kept is None:
            kept = self._put(lock)
            with self._guard:
                self._waiting[lock.name] = kept
        blocker = self._blocker(lock, kept[0])
        if blocker is False:
            with self._guard:
                self._waiting.pop(lock.name, None)
            return None
        return blocker

    def give_up(self, lock: EtcdRWLock) -> None:
        """The waiter stops waiting: delete its kept key, in a thread (called on the loop)."""
        with self._guard:
            kept = self._waiting.pop(lock.name, None)
        if kept is not None:
            name = "aiotooz-etcd-rw-give-up"
            threading.Thread(target=self._delete, args=(kept[0],), name=name, daemon=True).start()

    def _delete(self, key: bytes) -> None:
        try:
            self._client().delete(key)
        except Exception:
            pass  # the key goes with the lease, if not now
