"""Leadership: one leader at a time across processes, on every backend, and failover.

Three worker processes (one on trio, two on asyncio) campaign with ``run_as_leader``;
each term's job writes its begin and then a heartbeat line every 50 ms to a shared
record. The record shows whether two terms ever overlapped; the leader is SIGKILLed
and another must take over within the backend's bound; ``leader()``, asked from a
process that does not campaign, must name the member the record shows leading.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from aiotooz import (
    BackendUnavailable,
    ConfigurationError,
    Coordinator,
    Leadership,
    LeadershipLost,
    Lock,
    LockAcquireFailed,
    LockCreationFailed,
    LockNameError,
    Term,
    fencing_token,
    set_default_coordinator,
)
from aiotooz._leadership import LEADERSHIP_NAMESPACE

from .support.helpers import FAILOVER_TIMES, ServerPool, make_coordinator, url_for
from .support.procs import Worker, holding_process

#: URL options per backend: short TTLs and sessions, so that failover is quick. The
#: workers beat every 0.3 s (under half of every TTL here).
OPTIONS = {
    "redis": "lock_timeout=2",
    "redis+cluster": "lock_timeout=2",
    "memcached": "lock_timeout=3",  # memcached may expire 1 s early: 2 s guaranteed
    "etcd3+http": "lock_timeout=2",
    "zookeeper": "timeout=2",
}
#: How long after the SIGKILL another process must lead, at most (generous: the machine
#: is loaded): the TTL or session where the lock outlives its dead holder, plus slack.
BOUND = {"redis": 2, "redis+cluster": 2, "memcached": 3, "etcd3+http": 2, "zookeeper": 2}
SLACK = 6.0
#: Where the kernel frees a dead process's locks as it reaps it.
DIES_WITH_THE_PROCESS = ("file", "ipc")


@dataclass
class _Term:
    member: str
    token: int
    begin: float
    last: float = field(default=0.0)


def read_terms(record: Path) -> list[_Term]:
    """The terms in the record, in the order they began."""
    terms: dict[int, _Term] = {}
    if not record.exists():
        return []
    for line in record.read_text().splitlines():
        what, member, token_text, stamp_text = line.split()
        token, stamp = int(token_text), float(stamp_text)
        term = terms.get(token)
        if what == "begin":
            assert term is None, f"token {token} began twice"
            terms[token] = _Term(member, token, stamp, stamp)
        else:
            assert term is not None and term.member == member, line
            term.last = max(term.last, stamp)
    return sorted(terms.values(), key=lambda term: term.begin)


def check_one_at_a_time(terms: list[_Term]) -> None:
    """No two terms overlap, and tokens grow from each term to the next."""
    for before, after in itertools.pairwise(terms):
        assert before.last < after.begin, f"terms overlap: {before} and {after}"
        assert before.token < after.token, f"token went back: {before} then {after}"


def with_options(url: str, backend: str) -> str:
    options = OPTIONS.get(backend)
    return f"{url}{'&' if '?' in url else '?'}{options}" if options else url


async def wait_for(predicate: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await anyio.sleep(0.02)


#: The campaigners' event loops: trio and asyncio processes compete for one leadership.
#: The trio one starts first, so it mostly leads first and an asyncio one succeeds it.
LOOPS = ("trio", "asyncio", "asyncio")


# Once per backend, not once per event loop: the workers run both (the observer here,
# on asyncio, only asks leader(); the tests below run on both loops).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_one_leader_at_a_time_and_failover_after_sigkill(
    any_backend: str, any_backend_url: str, prefix: str, tmp_path: Path
) -> None:
    url = with_options(any_backend_url, any_backend)
    record = tmp_path / "terms"
    workers = [Worker("campaign", url, prefix, "sched", str(record), loop) for loop in LOOPS]
    try:
        members = {}
        for worker in workers:
            line = await anyio.to_thread.run_sync(worker.readline)
            assert line.startswith("member "), line
            members[line.split()[1]] = worker
        async with make_coordinator(url, prefix, heartbeat=0.3) as observer:
            await wait_for(lambda: read_terms(record), 30, "a first leader")
            first = read_terms(record)[-1]
            # The record's begin comes after the leader published itself.
            assert await observer.leader("sched") == first.member
            members[first.member].proc.kill()
            killed_at = time.time()
            await anyio.to_thread.run_sync(members[first.member].proc.wait)
            bound = BOUND.get(any_backend, 0) + SLACK
            seen_after_kill = {await observer.leader("sched")}  # at least one answer
            while len(read_terms(record)) < 2:
                seen_after_kill.add(await observer.leader("sched"))
                assert time.time() - killed_at < bound, f"no new leader within {bound} s"
                await anyio.sleep(0.02)
            second = read_terms(record)[1]
            FAILOVER_TIMES.setdefault(any_backend, []).append(second.begin - killed_at)
            assert second.member != first.member
            # Before the new term: nobody, or the dead holder whose lock still lives
            # (its TTL or session runs on), never a third member; then the new leader.
            assert seen_after_kill <= {None, first.member, second.member}
            if any_backend in DIES_WITH_THE_PROCESS:
                # Its lock went with it, so its record (left behind) is void at once.
                assert first.member not in seen_after_kill
            assert await observer.leader("sched") == second.member
            await anyio.sleep(0.3)  # the new leader runs a while: no one else begins
        terms = read_terms(record)
        # (A later term may follow if the new leader lost its lease under heavy load;
        # what must hold is one term at a time.)
        assert [term.member for term in terms[:2]] == [first.member, second.member]
        check_one_at_a_time(terms)
    finally:
        for worker in workers:  # all at once: each stops its coordinator meanwhile
            if worker.proc.poll() is None:
                worker.end_input()
        for worker in workers:
            worker.close(grace=15)
    # The survivors stopped: the record shows one leader at a time throughout.
    check_one_at_a_time(read_terms(record))


# -- the API on one backend at a time (file and Redis) ------------------------------------


async def test_leadership_gives_a_term_and_leader_names_it(backend_url: str, prefix: str) -> None:
    async with (
        make_coordinator(backend_url, prefix) as one,
        make_coordinator(backend_url, prefix) as other,
    ):
        assert await other.leader("cleaner") is None
        async with one.leadership("cleaner") as term:
            assert isinstance(term, Term)
            assert (term.name, term.member_id) == ("cleaner", one.member_id)
            assert term.started_at <= time.time()
            assert fencing_token() == term.fencing_token
            assert await other.leader("cleaner") == one.member_id
            assert await one.leader("cleaner") == one.member_id
            assert await other.leader("another") is None
            with pytest.raises(LockAcquireFailed, match="leadership 'cleaner'"):
                async with other.leadership("cleaner", blocking=False):
                    pass
            with pytest.raises(LockAcquireFailed):
                async with other.leadership("cleaner", blocking=0.2):
                    pass
        assert await other.leader("cleaner") is None
        async with other.leadership("cleaner") as second:
            assert second.fencing_token > term.fencing_token
            assert await one.leader("cleaner") == other.member_id


async def test_leadership_is_built_like_a_lock(file_url: str, prefix: str) -> None:
    """``Leadership(name, coordinator=...)`` beside ``Lock`` and ``Semaphore``; without a
    coordinator, the default one as the block is entered."""
    async with (
        make_coordinator(file_url, prefix) as one,
        make_coordinator(file_url, prefix) as other,
    ):
        async with Leadership("builder", coordinator=one) as term:
            assert term.member_id == one.member_id
            assert await other.leader("builder") == one.member_id
            with pytest.raises(LockAcquireFailed, match="leadership 'builder'"):
                async with Leadership("builder", coordinator=other, blocking=0.1):
                    pass
        campaign = Leadership("builder")  # no default coordinator yet: made, not entered
        previous = set_default_coordinator(other)
        try:
            async with campaign as term:
                assert term.member_id == other.member_id
                assert await one.leader("builder") == other.member_id
        finally:
            set_default_coordinator(previous)
        assert await one.leader("builder") is None
        with pytest.raises(ConfigurationError, match="blocking"):
            Leadership("builder", coordinator=one, blocking=-1)
        with pytest.raises(LockNameError):
            Leadership("", coordinator=one)


@pytest.mark.parametrize("backend", ["file", "ipc"])
async def test_leader_never_names_a_term_that_ended_while_another_holds_the_lock(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """On file and ipc the record is a file the next holder overwrites only after it has
    taken the lock and fenced: in between, the kernel's word on who holds the lock (the
    holder's process) must void the last term's record."""
    url = url_for(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix) as coordinator:
        async with coordinator.leadership("sched") as term:
            assert await coordinator.leader("sched") == term.member_id
        # The term ended; another process takes the very lock, publishing nothing.
        with holding_process("hold", url, prefix, LEADERSHIP_NAMESPACE + "sched"):
            assert await coordinator.leader("sched") is None
        assert await coordinator.leader("sched") is None


@pytest.mark.parametrize("backend", ["file", "ipc"])
async def test_leader_never_names_a_term_that_ended_while_this_process_holds_the_lock(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """The same with the next holder in the same process: the kernel names the same
    process, so the last term's record was believed until the new holder fenced."""
    url = url_for(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix) as one, make_coordinator(url, prefix) as other:
        async with one.leadership("sched") as term:
            assert await other.leader("sched") == term.member_id
        # Taken as a new term is, before its token and record: nothing published yet.
        async with Lock(LEADERSHIP_NAMESPACE + "sched", coordinator=other):
            assert await other.leader("sched") is None
            assert await one.leader("sched") is None
        async with other.leadership("sched") as second:
            assert await one.leader("sched") == second.member_id
        assert await one.leader("sched") is None


@pytest.mark.parametrize("backend", ["file", "ipc"])
async def test_leader_never_names_an_ended_term_as_two_coordinators_of_a_process_take_turns(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """Two coordinators of one process lead in turn 200 times while a third asks
    leader() without pause: an answer must name a member whose term was on at some
    moment of the call (ipc named an ended term 70 to 162 times in 200 turns)."""
    url = url_for(backend, server_pool, tmp_path)
    turns = 200
    # member -> [start, end] of each term: start before it campaigns (at most when it
    # leads), end once its block has exited (at least when its lock was let go).
    terms: dict[str, list[list[float]]] = {}
    stale: list[str] = []
    answers = 0
    async with (
        make_coordinator(url, prefix) as one,
        make_coordinator(url, prefix) as two,
        make_coordinator(url, prefix) as reader,
    ):
        done = anyio.Event()

        async def read() -> None:
            nonlocal answers
            while not done.is_set():
                started = anyio.current_time()
                member = await reader.leader("turns")
                ended = anyio.current_time()
                if member is None:
                    continue  # (leader() itself waits for a worker thread)
                answers += 1
                spans = terms.get(member, [])
                if not any(begin <= ended and end >= started for begin, end in spans):
                    stale.append(f"{member} at {started:.6f}-{ended:.6f}: {spans[-2:]}")

        async def take_turns() -> None:
            # One after the other: the next campaigns only after the last term ended, so
            # no member's campaign overlaps another's term.
            for turn in range(turns):
                coordinator = (one, two)[turn % 2]
                span = [anyio.current_time(), math.inf]
                terms.setdefault(coordinator.member_id, []).append(span)
                async with coordinator.leadership("turns"):
                    await anyio.sleep(0.001)
                span[1] = anyio.current_time()
            done.set()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                group.start_soon(read)
                await take_turns()
    assert answers > 0
    assert not stale, f"{len(stale)} answers named an ended term: {stale[:5]}"


async def test_a_lock_of_the_same_name_is_another_lock(backend_url: str, prefix: str) -> None:
    async with make_coordinator(backend_url, prefix) as coordinator:
        async with coordinator.leadership("jobs"), coordinator.get_lock("jobs"):
            pass


async def test_leader_names_nobody_once_the_term_is_lost(redis_url: str, prefix: str) -> None:
    """(That the loss cancels the body and raises LeadershipLost, on every backend:
    tests/test_conformance.py.)"""
    import redis

    async with make_coordinator(redis_url, prefix, heartbeat=0.1) as coordinator:
        with pytest.raises(LeadershipLost):
            async with coordinator.leadership("gone"):
                client = redis.Redis.from_url(redis_url)
                keys = client.keys(f"*{prefix}aiotooz.leader.gone_lock")
                assert len(keys) == 1
                client.delete(*keys)  # taken away from outside
                client.close()
                await anyio.sleep(10)
        assert await coordinator.leader("gone") is None


async def test_run_as_leader_campaigns_again_after_each_term(backend_url: str, prefix: str) -> None:
    """A job that returns gives leadership up; the next term has a larger token."""
    tokens: list[int] = []
    async with make_coordinator(backend_url, prefix) as coordinator:

        async def job() -> None:
            tokens.append(fencing_token())
            assert await coordinator.leader("loop") == coordinator.member_id
            if len(tokens) == 3:
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(coordinator.run_as_leader, "loop", job)
    assert len(tokens) == 3 and tokens == sorted(set(tokens))


@pytest.mark.parametrize("error", [KeyError, BackendUnavailable, LeadershipLost])
async def test_run_as_leader_raises_the_jobs_own_error(
    backend_url: str, prefix: str, error: type[Exception]
) -> None:
    """Even errors that the campaign itself would retry, when the job raised them."""
    async with make_coordinator(backend_url, prefix) as coordinator:

        async def job() -> None:
            if error is LeadershipLost:
                raise LeadershipLost("the job's own", lock_name="another", reason="test")
            raise error("the job's own")

        with pytest.raises(error, match="the job's own"):
            await coordinator.run_as_leader("failing", job)
        assert await coordinator.leader("failing") is None  # given up on the way out


async def test_run_as_leader_returns_when_cancelled_and_another_takes_over(
    backend_url: str, prefix: str
) -> None:
    leaders: list[str] = []
    async with (
        make_coordinator(backend_url, prefix) as one,
        make_coordinator(backend_url, prefix) as other,
    ):

        def job_of(coordinator: Coordinator) -> Callable[[], Awaitable[None]]:
            async def job() -> None:
                leaders.append(coordinator.member_id)
                await anyio.sleep_forever()

            return job

        async with anyio.create_task_group() as group:
            one_scope = anyio.CancelScope()

            async def run_one() -> None:
                with one_scope:
                    await one.run_as_leader("moving", job_of(one))

            group.start_soon(run_one)
            await wait_for(lambda: leaders, 10, "a leader")
            group.start_soon(other.run_as_leader, "moving", job_of(other))
            await anyio.sleep(0.3)
            assert leaders == [one.member_id]
            one_scope.cancel()
            await wait_for(lambda: len(leaders) == 2, 10, "the other leading")
            assert leaders == [one.member_id, other.member_id]
            assert await one.leader("moving") == other.member_id
            group.cancel_scope.cancel()


async def test_run_as_leader_ends_when_its_coordinator_stops(backend_url: str, prefix: str) -> None:
    coordinator = make_coordinator(backend_url, prefix)
    await coordinator.start()
    leading = anyio.Event()

    async def job() -> None:
        leading.set()
        await anyio.sleep_forever()

    async def stop_when_leading() -> None:
        await leading.wait()
        await coordinator.stop()

    async with anyio.create_task_group() as group:
        group.start_soon(stop_when_leading)
        with pytest.raises(LockCreationFailed, match="not started"):
            await coordinator.run_as_leader("stopping", job)


async def test_bad_arguments_get_clear_errors(file_url: str, prefix: str) -> None:
    coordinator = make_coordinator(file_url, prefix)
    with pytest.raises(LockCreationFailed, match="not started"):
        await coordinator.leader("x")
    async with coordinator:
        with pytest.raises(LockNameError):
            coordinator.leadership("")
        with pytest.raises(ConfigurationError, match="blocking"):
            coordinator.leadership("x", blocking=-1)
        with pytest.raises(LockNameError):
            await coordinator.leader(42)  # type: ignore[arg-type]


async def test_run_as_leader_refuses_a_job_that_is_not_callable_at_once(
    file_url: str, prefix: str
) -> None:
    """It campaigned first, and waited as long as another process led, to fail only
    when its term came (kazoo's election refuses a non-callable before campaigning)."""
    async with (
        make_coordinator(file_url, prefix) as leading,
        make_coordinator(file_url, prefix) as coordinator,
        leading.leadership("busy"),
    ):
        with anyio.fail_after(5), pytest.raises(TypeError, match="callable"):
            await coordinator.run_as_leader("busy", 42)  # type: ignore[arg-type]
        assert coordinator.statistics().tasks_waiting == 0
        assert coordinator.statistics().locks_held == 0
