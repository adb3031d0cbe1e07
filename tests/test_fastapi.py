"""aiotooz.fastapi in-process (asyncio and trio), and the example served by uvicorn."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

import aiotooz
from aiotooz import CoordinationSettings, Coordinator, LockCreationFailed, synchronized
from aiotooz.fastapi import (
    STATE_ATTRIBUTE,
    CoordinatorDep,
    coordinator_lifespan,
    get_coordinator,
    run_coordinator,
)

from .support.servers import free_port

EXAMPLES = Path(__file__).parent.parent / "examples"


def lifespan_of(app: FastAPI) -> AbstractAsyncContextManager[Any]:
    """Run the app's lifespan as a server would (httpx's ASGITransport does not)."""
    return app.router.lifespan_context(app)


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


def make_app(url: str, prefix: str) -> FastAPI:
    settings = CoordinationSettings(backend_url=url)
    app = FastAPI(lifespan=coordinator_lifespan(prefix=prefix, settings=settings))

    @app.get("/who")
    async def who(coordinator: CoordinatorDep) -> dict[str, Any]:
        return {"member_id": coordinator.member_id, "connected": coordinator.is_connected}

    return app


@pytest.fixture(autouse=True)
def no_default_coordinator() -> Iterator[None]:
    previous = aiotooz.set_default_coordinator(None)
    yield
    aiotooz.set_default_coordinator(previous)


async def test_lifespan_runs_the_coordinator_with_the_app(backend_url: str, prefix: str) -> None:
    app = make_app(backend_url, prefix)
    async with lifespan_of(app):
        coordinator = getattr(app.state, STATE_ATTRIBUTE)
        assert isinstance(coordinator, Coordinator)
        assert coordinator.is_started and coordinator.prefix == prefix
        assert aiotooz.get_default_coordinator() is coordinator
        async with client(app) as http:
            response = await http.get("/who")
        assert response.json() == {"member_id": coordinator.member_id, "connected": True}
    assert not coordinator.is_started
    assert not hasattr(app.state, STATE_ATTRIBUTE)
    with pytest.raises(LockCreationFailed, match="no default coordinator installed"):
        aiotooz.get_default_coordinator()


async def test_synchronized_endpoints_use_the_apps_coordinator(file_url: str, prefix: str) -> None:
    app = make_app(file_url, prefix)
    inside = 0
    most = 0

    @synchronized("item-{item}")
    async def work(item: str) -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await anyio.sleep(0.05)
        inside -= 1

    @app.post("/items/{item}")
    async def post(item: str) -> None:
        await work(item)

    async with lifespan_of(app), client(app) as http, anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(http.post, "/items/a")
    assert most == 1


async def test_shutdown_releases_locks_still_held(redis_url: str, prefix: str) -> None:
    app = make_app(redis_url, prefix)
    entered = anyio.Event()

    @app.post("/hold")
    async def hold(coordinator: CoordinatorDep) -> None:
        lock = coordinator.get_lock("held")
        await lock.acquire()
        entered.set()
        await anyio.sleep_forever()

    other = Coordinator(prefix=prefix, settings=CoordinationSettings(backend_url=redis_url))
    async with other, anyio.create_task_group() as group:
        async with lifespan_of(app), client(app) as http:
            group.start_soon(http.post, "/hold")
            await entered.wait()
            assert not await other.get_lock("held").acquire(blocking=False)
        # The app stopped while the request still held the lock: stop() released it,
        # long before Redis's 30 s TTL would have.
        lock = other.get_lock("held")
        assert await lock.acquire(blocking=False)
        await lock.release()
        group.cancel_scope.cancel()


async def test_run_coordinator_inside_an_apps_own_lifespan(file_url: str, prefix: str) -> None:
    seen: list[Coordinator] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = CoordinationSettings(backend_url=file_url)
        async with run_coordinator(app, prefix=prefix, settings=settings, set_default=False) as c:
            seen.append(c)
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/member")
    async def member(coordinator: CoordinatorDep) -> str:
        return coordinator.member_id

    async with lifespan_of(app), client(app) as http:
        assert (await http.get("/member")).json() == seen[0].member_id
        with pytest.raises(LockCreationFailed):
            aiotooz.get_default_coordinator()


async def test_the_dependency_falls_back_to_the_default_coordinator(
    file_url: str, prefix: str
) -> None:
    app = FastAPI()  # no lifespan: a sub-application, say

    @app.get("/member")
    async def member(coordinator: CoordinatorDep) -> str:
        return coordinator.member_id

    async with client(app) as http:
        with pytest.raises(LockCreationFailed, match="set_default_coordinator"):
            await http.get("/member")
        settings = CoordinationSettings(backend_url=file_url)
        async with Coordinator(prefix=prefix, settings=settings) as coordinator:
            aiotooz.set_default_coordinator(coordinator)
            assert (await http.get("/member")).json() == coordinator.member_id
            assert get_coordinator.__doc__


async def test_a_backend_down_at_startup_fails_the_startup(prefix: str) -> None:
    app = make_app(f"redis://127.0.0.1:{free_port()}", prefix)
    with pytest.raises(aiotooz.BackendUnavailable):
        async with lifespan_of(app):
            pass


# -- the example, served by uvicorn with two worker processes -------------------------


@pytest.fixture
def uvicorn_server(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[tuple[str, Path]]:
    """examples/fastapi_app.py under ``uvicorn --workers 2``, on Redis; yields its URL."""
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTOOZ_")}
    env.update(
        AIOTOOZ_BACKEND_URL=redis_url,
        COUNTERS_DIR=str(tmp_path / "counters"),
        COUNTERS_LOCK_PREFIX=prefix,
    )
    with log.open("w") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "fastapi_app:app",
             "--workers", "2", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own process group, so that the workers can be cleaned up with it.
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"uvicorn exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"not ready in 90 s: {log.read_text()}"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"uvicorn did not stop on SIGTERM: {log.read_text()}") from None
    assert status == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_two_uvicorn_workers_take_turns_per_counter(uvicorn_server: tuple[str, Path]) -> None:
    url, _ = uvicorn_server
    names = ["apples"] * 4 + ["pears"] * 4
    results: list[dict[str, Any]] = []

    def increment(name: str) -> dict[str, Any]:
        # A connection per request, so that both workers' accept() calls get some.
        response = httpx.post(f"{url}/counters/{name}/increment?work=0.3", timeout=60)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    with ThreadPoolExecutor(len(names)) as pool:
        for _ in range(10):
            results += pool.map(increment, names)
            by_name = defaultdict(set)
            for result in results:
                by_name[result["name"]].add(result["pid"])
            if all(len(pids) == 2 for pids in by_name.values()):
                break
    pids = {result["pid"] for result in results}
    assert len(pids) == 2, f"one worker served every request: {pids}"

    for name in ("apples", "pears"):
        mine = sorted((r for r in results if r["name"] == name), key=lambda r: r["entered"])
        assert len({r["pid"] for r in mine}) == 2, f"{name} was served by one worker only"
        # Critical sections of one counter never overlap, whichever worker ran them...
        for before, after in itertools.pairwise(mine):
            assert before["left"] <= after["entered"], (name, before, after)
        # ...and so no increment is lost.
        assert [r["value"] for r in mine] == list(range(1, len(mine) + 1))
        final = httpx.get(f"{url}/counters/{name}", timeout=30).json()
        assert final == {"name": name, "value": len(mine)}

    # Different counters were incremented at the same time.
    apples = [r for r in results if r["name"] == "apples"]
    pears = [r for r in results if r["name"] == "pears"]
    assert any(
        a["entered"] < p["left"] and p["entered"] < a["left"] for a in apples for p in pears
    ), "different counters never ran side by side"


def test_the_example_reports_readiness(uvicorn_server: tuple[str, Path]) -> None:
    url, _ = uvicorn_server
    response = httpx.get(f"{url}/ready", timeout=30)
    assert (response.status_code, response.json()) == (200, {"connected": True})
    bad = httpx.post(f"{url}/counters/../increment", timeout=30)
    assert bad.status_code in {404, 422}


def test_the_example_runs_as_a_script(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTOOZ_")}
    env["AIOTOOZ_BACKEND_URL"] = (tmp_path / "locks").as_uri()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "fastapi_app.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "ready: {'connected': True}" in done.stdout
    assert "apples = 3" in done.stdout and "pears = 3" in done.stdout
