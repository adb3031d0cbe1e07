"""memcached: whole-second expiry. An item stored for N seconds can go after N - 1, so the
lease rule counts from the earliest expiry, and TTLs it cannot honour are refused."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from aiotooz import ConfigurationError, Lock

from ..support.helpers import ServerPool, make_coordinator, url_for


async def test_memcached_lease_rule_counts_from_the_earliest_expiry(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """memcached can expire an item stored for 2 s after only 1 s: a holder stalled 1.4 s
    after a refresh must read lost (the rule used 3/4 of 2 s and said not lost)."""
    url = url_for("memcached", server_pool, tmp_path) + "?lock_timeout=2"
    async with make_coordinator(url, prefix, heartbeat=0.2) as coordinator:
        lock = Lock("coarse", coordinator=coordinator, cancel_on_loss=False)
        async with lock:
            await anyio.sleep(0.5)  # a few beats
            time.sleep(1.4)  # noqa: ASYNC251 - the event loop stalls: no beat can run
            assert lock.check_lost()


@pytest.mark.parametrize(
    ("options", "settings", "match"),
    [
        ("lock_timeout=1", {}, "too short"),
        ("lock_timeout=2", {}, r"heartbeat \(1.0 s\) must be under half .* \(1 s\)"),
    ],
)
async def test_memcached_ttls_it_cannot_honour_are_refused(
    server_pool: ServerPool,
    tmp_path: Path,
    prefix: str,
    options: str,
    settings: dict[str, float],
    match: str,
) -> None:
    url = url_for("memcached", server_pool, tmp_path) + "?" + options
    with pytest.raises(ConfigurationError, match=match):
        async with make_coordinator(url, prefix, **settings):
            pass  # pragma: no cover
