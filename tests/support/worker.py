"""A separate process for the cross-process tests: python worker.py COMMAND URL PREFIX NAME ...

Driven through tests/support/procs.py. Every command that waits for a lock prints "waiting"
first; stdout carries only the protocol's lines (logs go to stderr).

Commands:
  count URL PREFIX NAME COUNTER TASKS ROUNDS   read-sleep-write increments under the lock
  hold URL PREFIX NAME                         take the lock, print "held", hold until stdin closes
  hold-many URL PREFIX NAME COUNT              like hold, for locks NAME-0 .. NAME-(COUNT-1)
  serve URL PREFIX NAME                        on each stdin line "acquire" take the lock (waiting
                                               as long as it takes) and print "held"; on
                                               "release" release it and print "released"; stop
                                               at the end of input (times hand-offs without
                                               process start-up)
  hold-slots URL PREFIX NAME LIMIT             take every slot of Semaphore(NAME, LIMIT), print
                                               "held"; on each stdin line release one and print
                                               "released"; release the rest at the end of input
  try URL PREFIX NAME                          print "acquired" or "busy" for one blocking=False try
  grant URL PREFIX NAME                        wait for the lock; print when (wall clock) granted
  tooz-hold URL PREFIX NAME                    like hold, with plain tooz and key PREFIX+NAME
  hold-fenced URL PREFIX NAME                  take the lock with fencing (heartbeat 0.3 s), print
                                               "held MEMBER TOKEN", hold it until stdin closes
                                               (print "released") or it is lost (print "lost
                                               REASON")
  fence URL PREFIX NAME TIMES                  take the lock with fencing TIMES times (one
                                               coordinator); print each grant's token
  semaphore URL PREFIX NAME LIMIT TASKS ROUNDS LOG
                                               TASKS tasks enter Semaphore(NAME, LIMIT) ROUNDS
                                               times each, appending "+" to LOG once inside
                                               and "-" before leaving (one write each)
  rwlock URL PREFIX NAME SECONDS LOG          three reader tasks and one writer of RWLock(NAME,
                                               fencing=True) for SECONDS, logging to LOG
                                               (tests/support/rwmix.py)
  campaign URL PREFIX NAME RECORD LOOP         print "member ID", then run_as_leader(NAME) on the
                                               anyio backend LOOP (heartbeat 0.3 s); the job
                                               appends "begin ID TOKEN TIME" to the file RECORD,
                                               then "alive ID TOKEN TIME" every 50 ms; stop at
                                               the end of input
  once URL PREFIX NAME EVERY LOG FINISH LOOP   on the anyio backend LOOP, print "ready", read
                                               "go START END" (wall clock), then call a job
                                               decorated with once_per(NAME, EVERY) every
                                               0.1 s from START to END; the job appends
                                               "W0 W1 PID TOKEN" to LOG (W0: the window before
                                               the call, W1: at the job's start, in seconds
                                               since 1970) and prints "ran W1". FINISH: "at-
                                               most-once", or "finish-required"; with "hang-
                                               first", also the first run of all (LOG empty)
                                               hangs until it is killed
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import structlog

from aiotooz import (
    CoordinationSettings,
    Coordinator,
    Lock,
    LockLost,
    RWLock,
    Semaphore,
    fencing_token,
    once_per,
)

# Keep stdout for the protocol with the test ("held", "acquired", "busy").
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    logger_factory=structlog.PrintLoggerFactory(sys.stderr),
)


def _coordinator(url: str, prefix: str) -> Coordinator:
    return Coordinator(prefix=prefix, settings=CoordinationSettings(backend_url=url))


async def count(url: str, prefix: str, name: str, counter: str, tasks: str, rounds: str) -> None:
    path = Path(counter)

    async def one_task() -> None:
        for _ in range(int(rounds)):
            async with Lock(name, coordinator=coordinator):
                value = int(path.read_text())
                await anyio.sleep(0.001)  # widen the window a missing lock would expose
                path.write_text(str(value + 1))

    async with _coordinator(url, prefix) as coordinator, anyio.create_task_group() as group:
        for _ in range(int(tasks)):
            group.start_soon(one_task)


async def hold(url: str, prefix: str, name: str) -> None:
    async with _coordinator(url, prefix) as coordinator:
        print("waiting", flush=True)
        async with Lock(name, coordinator=coordinator):
            print("held", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)


async def hold_fenced(url: str, prefix: str, name: str) -> None:
    settings = CoordinationSettings(backend_url=url, heartbeat=0.3)
    async with Coordinator(prefix=prefix, settings=settings) as coordinator:
        try:
            async with Lock(name, coordinator=coordinator, fencing=True) as lock:
                print(f"held {coordinator.member_id} {lock.fencing_token}", flush=True)
                await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            print("released", flush=True)
        except LockLost as lost:
            print(f"lost {lost.reason}", flush=True)


async def hold_many(url: str, prefix: str, name: str, count: str) -> None:
    async with _coordinator(url, prefix) as coordinator, contextlib.AsyncExitStack() as stack:
        print("waiting", flush=True)
        for number in range(int(count)):
            await stack.enter_async_context(Lock(f"{name}-{number}", coordinator=coordinator))
        print("held", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)


async def hold_slots(url: str, prefix: str, name: str, limit: str) -> None:
    async with _coordinator(url, prefix) as coordinator:
        semaphore = Semaphore(name, int(limit), coordinator=coordinator)
        print("waiting", flush=True)
        for _ in range(int(limit)):
            await semaphore.acquire()
        print("held", flush=True)
        while await anyio.to_thread.run_sync(sys.stdin.readline):
            await semaphore.release()
            print("released", flush=True)
        while semaphore.held:
            await semaphore.release()


async def serve(url: str, prefix: str, name: str) -> None:
    async with _coordinator(url, prefix) as coordinator:
        lock = Lock(name, coordinator=coordinator)
        while line := await anyio.to_thread.run_sync(sys.stdin.readline):
            if line.strip() == "acquire":
                await lock.acquire()
                print("held", flush=True)
            elif line.strip() == "release":
                await lock.release()
                print("released", flush=True)


async def try_once(url: str, prefix: str, name: str) -> None:
    async with _coordinator(url, prefix) as coordinator:
        lock = Lock(name, coordinator=coordinator)
        if await lock.acquire(blocking=False):
            print("acquired", flush=True)
            await lock.release()
        else:
            print("busy", flush=True)


async def grant(url: str, prefix: str, name: str, warm: str = "") -> None:
    async with _coordinator(url, prefix) as coordinator:
        if warm:
            # Made and connected before "waiting": the clients a first try makes (a
            # cluster's map and node connections) are not part of the wait measured.
            async with Lock(f"{name}-warm-up", coordinator=coordinator):
                pass
        print("waiting", flush=True)
        async with Lock(name, coordinator=coordinator):
            print(f"{time.time():.6f}", flush=True)


async def fence(url: str, prefix: str, name: str, times: str) -> None:
    async with _coordinator(url, prefix) as coordinator:
        for _ in range(int(times)):
            async with Lock(name, coordinator=coordinator, fencing=True) as lock:
                print(lock.fencing_token, flush=True)


async def semaphore(
    url: str, prefix: str, name: str, limit: str, tasks: str, rounds: str, log: str
) -> None:
    # O_APPEND: each one-byte write lands whole, in the order the writes happen, so the
    # file's order of "+" and "-" is an order in time of every process's entries and exits.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)

    async def one_task(semaphore: Semaphore) -> None:
        for _ in range(int(rounds)):
            async with semaphore:
                os.write(fd, b"+")
                await anyio.sleep(0.03)
                os.write(fd, b"-")

    try:
        async with _coordinator(url, prefix) as coordinator:
            shared = Semaphore(name, int(limit), coordinator=coordinator)
            async with anyio.create_task_group() as group:
                for _ in range(int(tasks)):
                    group.start_soon(one_task, shared)
    finally:
        os.close(fd)


async def rwlock(url: str, prefix: str, name: str, seconds: str, log: str) -> None:
    # This script runs as a file, so the repository root is put on the path to import
    # from its package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.rwmix import run_mix

    async with _coordinator(url, prefix) as coordinator:
        await run_mix(RWLock(name, coordinator=coordinator, fencing=True), log, float(seconds))


async def campaign(url: str, prefix: str, name: str, record: str) -> None:
    settings = CoordinationSettings(backend_url=url, heartbeat=0.3)
    async with Coordinator(prefix=prefix, settings=settings) as coordinator:
        member = coordinator.member_id
        print(f"member {member}", flush=True)

        def note(what: str, token: int) -> None:
            # One write with O_APPEND: lines of several processes never interleave.
            fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{what} {member} {token} {time.time():.6f}\n".encode())
            finally:
                os.close(fd)

        async def job() -> None:
            token = fencing_token()  # the term's: its lock is the task's fenced lock
            note("begin", token)
            while True:
                await anyio.sleep(0.05)
                note("alive", token)

        async with anyio.create_task_group() as group:
            group.start_soon(coordinator.run_as_leader, name, job)
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            group.cancel_scope.cancel()


async def once(url: str, prefix: str, name: str, every: str, log: str, finish: str) -> None:
    period = float(every)
    # A loaded machine starts four of these at once: connecting may take longer than 5 s.
    settings = CoordinationSettings(backend_url=url, call_timeout=20)
    async with Coordinator(prefix=prefix, settings=settings) as coordinator:

        @once_per(name, period, coordinator=coordinator, finish_required=finish != "at-most-once")
        async def job(before: float) -> None:
            started = time.time() // period * period
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                first = os.fstat(fd).st_size == 0
                # One write with O_APPEND: lines of several processes never interleave.
                line = f"{before:.0f} {started:.0f} {os.getpid()} {fencing_token()}\n"
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            print(f"ran {started:.0f}", flush=True)
            if finish == "hang-first" and first:
                await anyio.sleep_forever()

        print("ready", flush=True)
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        _, start, end = line.split()
        await anyio.sleep(max(0.0, float(start) - time.time()))
        while time.time() < float(end):
            await job(time.time() // period * period)
            await anyio.sleep(0.1)


def tooz_hold(url: str, prefix: str, name: str) -> None:
    from tooz import coordination

    driver = coordination.get_coordinator(url, b"plain-tooz")
    driver.start()
    lock = driver.get_lock((prefix + name).encode("ascii"))
    print("waiting", flush=True)
    assert lock.acquire(blocking=True)
    print("held", flush=True)
    sys.stdin.read()
    lock.release()
    driver.stop()


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "tooz-hold":
        tooz_hold(*args)
        return
    if command == "campaign":
        url, prefix, name, record, loop = args
        anyio.run(campaign, url, prefix, name, record, backend=loop)
        return
    if command == "once":
        url, prefix, name, every, log, finish, loop = args
        anyio.run(once, url, prefix, name, every, log, finish, backend=loop)
        return
    commands: dict[str, Callable[..., Awaitable[None]]] = {
        "count": count,
        "hold": hold,
        "hold-many": hold_many,
        "hold-fenced": hold_fenced,
        "hold-slots": hold_slots,
        "serve": serve,
        "try": try_once,
        "grant": grant,
        "fence": fence,
        "semaphore": semaphore,
        "rwlock": rwlock,
    }
    anyio.run(commands[command], *args)


if __name__ == "__main__":
    main()
