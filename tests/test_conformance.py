"""One conformance suite over every tooz backend, each on a real (private) server.

Every test here runs on file, ipc, redis, redis+cluster, memcached, zookeeper, etcd3+http,
postgresql and mysql (see ``any_backend_url`` in conftest.py), or says in its parameters which
backends a property applies to. Where a backend cannot do something, the test checks
the typed error aiotooz raises instead; nothing is skipped on a backend quietly. One
backend's own quirks (its typed errors, leases, sessions) are in tests/drivers/.

The tests that take ``primitive`` run over backend x primitive: `Lock`, `Semaphore` (of
limit 1, so that it excludes) and `Leadership` exclude, forget a cancelled waiter, end
with stop() and are lost alike. The other tests are about locks.
"""

from __future__ import annotations

import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from aiotooz import (
    Coordinator,
    Leadership,
    LeadershipLost,
    Lock,
    LockAcquireFailed,
    LockCreationFailed,
    LockLost,
    Semaphore,
)
from aiotooz._leadership import LEADERSHIP_NAMESPACE
from aiotooz._names import backend_key, slot_key

from .support.helpers import (
    ALL_BACKENDS,
    HANDOFF_LATENCIES,
    HOSTILE_NAMES,
    WITHOUT_PLAIN_TOOZ,
    ServerPool,
    close_zookeeper_session,
    make_coordinator,
    prefix_without_pg_collisions,
    take_away,
    url_for,
)
from .support.procs import Worker, run_worker, worker_process
from .support.servers import PrivateServer


@pytest.fixture
def prefix() -> str:
    """A prefix of at most 7 characters: the longest that MySQL's 64-character limit
    allows for every name (mapped keys are at most ``len(prefix) + 57`` characters)."""
    return f"c{uuid.uuid4().hex[:5]}-"


@asynccontextmanager
async def started(url: str, prefix: str, **settings: float) -> AsyncIterator[Coordinator]:
    async with make_coordinator(url, prefix, **settings) as coordinator:
        yield coordinator


# -- the primitives: Lock, Semaphore (of limit 1) and Leadership ---------------------------


@dataclass(frozen=True)
class Primitive:
    """One primitive of the suite: how to build it, the key it holds, what its loss raises.

    The tests that take a ``primitive`` run once per backend and per primitive: each
    excludes (a semaphore of limit 1), forgets a cancelled waiter, ends with stop(),
    and is lost, alike.
    """

    kind: str
    #: ``make(name, coordinator, blocking)``: a new one, for one ``async with`` block.
    make: Callable[[str, Coordinator, bool | float], AbstractAsyncContextManager[object]]
    #: ``key(prefix, name)``: the backend key its holder holds.
    key: Callable[[str, str], str]
    #: What a loss raises out of the block (exactly this class), and how its message
    #: begins, ``{name}`` filled in.
    lost: type[LockLost]
    lost_message: str

    def enter(
        self, name: str, coordinator: Coordinator, blocking: bool | float = True
    ) -> AbstractAsyncContextManager[object]:
        """A new one of ``name`` on ``coordinator``, to enter with ``async with``."""
        return self.make(name, coordinator, blocking)

    def __str__(self) -> str:  # the test ids
        return self.kind


PRIMITIVES = [
    Primitive(
        "lock",
        lambda name, coordinator, blocking: Lock(name, coordinator=coordinator)(blocking),
        backend_key,
        LockLost,
        "lock {name!r} was lost while held: ",
    ),
    Primitive(
        "semaphore",
        lambda name, coordinator, blocking: Semaphore(name, 1, coordinator=coordinator)(blocking),
        lambda prefix, name: slot_key(prefix, name, 0),  # limit 1: always slot 0
        LockLost,
        "semaphore {name!r} lost slot 0 while held: ",
    ),
    Primitive(
        "leadership",
        lambda name, coordinator, blocking: Leadership(
            name, coordinator=coordinator, blocking=blocking
        ),
        lambda prefix, name: backend_key(prefix, LEADERSHIP_NAMESPACE + name),
        LeadershipLost,
        "leadership {name!r} was lost while leading: ",
    ),
]


@pytest.fixture(params=PRIMITIVES, ids=str)
def primitive(request: pytest.FixtureRequest) -> Primitive:
    chosen: Primitive = request.param
    return chosen


def _names_kept(coordinator: Coordinator) -> set[str]:
    """The names whose local queue or semaphore state ``coordinator`` still keeps.

    Private state: statistics() counts the tasks in them, not a state left behind
    empty (a leak).
    """
    table = coordinator._lock_table
    return {*table._queues, *table.semaphores}


# -- exclusion --------------------------------------------------------------------------


async def test_tasks_of_one_process_exclude_each_other(
    any_backend_url: str, prefix: str, primitive: Primitive
) -> None:
    counter = 0
    inside = 0

    async def increment(coordinator: Coordinator) -> None:
        nonlocal counter, inside
        for _ in range(4):
            async with primitive.enter("counter", coordinator):
                inside += 1
                assert inside == 1
                value = counter
                await anyio.sleep(0.001)
                counter = value + 1
                inside -= 1

    # Two coordinators: tasks of one queue locally, the two meet only at the backend.
    async with (
        started(any_backend_url, prefix) as first,
        started(any_backend_url, prefix) as second,
    ):
        async with anyio.create_task_group() as group:
            for number in range(10):
                group.start_soon(increment, first if number % 2 else second)
    assert counter == 40


def test_processes_exclude_each_other(any_backend_url: str, prefix: str, tmp_path: Path) -> None:
    """Processes of several tasks each do read-sleep-write increments under one lock."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    processes, tasks, rounds = 4, 5, 5
    args = ("count", any_backend_url, prefix, "shared", str(counter), str(tasks), str(rounds))

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(processes):
                group.start_soon(anyio.to_thread.run_sync, lambda: run_worker(*args))

    anyio.run(main)
    assert int(counter.read_text()) == processes * tasks * rounds


# -- budgets and hand-off ---------------------------------------------------------------


async def test_budgets_and_handoff_while_another_process_holds(
    any_backend: str, any_backend_url: str, prefix: str
) -> None:
    """blocking=False and blocking=<s> give up in time; blocking=True gets a released lock.

    The hand-off latency (holder told to release -> waiter holds) is recorded for the
    summary at the end of the run, and README's backend table.
    """
    with worker_process("serve", any_backend_url, prefix, "busy") as holder:
        holder.send("acquire")
        await anyio.to_thread.run_sync(holder.expect, "held")
        async with started(any_backend_url, prefix) as coordinator:
            lock = coordinator.get_lock("busy")

            before = anyio.current_time()
            assert await lock.acquire(blocking=False) is False
            assert anyio.current_time() - before < 1.0

            before = anyio.current_time()
            assert await lock.acquire(blocking=0.5) is False
            assert 0.45 <= anyio.current_time() - before < 2.0

            with pytest.raises(LockAcquireFailed, match=r"within 0\.2 s"):
                async with lock(blocking=0.2):
                    pass
            assert not lock.locked()

            latencies = []
            for _ in range(3):
                got = anyio.Event()
                acquired_at = 0.0

                async def wait_for_it(got: anyio.Event) -> None:
                    nonlocal acquired_at
                    async with lock:  # blocking=True
                        acquired_at = anyio.current_time()
                        got.set()

                async with anyio.create_task_group() as group:
                    group.start_soon(wait_for_it, got)
                    await anyio.sleep(0.3)  # the waiter polls at its slowest by now
                    assert not got.is_set()
                    told = anyio.current_time()
                    holder.send("release")
                    with anyio.fail_after(10):
                        await got.wait()
                latencies.append(acquired_at - told)
                await anyio.to_thread.run_sync(holder.expect, "released")
                holder.send("acquire")
                await anyio.to_thread.run_sync(holder.expect, "held")
    HANDOFF_LATENCIES.setdefault(any_backend, []).extend(latencies)
    # Generous: aiotooz polls every <= 50 ms on every backend (tooz alone: up to 1 s).
    assert statistics.median(latencies) < 0.5, latencies


# -- TTL backends keep their locks while the coordinator beats ---------------------------


@pytest.mark.parametrize(
    ("backend", "ttl"),
    # memcached counts a TTL as one second less (whole-second expiry): 3 leaves 2 s, so
    # a beat delayed by a loaded machine does not lose the lock.
    [("redis", 1), ("memcached", 3), ("etcd3+http", 2)],
)
def test_ttl_lock_outlives_its_ttl_while_beating(
    backend: str, ttl: int, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """Held for 3x its TTL: kept while beating; and (the control) lost without beats."""
    from tooz import coordination

    base = url_for(backend, server_pool, tmp_path)
    url = f"{base}?lock_timeout={ttl}"
    # The control: plain tooz, same URL, never beating. aiotooz refuses a heartbeat
    # slower than half the TTL, so the control cannot be an aiotooz coordinator.
    silent = coordination.get_coordinator(url, b"silent-" + prefix.encode())
    silent.start(start_heart=False)
    try:
        assert silent.get_lock(f"{prefix}lapsed".encode()).acquire(blocking=False)

        async def main() -> None:
            async with started(url, prefix, heartbeat=0.2) as beating:
                kept = beating.get_lock("kept")
                assert await kept.acquire(blocking=False)
                await anyio.sleep(3 * ttl + 0.5)
                outcome = await anyio.to_thread.run_sync(run_worker, "try", base, prefix, "kept")
                assert outcome == "busy"
                outcome = await anyio.to_thread.run_sync(run_worker, "try", base, prefix, "lapsed")
                assert outcome == "acquired"  # the TTL is what the URL says, and it expires
                await kept.release()

        anyio.run(main)
    finally:
        silent.stop()


# -- a cancelled waiter, stop(), a loss: on every primitive -----------------------------


async def test_a_waiter_cancelled_while_waiting_leaves_nothing_behind(
    any_backend_url: str, prefix: str, primitive: Primitive
) -> None:
    """Cancelled waiters (one behind the holder in its coordinator, one at the backend
    through another) leave nothing held or queued, and the holder is not disturbed:
    it leaves quietly, and the name goes to the next one, in either coordinator."""
    async with (
        started(any_backend_url, prefix) as first,
        started(any_backend_url, prefix) as second,
    ):

        async def wait_in_vain(coordinator: Coordinator) -> None:
            async with primitive.enter("busy", coordinator):
                pytest.fail(f"entered a held {primitive}")

        async with primitive.enter("busy", first):
            async with anyio.create_task_group() as group:
                for coordinator in (first, second):
                    group.start_soon(wait_in_vain, coordinator)
                # Cancelled once both wait: in line here, and (its first try refused)
                # for the backend there.
                with anyio.fail_after(10):
                    while not all(c.statistics().tasks_waiting for c in (first, second)):
                        await anyio.sleep(0.01)
                group.cancel_scope.cancel()
            for coordinator, held in ((first, 1), (second, 0)):
                stats = coordinator.statistics()
                left = (stats.locks_held, stats.tasks_waiting, stats.names_waited_for)
                assert left == (held, 0, 0)
        with anyio.fail_after(10):
            async with primitive.enter("busy", second):
                pass
            async with primitive.enter("busy", first):
                pass
        for coordinator in (first, second):
            assert coordinator.statistics().locks_held == 0
            assert not _names_kept(coordinator)


async def test_stop_fails_waiters_and_ends_holders_blocks_with_their_loss(
    any_backend_url: str, prefix: str, primitive: Primitive
) -> None:
    """As stop() says: a task still waiting gets LockCreationFailed; a holder's block
    is cancelled and raises the primitive's loss; the name is free at once."""
    coordinator = make_coordinator(any_backend_url, prefix)
    await coordinator.start()
    entered = anyio.Event()
    holder_ended: list[BaseException] = []
    waiter_ended: list[BaseException] = []

    async def hold() -> None:
        try:
            async with primitive.enter("busy", coordinator):
                entered.set()
                await anyio.sleep(30)
        except Exception as exc:
            holder_ended.append(exc)

    async def wait() -> None:
        try:
            async with primitive.enter("busy", coordinator):
                pytest.fail(f"entered a held {primitive}")
        except Exception as exc:
            waiter_ended.append(exc)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(hold)
            await entered.wait()
            group.start_soon(wait)
            while coordinator.statistics().tasks_waiting == 0:
                await anyio.sleep(0.01)
            await coordinator.stop()
    [lost] = holder_ended
    assert isinstance(lost, primitive.lost) and type(lost) is primitive.lost, repr(lost)
    assert (lost.lock_name, lost.reason) == ("busy", "the coordinator stopped")
    assert str(lost).startswith(primitive.lost_message.format(name="busy"))
    [failed] = waiter_ended
    assert isinstance(failed, LockCreationFailed), repr(failed)
    assert coordinator.statistics().locks_held == coordinator.statistics().tasks_waiting == 0
    assert not _names_kept(coordinator)
    async with started(any_backend_url, prefix) as other:
        async with primitive.enter("busy", other, False):
            pass


# A file or ipc lock belongs to its process: it is never lost while the process lives
# (stop() is its one loss, in the test above). On the others it is taken away from
# outside: another owner's token on its key (redis, redis+cluster, memcached, etcd),
# its session ended (zookeeper: expired; postgresql, mysql: killed).
@pytest.mark.parametrize(
    "any_backend", [b for b in ALL_BACKENDS if b not in {"file", "ipc"}], indirect=True
)
async def test_a_loss_cancels_the_body_and_raises_out_of_the_block(
    any_backend: str, any_backend_url: str, prefix: str, primitive: Primitive
) -> None:
    async with started(any_backend_url, prefix, heartbeat=0.1) as coordinator:
        with pytest.raises(primitive.lost) as raised:
            async with primitive.enter("taken", coordinator):
                # Timed from before the take-away: the loss may be noticed, and the body
                # cancelled, before the take-away's own call returns (ZooKeeper's
                # connection drop reaches a 0.1 s heartbeat at once).
                taken = anyio.current_time()
                try:
                    if any_backend == "zookeeper":
                        await close_zookeeper_session(coordinator)
                    else:
                        key = primitive.key(prefix, "taken")
                        await anyio.to_thread.run_sync(take_away, any_backend, any_backend_url, key)
                    await anyio.sleep(30)
                finally:
                    noticed = anyio.current_time() - taken
                pytest.fail("the body was not cancelled")  # pragma: no cover
        assert noticed < 5, noticed  # a beat or two, and slack for a loaded machine
        assert type(raised.value) is primitive.lost
        assert raised.value.lock_name == "taken" and raised.value.reason
        assert str(raised.value).startswith(primitive.lost_message.format(name="taken"))
        assert coordinator.statistics().locks_held == 0


# -- stop(), names, plain tooz -------------------------------------------------------------


def test_stop_releases_held_locks(any_backend_url: str, prefix: str) -> None:
    """tooz's own stop() keeps them on file, etcd, postgresql and mysql; ours does not."""
    names = ["kept", "ümlaut/..", "x" * 1000]

    async def main() -> None:
        coordinator = make_coordinator(any_backend_url, prefix)
        await coordinator.start()
        held = [coordinator.get_lock(name) for name in names]
        for lock in held:
            assert await lock.acquire(blocking=False)
        await coordinator.stop()

    anyio.run(main)
    for name in names:
        assert run_worker("try", any_backend_url, prefix, name) == "acquired"


async def test_hostile_names_lock_distinctly(any_backend_url: str) -> None:
    """Each hostile name is a lock of its own, at the backend and in the coordinator."""
    prefix = prefix_without_pg_collisions("h", HOSTILE_NAMES)
    async with (
        started(any_backend_url, prefix) as first,
        started(any_backend_url, prefix) as second,
    ):
        held = [first.get_lock(name) for name in HOSTILE_NAMES]
        for lock in held:  # all at once: no two names share a key
            assert await lock.acquire(blocking=False), lock.name
        for name in HOSTILE_NAMES:
            # Refused by the coordinator holding it, and by the backend for another.
            assert await Lock(name, coordinator=first).acquire(blocking=False) is False, name
            assert await second.get_lock(name).acquire(blocking=False) is False, name
        for lock in held:
            await lock.release()
        others = [second.get_lock(name) for name in HOSTILE_NAMES]
        for lock in others:
            assert await lock.acquire(blocking=False), lock.name
        for lock in others:
            await lock.release()


# Not on the backends of aiotooz's own drivers (redis+cluster): plain tooz has no driver
# there, so there is nothing to exclude (parametrized away rather than skipped).
@pytest.mark.parametrize(
    "any_backend", [b for b in ALL_BACKENDS if b not in WITHOUT_PLAIN_TOOZ], indirect=True
)
async def test_plain_tooz_and_aiotooz_exclude_each_other(
    any_backend: str, any_backend_url: str, prefix: str
) -> None:
    """Plain ASCII names are plain tooz's keys, on every backend (ipc: the same semaphore).

    A plain tooz holder keeps aiotooz out; an aiotooz holder keeps a plain tooz process
    waiting (a blocking acquire: tooz's ipc driver cannot try without waiting) until it
    releases, and then that process holds the lock.
    """
    async with started(any_backend_url, prefix) as coordinator:
        lock = coordinator.get_lock("volume-42")
        with worker_process("tooz-hold", any_backend_url, prefix, "volume-42") as tooz:
            await anyio.to_thread.run_sync(tooz.expect, "waiting")
            await anyio.to_thread.run_sync(tooz.expect, "held")
            assert await lock.acquire(blocking=False) is False
        # Its input closed: the plain tooz process released the lock and exited.
        assert await lock.acquire(blocking=False) is True

        with worker_process("tooz-hold", any_backend_url, prefix, "volume-42") as tooz:
            await anyio.to_thread.run_sync(tooz.expect, "waiting")
            granted = anyio.Event()

            async def until_granted(tooz: Worker) -> None:
                await anyio.to_thread.run_sync(tooz.expect, "held", abandon_on_cancel=True)
                granted.set()

            async with anyio.create_task_group() as group:
                group.start_soon(until_granted, tooz)
                await anyio.sleep(1.5)  # plain tooz retries at least every second
                assert not granted.is_set(), "plain tooz got a lock aiotooz holds"
                await lock.release()
                with anyio.fail_after(20):
                    await granted.wait()
            assert await lock.acquire(blocking=False) is False
        assert await lock.acquire(blocking=False) is True
        await lock.release()


# -- the harness the failure tests use ---------------------------------------------------


def _stopped(pid: int) -> bool:
    """Whether the kernel has stopped the process (state "T"); signals take a moment."""
    deadline = time.monotonic() + 5
    while True:
        stopped = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"
        if stopped or time.monotonic() > deadline:
            return stopped
        time.sleep(0.01)


@pytest.mark.parametrize(
    "backend", ["redis", "memcached", "etcd3+http", "zookeeper", "postgresql", "mysql"]
)
def test_private_servers_pause_resume_restart_and_kill(
    backend: str, private_server: Callable[[str], PrivateServer]
) -> None:
    """The harness the failure tests use, on every server it can start."""
    server = private_server(backend)
    pid = server.pid
    assert pid is not None
    server.pause()
    assert _stopped(pid)
    server.resume()
    time.sleep(0.1)
    assert Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T"
    port = server.port
    server.restart()
    assert server.port == port and server.running and server.pid != pid
    assert run_worker("try", server.url, "p-", "after-restart") == "acquired"
    server.kill()
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 0.5).close()
