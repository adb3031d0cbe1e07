"""Helpers to test your own locking code, on a temporary file backend: no server needed.

With pytest, enable the fixtures in your **root** ``conftest.py``:

    pytest_plugins = ["aiotooz.testing"]

and write tests for anyio's pytest plugin (installed with anyio, which aiotooz depends
on): mark them ``@pytest.mark.anyio`` or set ``anyio_mode = "auto"``:

    @pytest.mark.anyio
    async def test_resize_takes_turns(aiotooz_coordinator):
        await resize(share, 30)  # @synchronized code uses the default coordinator

    @pytest.mark.anyio
    async def test_resize_gives_up_when_busy(aiotooz_coordinator, aiotooz_peer):
        async with aiotooz_peer.get_lock("resize-a"):  # held "by another process"
            with pytest.raises(LockAcquireFailed):
                await resize_nowait(share)

Fixtures:

* ``aiotooz_backend_url``: a ``file://`` URL in the test's ``tmp_path``. Override it
  to run the same tests on a real server.
* ``aiotooz_coordinator``: a started [`Coordinator`][aiotooz.Coordinator] on it, installed as
  the default coordinator for the test, stopped (releasing its locks) after it.
* ``aiotooz_peer``: a second started coordinator on the same backend, standing for
  another process: its locks and ``aiotooz_coordinator``'s exclude each other.

Outside pytest (unittest, or another test runner), use
[`temporary_coordinator()`][aiotooz.testing.temporary_coordinator].
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread

from ._coordinator import Coordinator
from ._exceptions import LockCreationFailed
from ._process import get_default_coordinator, set_default_coordinator
from ._settings import CoordinationSettings

__all__ = [
    "aiotooz_backend_url",
    "aiotooz_coordinator",
    "aiotooz_peer",
    "temporary_coordinator",
]


@asynccontextmanager
async def temporary_coordinator(
    *,
    directory: str | Path | None = None,
    prefix: str = "",
    set_default: bool = True,
) -> AsyncIterator[Coordinator]:
    """A started coordinator on a file backend in a temporary directory.

    Args:
        directory: the lock directory to use (coordinators on one directory exclude
            each other); a fresh temporary one, removed afterwards, if ``None``.
        prefix: as for [`Coordinator`][aiotooz.Coordinator].
        set_default: install it as the default coordinator while the block runs; the
            default that was installed before is put back afterwards.

    Yields:
        The started coordinator; it is stopped, releasing its locks, when the block ends.
    """
    # The directory is made, resolved and removed on a worker thread: the event loop
    # never waits on the file system.
    if directory is None:
        tmp = await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="aiotooz-test-"))
        try:
            async with temporary_coordinator(
                directory=tmp, prefix=prefix, set_default=set_default
            ) as coordinator:
                yield coordinator
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
        return
    url = await anyio.to_thread.run_sync(_file_url, directory)
    async with _running(url, prefix, set_default) as coordinator:
        yield coordinator


@asynccontextmanager
async def _running(url: str, prefix: str, set_default: bool) -> AsyncIterator[Coordinator]:
    settings = CoordinationSettings(backend_url=url)
    previous = _current_default()
    async with Coordinator(prefix=prefix, settings=settings) as coordinator:
        if set_default:
            set_default_coordinator(coordinator)
        try:
            yield coordinator
        finally:
            if set_default and _current_default() is coordinator:
                set_default_coordinator(previous)
    if set_default and _current_default() is None:
        # stop() uninstalled it; put back what the test found.
        set_default_coordinator(previous)


def _file_url(directory: str | Path) -> str:
    return Path(directory).resolve().as_uri()


def _current_default() -> Coordinator | None:
    try:
        return get_default_coordinator()
    except LockCreationFailed:
        return None


try:
    import pytest
except ModuleNotFoundError:  # pragma: no cover - temporary_coordinator needs no pytest
    pass
else:

    @pytest.fixture
    def aiotooz_backend_url(tmp_path: Path) -> str:
        """A ``file://`` backend URL in the test's temporary directory."""
        return (tmp_path / "aiotooz-locks").as_uri()

    @pytest.fixture
    async def aiotooz_coordinator(
        aiotooz_backend_url: str, anyio_backend: object
    ) -> AsyncIterator[Coordinator]:
        """A started coordinator on ``aiotooz_backend_url``, the default during the test."""
        del anyio_backend  # requested so that anyio's pytest plugin runs this fixture
        async with _running(aiotooz_backend_url, "", set_default=True) as coordinator:
            yield coordinator

    @pytest.fixture
    async def aiotooz_peer(
        aiotooz_backend_url: str, anyio_backend: object
    ) -> AsyncIterator[Coordinator]:
        """Another started coordinator on the same backend: "another process"."""
        del anyio_backend
        async with _running(aiotooz_backend_url, "", set_default=False) as coordinator:
            yield coordinator
