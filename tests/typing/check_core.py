"""The core API keeps the types users write against.

The files here are usage examples that must type-check under ``mypy --strict`` (``nox -s
typecheck``). They are never run: named ``check_*.py``, pytest does not collect them. A
``# type: ignore[code]`` marks a line that must be an error: with ``warn_unused_ignores``
(part of ``strict``), mypy fails if the error goes away. There is no ``__init__.py`` on
purpose: a regular package named ``typing`` in ``tests/`` would shadow the standard
library's for any script run from there (``python tests/some_script.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import assert_type

import aiotooz
from aiotooz import (
    CoordinationError,
    CoordinationSettings,
    Coordinator,
    Lock,
    LockAcquireFailed,
    Semaphore,
    once_per,
    synchronized,
)


@dataclass
class Share:
    id: str


@synchronized("{f_name}-{share.id}")
async def resize(share: Share, size_gb: int, *, dry_run: bool = False) -> list[int]:
    return [size_gb]


class Volumes:
    @synchronized("volume-{volume_id}", blocking=2.5)
    async def attach(self, volume_id: str) -> str:
        return volume_id


async def decorated_functions_keep_their_signatures() -> None:
    assert_type(await resize(Share("a"), 30), list[int])
    assert_type(await resize(Share("a"), 30, dry_run=True), list[int])
    assert_type(await Volumes().attach("v-1"), str)
    await resize(Share("a"), "30")  # type: ignore[arg-type]
    await resize(Share("a"))  # type: ignore[call-arg]
    await resize(Share("a"), 30, force=True)  # type: ignore[call-arg]
    await Volumes().attach(1)  # type: ignore[arg-type]


@once_per("report-{day}", timedelta(days=1), finish_required=True)
async def report(day: str) -> int:
    return len(day)


async def once_per_keeps_the_signature_and_may_return_none() -> None:
    assert_type(await report("mon"), int | None)
    await report(1)  # type: ignore[arg-type]
    once_per("x", 60.0)
    once_per("x", "60")  # type: ignore[arg-type]


def synchronized_takes_only_sensible_blocking_values() -> None:
    synchronized("x", blocking=False)
    synchronized("x", blocking=0.5)
    synchronized("x", blocking="soon")  # type: ignore[arg-type]


async def coordinator_and_locks() -> None:
    settings = CoordinationSettings(backend_url="redis://127.0.0.1:6379")
    assert_type(settings.redacted_backend_url, str)
    async with Coordinator(prefix="svc-", settings=settings) as coordinator:
        assert_type(coordinator, Coordinator)
        assert_type(coordinator.is_connected, bool)
        lock = coordinator.get_lock("volume-42")
        assert_type(lock, Lock)
        async with lock as held:
            assert_type(held, Lock)
        async with lock(blocking=2.5):
            pass
        assert_type(await lock.acquire(blocking=False), bool)
        assert_type(lock.locked(), bool)
        await lock.release()
        previous = aiotooz.set_default_coordinator(coordinator)
        assert_type(previous, Coordinator | None)
        assert_type(aiotooz.get_default_coordinator(), Coordinator)
    Lock("share-{share.id}", {"share": Share("a")})
    Lock(42)  # type: ignore[arg-type]


async def semaphores() -> None:
    async with Coordinator() as coordinator:
        semaphore = Semaphore("api-{tenant}", 3, {"tenant": "acme"}, coordinator=coordinator)
        async with semaphore as entered:
            assert_type(entered, Semaphore)
            assert_type(semaphore.slot, int)
        async with semaphore(blocking=2.5):
            assert_type(semaphore.lost, bool)
            assert_type(semaphore.lost_reason, str | None)
        assert_type(await semaphore.acquire(blocking=False), bool)
        assert_type(semaphore.held, int)
        await semaphore.release()
    Semaphore("api", 3, cancel_on_loss=False)
    Semaphore("api", "3")  # type: ignore[arg-type]
    Semaphore("api", 3, None, None)  # type: ignore[call-arg]
    semaphore(blocking="soon")  # type: ignore[arg-type]


def exceptions_form_one_tree(exc: LockAcquireFailed) -> CoordinationError:
    return exc
