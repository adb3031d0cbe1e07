"""Who holds a lock, and breaking one: `holder()`, `holders()` and `break_lock()`.

The driver reads the holder record that each grant writes with it (or that the server
keeps, on the SQL backends), tied to the lock like the leader record, so that an ended
hold is never named. Keys are mapped back to lock names here: a plain key is the
coordinator's prefix and the name; a mapped one (``stem~digest``, see ``_names``) cannot
be reversed and is shown as it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from ._drivers import HolderRecord
from ._exceptions import BackendUnavailable, LockCreationFailed
from ._logging import get_logger
from ._names import backend_key, check_name, split_rw_key
from ._telemetry import instruments

if TYPE_CHECKING:  # the coordinator module imports this one, never the reverse
    from ._connection import Connection
    from ._coordinator import Coordinator

__all__ = ["Holder", "break_lock", "list_holders", "read_holder"]


@final
@dataclass(frozen=True)
class Holder:
    """Who holds a lock now, from `Coordinator.holder()` or `Coordinator.holders()`.

    A field the backend cannot know is ``None`` (see the operations docs' table).
    """

    #: The lock's name (for a name mapped to a hashed key, the key as the backend has it).
    name: str
    #: The holder's member id (its coordinator's ``member_id``); ``None`` for a plain
    #: tooz process, or where the backend keeps none.
    member_id: str | None
    #: The holding process's id, on ``host``.
    pid: int | None
    #: The holding process's host name (the client address on PostgreSQL and MySQL).
    host: str | None
    #: When the lock was granted, in seconds since 1970 (``time.time()``).
    since: float | None
    #: The holder's fencing token, if it took one.
    fencing_token: int | None
    #: How many other processes wait for the lock, where the backend can tell.
    waiters: int | None


def _connection(coordinator: Coordinator, doing: str) -> Connection:
    if not coordinator.is_started:
        raise LockCreationFailed(f"{coordinator!r} is not started: start it before {doing}")
    coordinator.check_loop()
    connection = coordinator._lock_table.connection
    if connection is None:
        raise BackendUnavailable(f"cannot finish {doing}: the coordinator is reconnecting")
    return connection


def _holder(name: str, record: HolderRecord) -> Holder:
    return Holder(
        name,
        record.member_id,
        record.pid,
        record.host,
        record.since,
        record.fencing_token,
        record.waiters,
    )


async def read_holder(coordinator: Coordinator, name: str) -> Holder | None:
    """Who holds ``name`` now (see ``Coordinator.holder``)."""
    name = check_name(name)
    connection = _connection(coordinator, f"asking who holds {name!r}")
    key = backend_key(coordinator.prefix, name, connection.reserved_keys)
    record = await connection.read_holder(key)
    return None if record is None else _holder(name, record)


async def list_holders(coordinator: Coordinator, prefix: str) -> AsyncIterator[Holder]:
    """The holders of the names held under ``prefix`` (see ``Coordinator.holders``)."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, not {type(prefix).__name__}: {prefix!r}")
    connection = _connection(coordinator, "listing held locks")
    records = await connection.list_holders(coordinator.prefix + prefix)
    for record in sorted(records, key=lambda record: record.key):
        if split_rw_key(record.key) is not None:
            continue  # a read-write lock's: not listed (see the operations docs)
        yield _holder(record.key[len(coordinator.prefix) :], record)


async def break_lock(coordinator: Coordinator, name: str) -> bool:
    """Free ``name`` whoever holds it (see ``Coordinator.break_lock``)."""
    name = check_name(name)
    connection = _connection(coordinator, f"breaking {name!r}")
    key = backend_key(coordinator.prefix, name, connection.reserved_keys)
    broken = await connection.break_lock(key, name)
    if broken is None:
        return False
    instruments.breaks.add(1, {"aiotooz.backend": connection.scheme})
    get_logger(agent_id=coordinator.agent_id).warning(
        "lock broken",
        lock=name,
        holder=broken.member_id,
        holder_pid=broken.pid,
        holder_host=broken.host,
    )
    return True
