"""``@once_per``: a job runs once per window across processes, on every backend that
keeps records; a window whose runner died before finishing runs again with
``finish_required``; the window record's rules; bad arguments.

The cross-process runs use worker processes (tests/support/worker.py ``once``), two on
trio and two on asyncio, each calling the job every 0.1 s; each run appends its window to
a shared log, which shows whether a window ran twice or not at all.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from aiotooz import (
    ConfigurationError,
    Lock,
    LockLost,
    LockNameError,
    UnsupportedOperation,
    fencing_token,
    once_per,
)
from aiotooz._lock import held_handle
from aiotooz._once import ONCE_NAMESPACE

from .support.helpers import ServerPool, make_coordinator, url_for
from .support.procs import Worker

#: Backends that keep the window record (memcached refuses: it may evict it).
RECORD_BACKENDS = ["file", "redis", "etcd3+http", "zookeeper", "postgresql", "mysql"]
LOOPS = ("trio", "asyncio", "trio", "asyncio")


def read_runs(log: Path) -> list[tuple[int, int, int, int]]:
    """The log's runs: (window before the call, window at the job's start, pid, token)."""
    if not log.exists():
        return []
    return [
        (int(before), int(started), int(pid), int(token))
        for before, started, pid, token in (line.split() for line in log.read_text().splitlines())
    ]


def windows_of(runs: list[tuple[int, int, int, int]]) -> list[int]:
    """The window each run claimed.

    The claim's window lies between the one computed before the call and the one at the
    job's start; they differ only for a call that straddles a window's edge (a few
    milliseconds): such a run claimed whichever of the two no other run claimed.
    """
    sure = [started for before, started, _, _ in runs if before == started]
    chosen = list(sure)
    for before, started, _, _ in runs:
        if before != started:
            chosen.append(started if started not in sure else before)
    return chosen


def ready_workers(url: str, prefix: str, every: float, log: Path, finish: str) -> list[Worker]:
    """Four workers, started and ready to call the job."""
    workers = [
        Worker("once", url, prefix, "report", str(every), str(log), finish, loop) for loop in LOOPS
    ]
    for worker in workers:
        worker.expect("ready")
    return workers


def tell_to_go(workers: list[Worker], seconds: float) -> tuple[float, float]:
    """Tell the workers to call the job from shortly after now for ``seconds``."""
    start = time.time() + 0.3
    end = start + seconds
    for worker in workers:
        worker.send(f"go {start} {end}")
    return start, end


def start_workers(
    url: str, prefix: str, every: float, log: Path, finish: str, seconds: float
) -> tuple[list[Worker], float, float]:
    """Four ready workers told to call the job from shortly after now for ``seconds``."""
    workers = ready_workers(url, prefix, every, log, finish)
    return workers, *tell_to_go(workers, seconds)


# Once per backend, not once per event loop: the workers run both.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("backend", RECORD_BACKENDS)
async def test_four_processes_run_the_job_once_per_window(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    url = url_for(backend, server_pool, tmp_path)
    log = tmp_path / "runs.log"
    every = 2.0
    workers, start, end = start_workers(url, prefix, every, log, "at-most-once", 7.0)
    try:
        for worker in workers:
            worker.finish(timeout=60)
    finally:
        for worker in workers:
            worker.close(grace=5)
    runs = read_runs(log)
    windows = windows_of(runs)
    twice = [window for window, count in Counter(windows).items() if count > 1]
    assert not twice, f"windows run more than once: {twice} in {runs}"
    # Every window wholly inside the calling time ran (the others may or may not).
    whole = range(math.ceil(start / every) * int(every), int(end - every) + 1, int(every))
    assert set(whole) <= set(windows), f"windows not run: {set(whole) - set(windows)} in {runs}"
    assert len(whole) >= 2
    # Each claim was fenced with a larger token than the one before.
    tokens = [token for *_, token in sorted(runs, key=lambda run: run[1])]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), runs


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_finish_required_runs_a_window_again_after_its_runner_is_killed(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    url = url_for(backend, server_pool, tmp_path)
    if backend == "redis":
        url += "?lock_timeout=3"  # the dead runner's lock expires in 3 s
    log = tmp_path / "runs.log"
    every = 30
    workers = ready_workers(url, prefix, every, log, "hang-first")
    try:
        # Go with at least 12 s left in the window, so that the run again (a lock TTL
        # after the kill) fits in it. Counted once the workers are ready: their start-up
        # under load took most of the window's room when it was counted before it.
        left = every - time.time() % every
        if left < 12:
            await anyio.sleep(left + 0.05)
        tell_to_go(workers, 10.0)
        runs: list[tuple[int, int, int, int]] = []
        deadline = time.monotonic() + 5
        while not runs:
            assert time.monotonic() < deadline, "no worker ran the job"
            await anyio.sleep(0.05)
            runs = read_runs(log)
        ((_, window, victim, token),) = runs
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 8
        while len(runs) < 2:
            assert time.monotonic() < deadline, f"the window was not run again: {runs}"
            await anyio.sleep(0.05)
            runs = read_runs(log)
        for worker in workers:
            if worker.pid != victim:
                worker.finish(timeout=30)
    finally:
        for worker in workers:
            worker.close(grace=5)
    every_run = read_runs(log)
    runs = [run for run in every_run if run[1] == window]  # the next may have begun
    assert len(runs) == 2, (
        f"window {window} ran {len(runs)} times, not twice (the killed run, then once "
        f"again): {every_run}"
    )
    again = runs[1]
    assert again[1] == window and again[2] != victim and again[3] > token, runs


async def test_calls_in_one_process_run_once_per_window(backend_url: str, prefix: str) -> None:
    """Tasks of several coordinators in one process, concurrent: one run a window."""
    # (window before the call, window at the job's start): the window a run claimed lies
    # between the two (a call that waited for the lock across an edge runs after it).
    runs: list[tuple[int, int]] = []
    async with (
        make_coordinator(backend_url, prefix) as one,
        make_coordinator(backend_url, prefix) as other,
    ):

        async def call(coordinator: object, times: int) -> None:
            @once_per("tick", 1, coordinator=coordinator)  # type: ignore[arg-type]
            async def tick(before: int) -> str:
                runs.append((before, math.floor(time.time())))
                await anyio.sleep(0.05)
                return "ran"

            for _ in range(times):
                await tick(math.floor(time.time()))
                await anyio.sleep(0.05)

        started = time.time()
        async with anyio.create_task_group() as group:
            for coordinator in (one, other, one, other):
                group.start_soon(call, coordinator, 25)
        ended = time.time()
    # Runs are serialised by the lock, so the windows they claimed grow strictly: give
    # each run the earliest window it can have claimed after the previous run's.
    claimed = -1
    for before, at_start in runs:
        claimed = max(before, claimed + 1)
        assert claimed <= at_start, f"two runs in one window: {runs}"
    # Liveness is the cross-process test's: here, some windows ran (a loaded machine
    # may delay the first calls by a second or more).
    assert len(runs) >= min(2, ended - started - 1), runs


async def test_a_call_returns_the_result_or_none_and_the_token_is_the_claims(
    backend_url: str, prefix: str
) -> None:
    async with make_coordinator(backend_url, prefix) as coordinator:

        @once_per("report-{day}", datetime.timedelta(hours=1), coordinator=coordinator)
        async def report(day: str) -> tuple[str, int]:
            return day, fencing_token()

        first = await report("mon")
        assert first is not None and first[0] == "mon"
        assert await report("mon") is None  # the same hour
        tuesday = await report(day="tue")  # another name, another record
        assert tuesday is not None and tuesday[1] > first[1]
        # The lock is free again, under its reserved name.
        free = coordinator.get_lock(ONCE_NAMESPACE + "report-mon")
        assert await free.acquire(False)
        await free.release()


async def test_finish_required_runs_again_a_window_whose_run_raised(
    backend_url: str, prefix: str
) -> None:
    calls: list[str] = []
    async with make_coordinator(backend_url, prefix) as coordinator:

        def decorate(finish_required: bool):  # type: ignore[no-untyped-def]
            @once_per(f"job-{finish_required}", 3600, coordinator=coordinator,
                      finish_required=finish_required)  # fmt: skip
            async def job(fail: bool) -> str:
                calls.append(f"{finish_required} {fail}")
                if fail:
                    raise RuntimeError("failed")
                return "done"

            return job

        at_most_once, at_least_once = decorate(False), decorate(True)
        for job in (at_most_once, at_least_once):
            with pytest.raises(RuntimeError):
                await job(True)
        assert await at_most_once(False) is None  # claimed for good, though it failed
        assert await at_least_once(False) == "done"  # unfinished: claimed again
        assert await at_least_once(False) is None  # finished
    assert calls == ["False True", "True True", "True False"]


async def test_a_later_window_claimed_covers_an_earlier_one(backend_url: str, prefix: str) -> None:
    """A replica whose clock lags computes an earlier window: it must not run it.

    Simulated with two lengths for one name: the claim of the current second is later
    than the start of the current hour.
    """
    async with make_coordinator(backend_url, prefix) as coordinator:

        @once_per("job", 1, coordinator=coordinator)
        async def each_second() -> str:
            return "second"

        @once_per("job", 3600, coordinator=coordinator)
        async def each_hour() -> str:
            return "hour"

        if time.time() % 3600 < 1.5:
            await anyio.sleep(1.5)  # the hour's window must start before this second's
        assert await each_second() == "second"
        assert await each_hour() is None


async def test_memcached_refuses_it(server_pool: ServerPool, tmp_path: Path, prefix: str) -> None:
    url = url_for("memcached", server_pool, tmp_path)
    async with make_coordinator(url, prefix) as coordinator:

        @once_per("job", 60, coordinator=coordinator)
        async def job() -> None:
            raise AssertionError("must not run")

        with pytest.raises(UnsupportedOperation, match="memcached may evict"):
            await job()
        # Nothing is left held.
        free = coordinator.get_lock(ONCE_NAMESPACE + "job")
        assert await free.acquire(False)
        await free.release()


@pytest.mark.parametrize(
    "every",
    [0.5, 0, -5, math.inf, math.nan, True, "60", None, datetime.timedelta(milliseconds=999)],
)
def test_a_bad_window_length_is_refused(every: object) -> None:
    with pytest.raises(ConfigurationError, match="at least 1 s"):
        once_per("job", every)  # type: ignore[arg-type]


def test_bad_functions_and_names_are_refused() -> None:
    with pytest.raises(TypeError, match="async functions"):

        @once_per("job", 60)  # type: ignore[arg-type]
        def job() -> None: ...

    with pytest.raises(LockNameError, match="not a parameter"):

        @once_per("job-{day}", 60)
        async def other() -> None: ...

    with pytest.raises(LockNameError):
        once_per("", 60)


def test_lengths_are_microseconds() -> None:
    from aiotooz._once import check_every

    assert check_every(1) == 1_000_000
    assert check_every(1.5) == 1_500_000
    assert check_every(datetime.timedelta(days=1)) == 86_400_000_000


@pytest.mark.parametrize("backend", [*RECORD_BACKENDS, "ipc", "redis+cluster"])
async def test_the_record_outlives_its_lock_and_refuses_an_older_token(
    backend: str, server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """The driver capability under once_per: kept after release, fenced by the token."""
    url = url_for(backend, server_pool, tmp_path)
    async with make_coordinator(url, prefix) as coordinator:
        lock = Lock("kept", coordinator=coordinator, fencing=True)
        async with lock:
            handle = held_handle(lock)
            assert await handle.read_record() is None
            old = lock.fencing_token
            assert await handle.write_record(b"first", old)
            assert await handle.read_record() == b"first"
        async with lock:
            handle = held_handle(lock)
            new = lock.fencing_token
            assert new > old
            assert await handle.read_record() == b"first"
            assert await handle.write_record(b"second 2", new)
            # A writer with an older token (one whose lock has passed on) is refused.
            assert not await handle.write_record(b"stale", old)
            assert await handle.read_record() == b"second 2"


async def test_a_runner_whose_lock_was_taken_cannot_mark_its_window_finished(
    redis_url: str, prefix: str
) -> None:
    """The finish is refused (the lock's key no longer holds our token): ``LockLost``,
    and with ``finish_required`` the next call runs the window again."""
    import redis

    calls: list[bool] = []
    async with make_coordinator(redis_url, prefix) as coordinator:

        @once_per("taken", 3600, coordinator=coordinator, finish_required=True)
        async def job(take_it: bool) -> str:
            calls.append(take_it)
            if take_it:
                client = redis.Redis.from_url(redis_url)
                keys = client.keys(f"*{prefix}aiotooz.once.taken_lock")
                assert len(keys) == 1
                client.delete(*keys)  # taken away from outside; the job returns at once
                client.close()
            return "done"

        with pytest.raises(LockLost):
            await job(True)
        assert await job(False) == "done"
        assert await job(False) is None
    assert calls == [True, False]
