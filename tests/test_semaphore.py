"""Semaphore: at most ``limit`` holders of a name, on every backend, asyncio and trio."""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path

import anyio
import pytest
import redis

from aiotooz import (
    BackendUnavailable,
    ConfigurationError,
    LockAcquireFailed,
    LockLost,
    LockNameError,
    LockNotHeld,
    Semaphore,
)
from aiotooz._names import backend_key, slot_key

from .support.helpers import HOSTILE_NAMES, ServerPool, make_coordinator, url_for
from .support.procs import Worker
from .support.servers import PrivateRedis


@pytest.fixture
def prefix() -> str:
    """At most 7 characters: slot keys then fit MySQL's 64-character limit."""
    return f"s{uuid.uuid4().hex[:5]}-"


async def _all_slots_free(url: str, prefix: str, name: str, limit: int) -> bool:
    """Whether a fresh coordinator gets every slot at once (nothing left held).

    Tried for up to 3 s: the backend release of a cancelled holder (or of a try granted
    as it was given up) still runs in its worker thread for a moment, while a slot left
    held stays held for the lock TTL (30 s) or for as long as its session lives.
    """
    async with make_coordinator(url, prefix) as fresh:
        semaphore = Semaphore(name, limit, coordinator=fresh)
        deadline = anyio.current_time() + 3
        while True:
            got = [await semaphore.acquire(blocking=False) for _ in range(limit)]
            for _ in range(sum(got)):
                await semaphore.release()
            if all(got) or anyio.current_time() > deadline:
                return all(got)
            await anyio.sleep(0.1)


def _peak(log: Path) -> int:
    """The most holders at once, from the entries ("+") and exits ("-") in file order."""
    inside = peak = 0
    for mark in log.read_text():
        inside += 1 if mark == "+" else -1
        peak = max(peak, inside)
    assert inside == 0
    return peak


# -- every backend --------------------------------------------------------------------------


async def test_limit_3_under_4_processes_of_5_tasks(
    any_backend_url: str, prefix: str, tmp_path: Path
) -> None:
    """3 worker processes and this one (on asyncio or trio), 5 tasks each, limit 3.

    The limit is never exceeded; that it is reached is made certain here: this
    process's tasks hold their first slot until three of them are inside at once
    (the workers' 30 ms holds alone reach it only by luck on a slow backend).
    """
    log = tmp_path / "log"
    log.write_text("")
    args = ("semaphore", any_backend_url, prefix, "api", "3", "5", "2", str(log))
    workers = [Worker(*args) for _ in range(3)]
    try:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        inside = 0
        three_inside = anyio.Event()

        async def one_task(semaphore: Semaphore) -> None:
            nonlocal inside
            for round_ in range(2):
                async with semaphore:
                    os.write(fd, b"+")
                    inside += 1
                    if inside == 3:
                        three_inside.set()
                    if round_ == 0:
                        # Never a deadlock: the workers release their slots within 30 ms
                        # and finish, so the third slot comes to one of these tasks.
                        await three_inside.wait()
                    await anyio.sleep(0.03)
                    inside -= 1
                    os.write(fd, b"-")

        try:
            async with make_coordinator(any_backend_url, prefix) as coordinator:
                semaphore = Semaphore("api", 3, coordinator=coordinator)
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as group:
                        for _ in range(5):
                            group.start_soon(one_task, semaphore)
                    for worker in workers:
                        await anyio.to_thread.run_sync(worker.finish, 60)
        finally:
            os.close(fd)
    finally:
        for worker in workers:
            worker.close()
    assert log.read_text().count("+") == 4 * 5 * 2
    assert three_inside.is_set()
    assert _peak(log) == 3
    assert await _all_slots_free(any_backend_url, prefix, "api", 3)


async def test_cancellation_storms_leave_no_slot_held(
    any_backend_url: str, prefix: str, seed: int
) -> None:
    """Tasks of two coordinators cancelled at random points of waiting and holding."""
    draw = random.Random(seed)
    inside = peak = 0
    entered = anyio.Event()

    async def storm(semaphore: Semaphore, patience: float) -> None:
        nonlocal inside, peak
        while True:
            with anyio.move_on_after(draw.uniform(0, patience)):
                async with semaphore:
                    inside += 1
                    peak = max(peak, inside)
                    entered.set()
                    try:
                        await anyio.sleep(draw.uniform(0, 0.03))
                    finally:
                        inside -= 1

    async with (
        make_coordinator(any_backend_url, prefix) as first,
        make_coordinator(any_backend_url, prefix) as second,
    ):
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for number in range(12):
                    coordinator = first if number % 2 else second
                    # Some cancelled soon, some given time for a first try on MySQL,
                    # which opens a connection per lock object (~0.1 s).
                    patience = 0.1 if number % 3 else 0.5
                    semaphore = Semaphore("storm", 3, coordinator=coordinator)
                    group.start_soon(storm, semaphore, patience)
                # A second of storm, and on until some task got in (on a loaded machine
                # a slow backend can let every patience run out for a while).
                await anyio.sleep(1.0)
                await entered.wait()
                group.cancel_scope.cancel()
        # Checked while both coordinators still run: a slot left held is held now.
        assert await _all_slots_free(any_backend_url, prefix, "storm", 3)
        for coordinator in (first, second):
            statistics = coordinator.statistics()
            assert statistics.locks_held == statistics.tasks_waiting == 0
            assert not coordinator._lock_table.semaphores
    assert 1 <= peak <= 3


# -- semantics (file backend, and Redis where it says) --------------------------------------


async def test_waiters_of_one_process_are_served_first_come_first_served(
    backend_url: str, prefix: str
) -> None:
    async with make_coordinator(backend_url, prefix) as coordinator:
        semaphore = Semaphore("fifo", 2, coordinator=coordinator)
        assert await semaphore.acquire() and await semaphore.acquire()
        order: list[int] = []

        async def wait(number: int) -> None:
            async with semaphore:
                order.append(number)
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as group:
            for number in range(8):
                group.start_soon(wait, number)
                await anyio.sleep(0.01)  # the first one is at the head by then
                with anyio.fail_after(5):  # in line before the next one comes
                    while coordinator.statistics().tasks_waiting < number:
                        await anyio.sleep(0.001)
            await semaphore.release()
            await semaphore.release()
    assert order == list(range(8))


async def test_budgets_and_limits(file_url: str, prefix: str) -> None:
    async with (
        make_coordinator(file_url, prefix) as first,
        make_coordinator(file_url, prefix) as second,
    ):
        holder = Semaphore("jobs", 2, coordinator=first)
        assert await holder.acquire(blocking=False)
        assert await holder.acquire(blocking=False)
        assert holder.held == 2
        assert not await holder.acquire(blocking=False)
        other = Semaphore("jobs", 2, coordinator=second)
        started = anyio.current_time()
        assert not await other.acquire(blocking=0.3)
        assert 0.25 <= anyio.current_time() - started < 3
        with pytest.raises(LockAcquireFailed, match="no slot of semaphore 'jobs'"):
            async with other(blocking=False):
                pass
        # A release wakes a waiter of another coordinator within the poll.
        async with anyio.create_task_group() as group:
            group.start_soon(holder.release)
            with anyio.fail_after(3):
                async with other(blocking=2.5) as entered:
                    assert entered is other and other.held == 1 and other.slot in (0, 1)
        await holder.release()
        assert holder.held == 0
        assert sorted(first.statistics().held_names + second.statistics().held_names) == []


async def test_slots_are_keys_no_lock_name_maps_to(file_url: str, prefix: str) -> None:
    names = ["jobs", "jobs (slot 0)", "jobs~0", slot_key("", "jobs", 0)]
    keys = {backend_key(prefix, name) for name in names}
    assert not keys & {slot_key(prefix, "jobs", index) for index in range(3)}
    # Lock keys hold at most one "~" and slot keys exactly two, for any name.
    for name in [*HOSTILE_NAMES, *names]:
        assert backend_key(prefix, name).count("~") <= 1
        assert slot_key(prefix, name, 999).count("~") == 2
        assert len(slot_key(prefix, name, 1000)) <= len(prefix) + 54
    async with make_coordinator(file_url, prefix) as coordinator:
        semaphore = Semaphore("jobs", 1, coordinator=coordinator)
        async with semaphore:
            for name in names:  # none of these locks is the slot
                async with coordinator.get_lock(name)(blocking=False):
                    pass
            assert coordinator.statistics().held_names == ("jobs (slot 0)",)


async def test_bad_arguments_are_refused(file_url: str) -> None:
    for limit in (0, -1, 1.5, True, "3", None, 1001):
        with pytest.raises(ConfigurationError, match="limit"):
            Semaphore("jobs", limit)  # type: ignore[arg-type]
    with pytest.raises(LockNameError):
        Semaphore("", 3)
    with pytest.raises(LockNameError, match="tenant"):
        Semaphore("api-{tenant}", 3, {})
    assert Semaphore("api-{tenant}", 3, {"tenant": "acme"}).name == "api-acme"
    semaphore = Semaphore("jobs", 3)
    with pytest.raises(ConfigurationError, match="blocking"):
        semaphore(blocking=-1)
    async with make_coordinator(file_url, "") as coordinator:
        semaphore = Semaphore("jobs", 3, coordinator=coordinator)
        with pytest.raises(ConfigurationError, match="blocking"):
            await semaphore.acquire(blocking="soon")  # type: ignore[arg-type]
        with pytest.raises(LockNotHeld):
            await semaphore.release()
        async with semaphore:
            with pytest.raises(LockNotHeld, match="async with"):
                await semaphore.release()  # the block releases its own slot
        with pytest.raises(LockNotHeld):
            _ = semaphore.slot


async def test_one_process_cannot_use_two_limits_for_a_name(file_url: str, prefix: str) -> None:
    async with make_coordinator(file_url, prefix) as coordinator:
        async with Semaphore("jobs", 2, coordinator=coordinator):
            with pytest.raises(ConfigurationError, match="limit 2 and with limit 3"):
                await Semaphore("jobs", 3, coordinator=coordinator).acquire()
        # Once nothing is held or waited for here, another limit is a fresh start.
        async with Semaphore("jobs", 3, coordinator=coordinator):
            pass


async def test_a_waiter_finds_a_larger_limit_elsewhere(file_url: str, prefix: str) -> None:
    async with (
        make_coordinator(file_url, prefix) as larger,
        make_coordinator(file_url, prefix) as smaller,
    ):
        three = Semaphore("jobs", 3, coordinator=larger)
        for _ in range(3):
            assert await three.acquire(blocking=False)
        started = anyio.current_time()
        with pytest.raises(ConfigurationError, match="larger than this one's 2"):
            await Semaphore("jobs", 2, coordinator=smaller).acquire(blocking=10)
        assert anyio.current_time() - started < 5
        for _ in range(3):
            await three.release()
    # The equal-limit case never raises: the probe of slot `limit` is released at once.
    async with (
        make_coordinator(file_url, prefix) as one,
        make_coordinator(file_url, prefix) as two,
    ):
        a, b = Semaphore("same", 1, coordinator=one), Semaphore("same", 1, coordinator=two)
        assert await a.acquire()
        assert not await b.acquire(blocking=1.5)  # probed at least once meanwhile
        await a.release()


async def test_postgresql_a_lock_sharing_the_probe_slots_advisory_lock_is_no_larger_limit(
    server_pool: ServerPool, tmp_path: Path, prefix: str
) -> None:
    """tooz maps every key to one of 65,536 advisory locks (two bytes of its MD5). An
    unrelated lock held on the advisory lock of slot ``limit`` made every waiting
    acquire of the semaphore raise a false "larger limit" ConfigurationError."""
    url = url_for("postgresql", server_pool, tmp_path)

    def advisory(key: str) -> bytes:
        return hashlib.md5(key.encode("ascii"), usedforsecurity=False).digest()[:2]

    probed = advisory(slot_key(prefix, "pool", 1))  # one past limit 1
    unrelated = next(
        name
        for name in (f"job-{number}" for number in range(1_000_000))
        if advisory(backend_key(prefix, name)) == probed
    )
    async with (
        make_coordinator(url, prefix) as elsewhere,
        make_coordinator(url, prefix) as holder,
        make_coordinator(url, prefix) as waiter,
    ):
        async with elsewhere.get_lock(unrelated), Semaphore("pool", 1, coordinator=holder):
            started = anyio.current_time()
            # Waits its budget out (probing meanwhile), and is not told of a larger limit.
            assert await Semaphore("pool", 1, coordinator=waiter).acquire(blocking=2.5) is False
            assert anyio.current_time() - started >= 2.5
        async with Semaphore("pool", 1, coordinator=waiter):
            pass


async def test_a_lost_slot_without_cancel_on_loss_lets_the_body_run(
    redis_url: str, prefix: str
) -> None:
    """Without cancel_on_loss the body runs on and is told through `lost`. (That a loss
    cancels the body, and stop() its holders and waiters: tests/test_conformance.py.)"""
    client = redis.Redis.from_url(redis_url)
    async with make_coordinator(redis_url, prefix, heartbeat=0.1) as coordinator:
        watched = Semaphore("watched", 1, coordinator=coordinator, cancel_on_loss=False)
        async with watched:
            assert not watched.lost
            key = slot_key(prefix, "watched", 0)
            client.delete(f"_tooz_{key}_lock".encode())
            with anyio.fail_after(5):
                await watched.wait_lost()
            assert watched.lost and watched.lost_reason
        assert coordinator.statistics().locks_held == 0
    client.close()


async def test_a_reconnect_cancels_holders_and_waiters_ride_it_out(
    private_redis: PrivateRedis, prefix: str
) -> None:
    async with make_coordinator(
        private_redis.url,
        prefix,
        heartbeat=0.1,
        initial_reconnect_backoff=0.05,
        max_reconnect_backoff=0.2,
    ) as coordinator:
        semaphore = Semaphore("outage", 1, coordinator=coordinator)
        outcomes: list[str] = []

        async def hold() -> None:
            try:
                async with semaphore:
                    outcomes.append("held")
                    await anyio.sleep(60)
            except LockLost as exc:
                outcomes.append(f"lost: {exc.reason}")

        async def wait() -> None:
            async with semaphore:
                outcomes.append("waiter held")

        async with anyio.create_task_group() as group:
            group.start_soon(hold)
            await anyio.sleep(0.1)
            group.start_soon(wait)
            await anyio.sleep(0.1)
            private_redis.kill()
            with anyio.fail_after(30):
                while coordinator.is_connected:
                    await anyio.sleep(0.05)
            with pytest.raises(BackendUnavailable, match="reconnecting"):
                await Semaphore("other", 1, coordinator=coordinator).acquire(blocking=False)
            assert not await Semaphore("other", 1, coordinator=coordinator).acquire(blocking=0.2)
            await anyio.sleep(0.3)  # a few reconnect attempts fail; the waiter waits on
            assert outcomes == ["held", "lost: the connection to the backend failed"]
            private_redis.start()
            with anyio.fail_after(30):
                await coordinator.wait_connected()
        assert outcomes[-1] == "waiter held"
        assert coordinator.statistics().locks_held == 0


async def test_a_slot_found_lost_at_its_release_raises_lock_lost(
    redis_url: str, prefix: str
) -> None:
    """As for a lock: a block whose slot the release finds taken (before any beat could
    tell) raises LockLost."""
    client = redis.Redis.from_url(redis_url)
    async with make_coordinator(redis_url, prefix, heartbeat=4) as coordinator:
        semaphore = Semaphore("taken", 1, coordinator=coordinator)
        with pytest.raises(LockLost, match="said at release"):
            async with semaphore:
                key = slot_key(prefix, "taken", semaphore.slot)
                client.set(f"_tooz_{key}_lock".encode(), b"someone-else", px=30_000)
    client.close()


async def test_a_release_inside_a_block_never_replaces_the_body_error(
    file_url: str, prefix: str
) -> None:
    """release() never takes a block's own slot (it raises LockNotHeld where it is
    called); the block's exit releases it, and the body's exception comes through."""
    async with make_coordinator(file_url, prefix) as coordinator:
        semaphore = Semaphore("early", 2, coordinator=coordinator)
        with pytest.raises(ValueError, match="the body's own"):
            async with semaphore:
                with pytest.raises(LockNotHeld):
                    await semaphore.release()
                raise ValueError("the body's own")
        assert coordinator.statistics().locks_held == 0
