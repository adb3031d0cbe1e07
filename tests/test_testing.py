"""aiotooz.testing: the helper in-process, and the pytest plugin as a user's project uses it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import aiotooz
from aiotooz import LockCreationFailed
from aiotooz.testing import temporary_coordinator


@pytest.fixture(autouse=True)
def no_default_coordinator() -> Iterator[None]:
    previous = aiotooz.set_default_coordinator(None)
    yield
    aiotooz.set_default_coordinator(previous)


async def test_temporary_coordinator_is_started_and_the_default() -> None:
    async with temporary_coordinator(prefix="t-") as coordinator:
        assert coordinator.is_connected
        assert coordinator.settings.scheme == "file"
        assert aiotooz.get_default_coordinator() is coordinator
        directory = anyio.Path(coordinator.settings.backend_url.removeprefix("file://"))
        assert await directory.is_dir()
        async with aiotooz.Lock("x"):
            pass
    assert not coordinator.is_started
    assert not await directory.exists()
    with pytest.raises(LockCreationFailed):
        aiotooz.get_default_coordinator()


async def test_temporary_coordinator_puts_the_previous_default_back(tmp_path: Path) -> None:
    async with temporary_coordinator(directory=tmp_path) as outer:
        async with temporary_coordinator(directory=tmp_path) as inner:
            assert aiotooz.get_default_coordinator() is inner
        assert aiotooz.get_default_coordinator() is outer
        async with temporary_coordinator(directory=tmp_path, set_default=False):
            assert aiotooz.get_default_coordinator() is outer


async def test_coordinators_on_one_directory_exclude_each_other(tmp_path: Path) -> None:
    async with (
        temporary_coordinator(directory=tmp_path) as one,
        temporary_coordinator(directory=tmp_path, set_default=False) as two,
    ):
        async with one.get_lock("shared"):
            assert not await two.get_lock("shared").acquire(blocking=False)
        lock = two.get_lock("shared")
        assert await lock.acquire(blocking=False)
        await lock.release()
    assert await anyio.Path(tmp_path).is_dir()  # a directory given is the caller's: kept


CONFTEST = """\
import anyio
import pytest

pytest_plugins = ["aiotooz.testing"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
"""

USER_TESTS = """\
import anyio
import anyio
import pytest

import aiotooz
from aiotooz import LockAcquireFailed, synchronized

inside = 0
most = 0


@synchronized("resize-{share}")
async def resize(share: str) -> None:
    global inside, most
    inside += 1
    most = max(most, inside)
    await anyio.sleep(0.02)
    inside -= 1


@synchronized("resize-{share}", blocking=False)
async def resize_now(share: str) -> str:
    return "resized"


@pytest.mark.anyio
async def test_resizes_of_one_share_take_turns(aiotooz_coordinator):
    global most
    most = 0
    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(resize, "a")
    assert most == 1


@pytest.mark.anyio
async def test_busy_share_is_refused(aiotooz_coordinator, aiotooz_peer):
    assert aiotooz.get_default_coordinator() is aiotooz_coordinator
    async with aiotooz_peer.get_lock("resize-a"):
        with pytest.raises(LockAcquireFailed):
            await resize_now("a")
    assert await resize_now("a") == "resized"


@pytest.mark.anyio
async def test_backend_is_a_temporary_file_backend(aiotooz_coordinator, tmp_path):
    assert aiotooz_coordinator.settings.backend_url.startswith(tmp_path.as_uri())


@pytest.mark.anyio
async def test_sees_a_lock_left_held(aiotooz_coordinator, aiotooz_peer):
    # Deliberately wrong: the peer holds the lock, so this test must fail.
    async with aiotooz_peer.get_lock("resize-b"):
        assert await resize_now("b") == "resized"
"""


def test_the_pytest_plugin_in_a_users_project(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (project / "conftest.py").write_text(CONFTEST)
    (project / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIOTOOZ_", "PYTEST_"))}
    # The fixtures ignore the environment's backend: no server is needed or used.
    env["AIOTOOZ_BACKEND_URL"] = "redis://127.0.0.1:1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", str(project)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    summary = done.stdout.strip().splitlines()[-1]
    assert "6 passed" in summary and "2 failed" in summary, done.stdout + done.stderr
    failed = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED")}
    assert failed == {
        "test_user.py::test_sees_a_lock_left_held[asyncio]",
        "test_user.py::test_sees_a_lock_left_held[trio]",
    }, done.stdout
    assert "LockAcquireFailed" in done.stdout


def test_the_plugin_is_not_registered_automatically() -> None:
    import importlib.metadata

    plugins = {entry.value for entry in importlib.metadata.entry_points(group="pytest11")}
    assert not any(value.startswith("aiotooz") for value in plugins)


def test_public_names_have_docstrings() -> None:
    import aiotooz.fastapi
    import aiotooz.testing

    for module in (aiotooz.testing, aiotooz.fastapi):
        assert module.__doc__
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not isinstance(obj, type(aiotooz.fastapi.CoordinatorDep)):
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"
