"""A lock holder in a separate process, driven line by line: python _holder.py URL PREFIX NAME.

On "acquire" it takes the lock (waiting as long as it takes) and prints "held"; on
"release" it releases it and prints "released"; at the end of its input it stops. The
conformance suite uses it to time cross-process hand-offs without process start-up.
"""

from __future__ import annotations

import logging
import sys

import anyio
import structlog

from aiotooz import CoordinationSettings, Coordinator

structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    logger_factory=structlog.PrintLoggerFactory(sys.stderr),
)


async def main(url: str, prefix: str, name: str) -> None:
    settings = CoordinationSettings(backend_url=url)
    async with Coordinator(prefix=prefix, settings=settings) as coordinator:
        lock = coordinator.get_lock(name)
        while line := await anyio.to_thread.run_sync(sys.stdin.readline):
            if line.strip() == "acquire":
                await lock.acquire()
                print("held", flush=True)
            elif line.strip() == "release":
                await lock.release()
                print("released", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3])
