"""A background job that runs on exactly one worker of a FastAPI service, and moves.

Every worker campaigns for the leadership "ticker" in the background (started by the
app's lifespan); the one that leads runs the job, which here appends a "tick" to a file
every 0.2 s. Kill that worker and another one takes the job over: at once on the file,
ipc, PostgreSQL and MySQL backends, within the lock TTL or session on Redis, memcached,
etcd and ZooKeeper (see docs/leadership.md). Serve it with several workers::

    pip install 'aiotooz[fastapi,redis]' uvicorn
    export AIOTOOZ_BACKEND_URL=redis://127.0.0.1:6379
    uvicorn --app-dir examples leader_fastapi:app --workers 2
    curl http://127.0.0.1:8000/leader

``TICKS_FILE`` is where the job writes and ``TICKER_LOCK_PREFIX`` the coordinator's
prefix. Run as a script (``python examples/leader_fastapi.py``), it starts
``uvicorn --workers 2`` on a free port and the default file backend, shows which worker
ticks, SIGKILLs it, shows the job move to the other worker, and stops uvicorn.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from fastapi import FastAPI

from aiotooz.fastapi import CoordinatorDep, run_coordinator

if TYPE_CHECKING:
    import httpx

TICKS_FILE = Path(
    os.environ.get("TICKS_FILE") or Path(tempfile.gettempdir()) / "aiotooz-example-ticks"
)


async def tick() -> None:
    """The job: what only one worker may do at a time (a scheduler, a cleaner...)."""
    ticks = anyio.Path(TICKS_FILE)
    while True:
        async with await ticks.open("a") as file:  # one short line per write
            await file.write(f"{os.getpid()} {time.time():.3f}\n")
        await anyio.sleep(0.2)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    prefix = os.environ.get("TICKER_LOCK_PREFIX", "ticker-")
    async with run_coordinator(app, prefix=prefix) as coordinator:
        async with anyio.create_task_group() as background:
            # Campaigns, runs tick() while leading, campaigns again after a loss;
            # returns only when cancelled (at shutdown, below).
            background.start_soon(coordinator.run_as_leader, "ticker", tick)
            yield
            background.cancel_scope.cancel()


app = FastAPI(title="ticker", lifespan=lifespan)


@app.get("/leader")
async def leader(coordinator: CoordinatorDep) -> dict[str, object]:
    """Who leads "ticker" now, asked of the backend by whichever worker answers."""
    return {
        "worker_pid": os.getpid(),
        "worker_member_id": coordinator.member_id,
        "leader": await coordinator.leader("ticker"),
    }


# -- the demonstration: python examples/leader_fastapi.py ----------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tickers(since: float) -> list[int]:
    """The pids that ticked since ``since``, in order of their first tick."""
    seen: list[int] = []
    for line in TICKS_FILE.read_text().splitlines() if TICKS_FILE.exists() else []:
        pid, stamp = line.split()
        if float(stamp) >= since and int(pid) not in seen:
            seen.append(int(pid))
    return seen


def wait_until(condition: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {within} s")
        time.sleep(0.05)


def first_tick_of(pid: int) -> float:
    lines = TICKS_FILE.read_text().splitlines()
    return min(float(line.split()[1]) for line in lines if int(line.split()[0]) == pid)


def answers(client: httpx.Client) -> bool:
    import httpx

    try:
        return client.get("/leader").status_code == 200
    except httpx.TransportError:
        return False


def main() -> None:
    import httpx

    global TICKS_FILE
    with tempfile.TemporaryDirectory() as tmp:
        TICKS_FILE = Path(tmp) / "ticks"
        port = free_port()
        env = {
            **os.environ,
            "TICKS_FILE": str(TICKS_FILE),
            # A prefix of this run's own, so runs side by side do not share the lock.
            "TICKER_LOCK_PREFIX": f"tk{uuid.uuid4().hex[:5]}-",
        }
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).parent)]
        command += ["leader_fastapi:app", "--workers", "2", "--port", str(port)]
        command += ["--log-level", "warning"]
        server = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            wait_until(lambda: tickers(0), 60, "the first tick")
            first = tickers(0)[0]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                wait_until(lambda: answers(client), 30, "uvicorn to answer")
                print("asked a worker:", client.get("/leader").json())
            print(f"worker {first} leads and ticks; the other worker waits")
            time.sleep(1)
            assert tickers(time.time() - 0.9) == [first], "two workers ticked at once"

            os.kill(first, signal.SIGKILL)
            killed = time.time()
            print(f"SIGKILLed worker {first}")
            wait_until(lambda: tickers(killed), 30, "another worker to tick")
            second = tickers(killed)[0]
            assert second != first
            moved = first_tick_of(second) - killed
            print(f"worker {second} took the job over {moved:.2f} s after the kill")
            time.sleep(1)
            assert tickers(time.time() - 0.9) == [second], "two workers ticked at once"
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                answer = client.get("/leader").json()
            print("asked a worker:", answer)
        finally:
            server.send_signal(signal.SIGINT)  # uvicorn shuts its workers down
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        print("uvicorn stopped")


if __name__ == "__main__":
    main()
