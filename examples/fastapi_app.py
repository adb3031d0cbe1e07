"""A small FastAPI service whose counters are updated under a distributed lock.

Each increment reads a counter's file, does some slow work, and writes the counter back.
Without a lock, two requests for one counter would both read 3 and both write 4.
``@synchronized("counter-{name}")`` makes the increments of one counter take turns
across every worker process (and every machine, on a shared backend), while different
counters are incremented side by side. Serve it with several workers::

    pip install 'aiotooz[fastapi,redis]' uvicorn
    export AIOTOOZ_BACKEND_URL=redis://127.0.0.1:6379
    uvicorn --app-dir examples fastapi_app:app --workers 2
    curl -X POST 'http://127.0.0.1:8000/counters/apples/increment?work=0.2'
    curl http://127.0.0.1:8000/ready

``COUNTERS_DIR`` is where the counters live (one file each) and ``COUNTERS_LOCK_PREFIX``
the coordinator's prefix. Run as a script (``python examples/fastapi_app.py``), it serves
the app in-process on the default file backend, sends it concurrent requests through
httpx, and prints what happened.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from aiotooz import LockAcquireFailed, synchronized
from aiotooz.fastapi import CoordinatorDep, coordinator_lifespan

COUNTERS_DIR = Path(
    os.environ.get("COUNTERS_DIR") or Path(tempfile.gettempdir()) / "aiotooz-example-counters"
)

app = FastAPI(
    title="counters",
    lifespan=coordinator_lifespan(prefix=os.environ.get("COUNTERS_LOCK_PREFIX", "counters-")),
)

CounterName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class Increment(BaseModel):
    """What one increment did, and when it held the counter's lock."""

    name: str
    value: int
    pid: int
    entered: float
    left: float


class Counter(BaseModel):
    """A counter's current value."""

    name: str
    value: int


async def read_counter(name: str) -> int:
    path = anyio.Path(COUNTERS_DIR / name)
    return int(await path.read_text()) if await path.exists() else 0


# One lock per counter; waits at most 30 s, then the request gets a 503.
@synchronized("counter-{name}", blocking=30)
async def increment_counter(name: str, work: float) -> Increment:
    entered = time.time()
    value = await read_counter(name) + 1
    await anyio.sleep(work)  # the slow part: a real service calls something here
    await anyio.Path(COUNTERS_DIR).mkdir(parents=True, exist_ok=True)
    await anyio.Path(COUNTERS_DIR / name).write_text(str(value))
    return Increment(name=name, value=value, pid=os.getpid(), entered=entered, left=time.time())


@app.post("/counters/{name}/increment")
async def increment(name: CounterName, work: float = 0.0) -> Increment:
    return await increment_counter(name, min(max(work, 0.0), 10.0))


@app.get("/counters/{name}")
async def get_counter(name: CounterName) -> Counter:
    return Counter(name=name, value=await read_counter(name))


@app.get("/ready")
async def ready(coordinator: CoordinatorDep) -> JSONResponse:
    connected = coordinator.is_connected
    return JSONResponse({"connected": connected}, status_code=200 if connected else 503)


@app.exception_handler(LockAcquireFailed)
async def busy(request: Request, exc: LockAcquireFailed) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def main() -> None:
    import httpx

    global COUNTERS_DIR
    with tempfile.TemporaryDirectory() as tmp:
        COUNTERS_DIR = Path(tmp)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                print("ready:", (await client.get("/ready")).json())
                results: list[Increment] = []

                async def bump(name: str) -> None:
                    response = await client.post(f"/counters/{name}/increment?work=0.1")
                    response.raise_for_status()
                    results.append(Increment.model_validate(response.json()))

                started = time.time()
                async with anyio.create_task_group() as group:
                    for name in ("apples", "apples", "apples", "pears", "pears", "pears"):
                        group.start_soon(bump, name)
                for result in sorted(results, key=lambda r: (r.name, r.entered)):
                    print(
                        f"{result.name}: -> {result.value}, held the lock from "
                        f"{result.entered - started:.2f} s to {result.left - started:.2f} s"
                    )
                for name in ("apples", "pears"):
                    counter = Counter.model_validate((await client.get(f"/counters/{name}")).json())
                    print(f"{name} = {counter.value}")
                    assert counter.value == 3, "an increment was lost"


if __name__ == "__main__":
    anyio.run(main)
