"""The memcached backend."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

from .._exceptions import ConfigurationError
from . import _options
from ._base import Capability, Driver, HolderRecord, client_timeout_options, clock_floor

__all__ = ["MemcachedDriver"]

#: Commands of one beat sent in one write (its answers are read before the next write),
#: so that neither side's socket buffer has to hold a whole beat of 10,000 locks.
_BEAT_BATCH: Final = 1000

#: memcached expires items in whole seconds, by a clock that ticks once a second: an item
#: stored with ``expire=N`` can vanish as early as ``N - 1`` seconds later.
_EARLY_EXPIRY = 1.0


class MemcachedDriver(Driver):
    """memcached locks: an item that expires after ``lock_timeout`` seconds.

    The item is touched each beat, and owned by the coordinator's member id. tooz's
    heartbeat touches one lock per round trip (and aiotooz then read each back to check
    its owner): here one beat is a pipeline of meta-get commands that read and touch
    every held item together, a round trip per thousand locks.
    """

    extra = "memcached"
    accepted_options = _options.MEMCACHED
    capabilities = frozenset(
        {
            Capability.EXPIRES,
            Capability.KNOWS_OWNER,
            Capability.FENCES,
            Capability.NAMES_LEADER,
            Capability.NAMES_HOLDERS,
        }
    )
    break_refusal: ClassVar[str] = (
        "memcached keeps no fencing counter a break could move past the holder's token "
        "(nor tells the holder); wait for the holder to release the lock, or stop it: the "
        "lock then expires within its lock_timeout"
    )

    @classmethod
    def options(cls, query: Mapping[str, list[str]]) -> dict[str, str]:
        """A bounded client timeout, so that a dead or hung server is noticed in seconds."""
        return client_timeout_options(query)

    @property
    def lock_ttl(self) -> float:
        """The lock timeout less the second memcached may expire it early by."""
        return float(self.tooz.lock_timeout) - _EARLY_EXPIRY  # type: ignore[attr-defined]

    def configure(self) -> None:
        if self.lock_ttl < 1:
            raise ConfigurationError(
                f"lock_timeout={self.tooz.lock_timeout} is too short: memcached "  # type: ignore[attr-defined]
                "expires locks in whole seconds and up to 1 s early, so a lock must live at "
                "least 2 s (and then only 1 s is guaranteed); use lock_timeout=3 or more"
            )

    def stop(self) -> None:
        """Stop, and close the client's pooled sockets whatever happened before.

        tooz's own stop closes its client last, after calls that raise when the server
        is gone or hung (a release, the member's delete): the sockets were then left to
        the garbage collector.
        """
        try:
            super().stop()
        finally:
            with contextlib.suppress(Exception):
                self.tooz.client.close()  # type: ignore[attr-defined]

    def heartbeat(self) -> None:
        self.beat(())

    def beat(self, locks: Sequence[Any]) -> list[bool | None]:
        """Touch every held lock's item and read its owner back, pipelined.

        tooz's membership item is written first, as its heartbeat does. Each item is read
        and given its TTL again in one meta-get (``mg <key> v k T<ttl> q``; an item
        that is gone answers nothing). An item that holds another member's id is
        touched too, once: it is no longer ours, which this beat reports, and the next
        one leaves it alone.
        """
        tooz = self.tooz
        client = tooz.client  # type: ignore[attr-defined]
        client.set(
            tooz._encode_member_id(tooz._member_id),  # type: ignore[attr-defined]
            tooz.STILL_ALIVE,  # type: ignore[attr-defined]
            expire=tooz.membership_timeout,  # type: ignore[attr-defined]
        )
        held = {lock.name: lock for lock in list(tooz._acquired_locks)}  # type: ignore[attr-defined]
        held.update((lock.name, lock) for lock in locks if lock is not None)
        ttl = int(tooz.lock_timeout)  # type: ignore[attr-defined]
        names = list(held)
        owners: dict[bytes, bytes] = {}
        with client.client_pool.get_and_release(destroy_on_fail=True) as connection:
            for at in range(0, len(names), _BEAT_BATCH):
                batch = names[at : at + _BEAT_BATCH]
                owners.update(_meta_get_and_touch(connection, batch, ttl))
        member = tooz._member_id
        acquired = {id(lock) for lock in list(tooz._acquired_locks)}  # type: ignore[attr-defined]
        return [
            None if lock is None or id(lock) not in acquired else owners.get(lock.name) == member
            for lock in locks
        ]

    def fencing_token(self, lock: Any) -> int | None:
        """From a counter item beside the lock's, bumped after checking the lock is ours.

        memcached has no script to do both at once; the lease rule covers the gap (a
        token fetched later than 3/4 of the TTL after the grant is not used). The counter
        never expires but can be evicted or lost with a restart: it then restarts from
        the clock (microseconds), never below a token handed out before.
        """
        client = self.tooz.client  # type: ignore[attr-defined]
        if client.get(lock.name) != self.tooz._member_id:
            return None
        fence_key = lock.name + b"_fence"
        while True:
            value, cas = client.gets(fence_key)
            token = max(int(value or 0) + 1, clock_floor())
            if value is None:
                if client.add(fence_key, str(token).encode(), expire=0, noreply=False):
                    return token
            elif client.cas(fence_key, str(token).encode(), cas, expire=0, noreply=False):
                return token

    def read_holder(self, key: str) -> HolderRecord | None:
        """The lock item's value: tooz stores the holder's member id in it (and no more)."""
        lock = self.get_lock(key)
        value = self.tooz.client.get(lock.name)  # type: ignore[attr-defined]
        if value is None:
            return None
        return HolderRecord(key, member_id=bytes(value).decode("utf-8", "replace"))


def _meta_get_and_touch(connection: Any, keys: list[bytes], ttl: int) -> dict[bytes, bytes]:
    """Send one meta-get per key (value, key, new TTL; quiet on a miss), and read them.

    ``connection`` is a pymemcache ``Client`` of the pool. Its socket is used directly:
    pymemcache has no pipeline and no meta commands. Returns the value of each key found.
    """
    import pymemcache.exceptions

    if not keys:
        return {}
    if connection.sock is None:
        connection._connect()
    sock = connection.sock
    try:
        sock.sendall(b"".join(b"mg %s v k T%d q\r\n" % (key, ttl) for key in keys) + b"mn\r\n")
        buffer = bytearray()
        found: dict[bytes, bytes] = {}
        at = 0
        while True:
            end = buffer.find(b"\r\n", at)
            if end < 0:
                chunk = sock.recv(65536)
                if not chunk:
                    raise pymemcache.exceptions.MemcacheUnexpectedCloseError()
                buffer += chunk
                continue
            line = bytes(buffer[at:end])
            if line == b"MN":
                return found
            words = line.split()
            if words[:1] != [b"VA"]:
                raise pymemcache.exceptions.MemcacheUnknownError(
                    f"unexpected answer to a meta get: {line[:80]!r}"
                )
            size = int(words[1])
            if len(buffer) < end + 2 + size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    raise pymemcache.exceptions.MemcacheUnexpectedCloseError()
                buffer += chunk
                continue
            key = next(word[1:] for word in words[2:] if word.startswith(b"k"))
            found[key] = bytes(buffer[end + 2 : end + 2 + size])
            at = end + 2 + size + 2
    except Exception:
        connection.close()  # the stream is out of step: never reuse it
        raise
