"""Leadership: exactly one process of many leads a name, on a fenced lock.

A term is a grant of the lock named ``LEADERSHIP_NAMESPACE + name``, taken with a
fencing token, so losing the lock ends the term the way it ends any ``async with lock:``
body (cancelled, then [`LeadershipLost`][aiotooz.LeadershipLost]), and every new term has a larger
token than the last. The leader also publishes its member id through the driver
(``Capability.NAMES_LEADER``), tied to the lock so that `read_leader()` never names
a process whose term has ended.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, final

import anyio

from ._exceptions import (
    BackendUnavailable,
    LeadershipLost,
    LockAcquireFailed,
    LockCreationFailed,
    LockLost,
)
from ._lock import Blocking, Lock, check_blocking, held_handle
from ._logging import get_logger
from ._names import check_name

if TYPE_CHECKING:  # the coordinator module imports this one, never the reverse
    from ._coordinator import Coordinator

__all__ = ["LEADERSHIP_NAMESPACE", "Leadership", "Term", "read_leader", "run_as_leader"]

#: Lock names that start with this are reserved for leadership: ``leadership("x")``
#: holds the lock named ``"aiotooz.leader.x"``.
LEADERSHIP_NAMESPACE = "aiotooz.leader."

#: ``run_as_leader`` pauses this long (seconds, drawn at random) before it campaigns
#: again, so that replicas that lost together do not all ask at once.
_PAUSE = (0.05, 0.5)


@final
@dataclass(frozen=True)
class Term:
    """One term of leadership: who leads ``name``, since when, with which token."""

    #: The leadership's name.
    name: str
    #: The leader's member id (its coordinator's ``member_id``).
    member_id: str
    #: Larger than every earlier term's of this name (see the fencing docs).
    fencing_token: int
    #: When the term began, in seconds since 1970 (``time.time()``).
    started_at: float


@final
class Leadership:
    """Lead ``name`` for the length of a block: ``async with Leadership("scheduler") as term:``.

    Built like [`Lock`][aiotooz.Lock] and [`Semaphore`][aiotooz.Semaphore]: without
    ``coordinator`` it uses the default coordinator at the moment the block is entered
    (``coordinator.leadership(name)`` makes one for that coordinator). Entering waits
    until this process leads (as ``blocking`` allows, as for locks) and gives the
    [`Term`][aiotooz.Term]. If leadership is lost while leading, the body is cancelled
    and [`LeadershipLost`][aiotooz.LeadershipLost] raised out of the block. One object
    is one block: make a new one for each term (as ``run_as_leader`` does).

    Args:
        name: the leadership's name; processes lead it together when their
            coordinators share the backend and the prefix.
        coordinator: the coordinator to lead through; ``None`` for the default one.
        blocking: ``True`` waits as long as it takes, ``False`` tries once, a number
            waits at most that many seconds (then ``LockAcquireFailed``).

    Raises:
        LockNameError: ``name`` is not a non-empty ``str``.
        ConfigurationError: ``blocking`` is not a bool or a number >= 0.
    """

    __slots__ = ("_blocking", "_lock", "led", "lost", "name", "term")

    def __init__(
        self, name: str, *, coordinator: Coordinator | None = None, blocking: Blocking = True
    ) -> None:
        self.name: str = check_name(name)
        self._blocking = check_blocking(blocking)
        self._lock = Lock(LEADERSHIP_NAMESPACE + name, coordinator=coordinator, fencing=True)
        #: The term while this block leads; ``None`` before and after.
        self.term: Term | None = None
        #: This block has led (entering succeeded): errors from now on are the body's.
        self.led: bool = False
        #: This block's term was lost (it raised [`LeadershipLost`][aiotooz.LeadershipLost]).
        self.lost: bool = False

    def __repr__(self) -> str:
        state = "leading" if self.term is not None else "not leading"
        return f"<aiotooz.Leadership {self.name!r} {state}>"

    async def __aenter__(self) -> Term:
        try:
            await self._lock(self._blocking).__aenter__()
        except LockAcquireFailed as exc:
            raise LockAcquireFailed(f"leadership {self.name!r}: {exc}") from exc
        coordinator = self._lock.coordinator  # the default one, resolved as it was entered
        try:
            token = self._lock.fencing_token
            await coordinator._lock_table.publish_leader(
                held_handle(self._lock), coordinator.member_id, token
            )
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self.term = Term(self.name, coordinator.member_id, token, time.time())
        self.led = True
        return self.term

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.term = None
        try:
            await self._lock.__aexit__(exc_type, exc, tb)
        except LockLost as lost:  # only ever this block's own lock (see aiotooz._lock)
            self.lost = True
            raise LeadershipLost(
                f"leadership {self.name!r} was lost while leading: {lost.reason}",
                lock_name=self.name,
                reason=lost.reason,
            ) from lost


async def read_leader(coordinator: Coordinator, name: str) -> str | None:
    """The member id leading ``name`` now (see ``Coordinator.leader``)."""
    name = check_name(name)
    if not coordinator.is_started:
        raise LockCreationFailed(
            f"{coordinator!r} is not started: start it before asking who leads {name!r}"
        )
    coordinator.check_loop()
    return await coordinator._lock_table.read_leader(LEADERSHIP_NAMESPACE + name)


async def run_as_leader(
    coordinator: Coordinator, name: str, job: Callable[[], Awaitable[object]]
) -> None:
    """Campaign, run ``job`` in each term, forever (see ``Coordinator.run_as_leader``)."""
    name = check_name(name)
    if not callable(job):
        # Refused before campaigning: it would fail only once its term came.
        raise TypeError(
            f"run_as_leader({name!r}, job): job must be a callable returning an awaitable "
            f"(an 'async def' function), not {type(job).__name__}: {job!r}"
        )
    log = get_logger(agent_id=coordinator.agent_id, leadership=name)
    while True:
        campaign = Leadership(name, coordinator=coordinator)
        try:
            async with campaign as term:
                log.info("leading", fencing_token=term.fencing_token)
                await job()
            log.info("job returned; stepping down")
        except LeadershipLost as exc:
            if not campaign.lost:
                raise  # the job's own (a leadership of its own, say)
            if not coordinator.is_started:
                continue  # stopped: the next campaign says so (LockCreationFailed)
            log.warning("leadership lost; campaigning again", reason=exc.reason)
        except BackendUnavailable as exc:
            if campaign.led or campaign.lost or not coordinator.is_started:
                raise  # the job's own, or the coordinator stopped
            log.warning("campaign failed; campaigning again", error=str(exc))
        await anyio.sleep(random.uniform(*_PAUSE))
