"""The memcached backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._exceptions import ConfigurationError
from . import _options
from ._base import Capability, Driver, client_timeout_options, clock_floor

__all__ = ["MemcachedDriver"]

#: memcached expires items in whole seconds, by a clock that ticks once a second: an item
#: stored with ``expire=N`` can vanish as early as ``N - 1`` seconds later.
_EARLY_EXPIRY = 1.0


class MemcachedDriver(Driver):
    """memcached locks: an item that expires after ``lock_timeout`` seconds.

    The item is touched each beat, and owned by the coordinator's member id.
    """

    extra = "memcached"
    accepted_options = _options.MEMCACHED
    capabilities = frozenset(
        {Capability.EXPIRES, Capability.KNOWS_OWNER, Capability.FENCES, Capability.NAMES_LEADER}
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

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """Nothing to write: the lock's item already holds its owner's member id."""

    def read_leader(self, key: str) -> str | None:
        """The lock item's value: tooz stores the holder's member id in it."""
        lock = self.get_lock(key)
        value = self.tooz.client.get(lock.name)  # type: ignore[attr-defined]
        return None if value is None else bytes(value).decode("utf-8", "replace")
