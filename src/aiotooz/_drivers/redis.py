"""The Redis backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ._base import Capability, Driver

__all__ = ["RedisDriver"]


class RedisDriver(Driver):
    """Redis locks: a key with a TTL of ``lock_timeout`` seconds, refreshed each beat."""

    extra = "redis"
    capabilities = frozenset({Capability.EXPIRES, Capability.KNOWS_OWNER})
    #: Bounded socket waits, so that a dead or hung server is noticed in seconds.
    default_options: ClassVar[Mapping[str, str]] = {
        "socket_timeout": "2",
        "socket_connect_timeout": "2",
    }

    @property
    def lock_ttl(self) -> float:
        return float(self.tooz.lock_timeout)  # type: ignore[attr-defined]

    def configure(self) -> None:
        """Bound how long a dead Redis takes to notice; tooz has no option for it.

        redis-py retries a failed command 10 times with backoff, and tooz retries that
        15 times: a dead Redis surfaced only after about a minute, on heartbeats and on
        connects alike. tooz's own quick retries still ride over a stale pooled
        connection, so the client's retries are dropped, from the moment the driver
        makes its client.
        """
        import redis.backoff
        import redis.retry

        make_client = self.tooz._make_client  # type: ignore[attr-defined]

        def make_client_without_retries(*args: Any, **kwargs: Any) -> Any:
            client = make_client(*args, **kwargs)
            client.set_retry(redis.retry.Retry(redis.backoff.NoBackoff(), 0))
            return client

        self.tooz._make_client = make_client_without_retries  # type: ignore[attr-defined]
