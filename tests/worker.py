"""A separate process for the cross-process tests: python worker.py COMMAND URL PREFIX NAME ...

Driven through tests/_procs.py. Every command that waits for a lock prints "waiting"
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
  try URL PREFIX NAME                          print "acquired" or "busy" for one blocking=False try
  grant URL PREFIX NAME                        wait for the lock; print when (wall clock) granted
  tooz-hold URL PREFIX NAME                    like hold, with plain tooz and key PREFIX+NAME
  fence URL PREFIX NAME TIMES                  take the lock with fencing TIMES times (one
                                               coordinator); print each grant's token
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import structlog

from aiotooz import CoordinationSettings, Coordinator, Lock

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


async def hold_many(url: str, prefix: str, name: str, count: str) -> None:
    async with _coordinator(url, prefix) as coordinator, contextlib.AsyncExitStack() as stack:
        print("waiting", flush=True)
        for number in range(int(count)):
            await stack.enter_async_context(Lock(f"{name}-{number}", coordinator=coordinator))
        print("held", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)


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


async def grant(url: str, prefix: str, name: str) -> None:
    async with _coordinator(url, prefix) as coordinator:
        print("waiting", flush=True)
        async with Lock(name, coordinator=coordinator):
            print(f"{time.time():.6f}", flush=True)


async def fence(url: str, prefix: str, name: str, times: str) -> None:
    async with _coordinator(url, prefix) as coordinator:
        for _ in range(int(times)):
            async with Lock(name, coordinator=coordinator, fencing=True) as lock:
                print(lock.fencing_token, flush=True)


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
    commands: dict[str, Callable[..., Awaitable[None]]] = {
        "count": count,
        "hold": hold,
        "hold-many": hold_many,
        "serve": serve,
        "try": try_once,
        "grant": grant,
        "fence": fence,
    }
    anyio.run(commands[command], *args)


if __name__ == "__main__":
    main()
