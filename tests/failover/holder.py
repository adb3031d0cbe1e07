"""A holder for the failover scenarios: python holder.py URL PREFIX NAME HOLDER DIRECTORY.

Until ``DIRECTORY/stop`` exists: take the lock with a fencing token, record ``enter``,
write to the fenced store a few times, record ``exit`` and release; on LockLost record
``exit how=lost``; on any other error record it and try again. Prints "started" once
the coordinator is up. Logs go to stderr.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import anyio
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.support.checker

from aiotooz import CoordinationSettings, Coordinator, Lock, LockLost
from tests.support.checker import Recorder, StoreClient

structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    logger_factory=structlog.PrintLoggerFactory(sys.stderr),
)

#: Writes per section and the pause between them: a section lasts about 2.5 s, longer than
#: the scenarios' 2 s lock TTL, so that a fault finds the holder inside it.
WRITES = 25
WRITE_EVERY = 0.1


async def hold(url: str, prefix: str, name: str, holder: str, directory: str) -> None:
    shared = Path(directory)
    stop = shared / "stop"
    recorder = Recorder(shared, holder)
    store = StoreClient(shared)
    settings = CoordinationSettings(
        backend_url=url,
        heartbeat=0.5,
        call_timeout=2.0,
        initial_reconnect_backoff=0.1,
        max_reconnect_backoff=0.5,
    )
    async with Coordinator(prefix=prefix, settings=settings) as coordinator:
        print("started", flush=True)
        while not stop.exists():
            lock = Lock(name, coordinator=coordinator, fencing=True)
            inside = False
            try:
                async with lock(blocking=5):  # a long wait is recorded and retried
                    token = lock.fencing_token
                    inside = True
                    recorder.record("enter", token=token)
                    try:
                        for _ in range(WRITES):
                            store.write(holder, token)
                            await anyio.sleep(WRITE_EVERY)
                            if stop.exists():
                                break
                    except anyio.get_cancelled_exc_class():
                        # Told: the body is cancelled now. LockLost itself comes out of
                        # the block only after the release, which may wait for the backend.
                        if lock.lost:
                            recorder.record("exit", how="lost", reason=lock.lost_reason)
                            inside = False
                        raise
                    # The section ends here; the release that follows is not part of it.
                    recorder.record("exit", how="released")
                    inside = False
            except LockLost as exc:
                if inside:
                    recorder.record("exit", how="lost", reason=exc.reason)
                else:
                    recorder.record("error", error=f"LockLost raised: {exc.reason}")
            except Exception as exc:
                if inside:
                    recorder.record("exit", how="error", error=repr(exc)[:200])
                else:
                    recorder.record("error", error=repr(exc)[:200])
                await anyio.sleep(0.2)
            await anyio.sleep(0.01)  # let the others in
    recorder.close()
    store.close()


def main() -> None:
    url, prefix, name, holder, directory = sys.argv[1:]
    anyio.run(hold, url, prefix, name, holder, directory)


if __name__ == "__main__":
    main()
