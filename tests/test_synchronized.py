"""@synchronized: names from the call's arguments, the default coordinator, clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from aiotooz import (
    ConfigurationError,
    Coordinator,
    LockAcquireFailed,
    LockCreationFailed,
    LockNameError,
    set_default_coordinator,
    synchronized,
)

from .support.helpers import make_coordinator


@dataclass
class Share:
    id: str


async def test_name_is_built_from_bound_args_defaults_and_f_name(
    coordinator: Coordinator,
) -> None:
    seen: list[str] = []

    @synchronized("{f_name}-{shr.id}-{snap[name]}-{force}", coordinator=coordinator)
    async def resize(shr: Share, snap: dict[str, str], force: bool = False) -> str:
        seen.extend(_held_names(coordinator))
        return "done"

    assert await resize(Share("s1"), {"name": "n1"}) == "done"
    assert await resize(snap={"name": "n2"}, shr=Share("s2"), force=True) == "done"
    assert seen == ["resize-s1-n1-False", "resize-s2-n2-True"]
    assert resize.__name__ == "resize"


async def test_methods_and_kwargs(coordinator: Coordinator) -> None:
    names: list[str] = []

    class Manager:
        id = "m7"

        @synchronized("{self.id}-{volume}", coordinator=coordinator)
        async def extend(self, volume: str) -> None:
            names.extend(_held_names(coordinator))

        @synchronized("{f_name}-{extra}", coordinator=coordinator)
        async def anything(self, **options: Any) -> None:
            names.extend(_held_names(coordinator))

    await Manager().extend("v1")
    await Manager().anything(extra="e")
    assert names == ["m7-v1", "anything-e"]


async def test_calls_with_one_name_are_serialized(coordinator: Coordinator) -> None:
    inside: dict[str, int] = {"a": 0, "b": 0}
    overlap = {"a": 0, "b": 0, "across": 0}

    @synchronized("work-{key}", coordinator=coordinator)
    async def work(key: str) -> None:
        inside[key] += 1
        overlap[key] = max(overlap[key], inside[key])
        overlap["across"] = max(overlap["across"], inside["a"] + inside["b"])
        await anyio.sleep(0.01)
        inside[key] -= 1

    async with anyio.create_task_group() as group:
        for index in range(20):
            group.start_soon(work, "ab"[index % 2])
    assert overlap["a"] == overlap["b"] == 1
    assert overlap["across"] == 2  # different names run side by side


async def test_blocking_false_raises_when_busy(coordinator: Coordinator) -> None:
    @synchronized("busy", blocking=False, coordinator=coordinator)
    async def job() -> None:
        pass

    async with coordinator.get_lock("busy"):
        async with anyio.create_task_group() as group:

            async def call() -> None:
                with pytest.raises(LockAcquireFailed, match="'busy' was not acquired at once"):
                    await job()

            group.start_soon(call)
    await job()


async def test_the_default_coordinator_is_resolved_at_call_time(
    backend_url: str, prefix: str
) -> None:
    @synchronized("late-{x}")
    async def decorated_before_any_coordinator(x: int) -> int:
        return x * 2

    set_default_coordinator(None)
    with pytest.raises(LockCreationFailed, match="no default coordinator"):
        await decorated_before_any_coordinator(1)
    async with make_coordinator(backend_url, prefix) as coordinator:
        assert set_default_coordinator(coordinator) is None
        assert await decorated_before_any_coordinator(21) == 42
    # A default coordinator uninstalls itself when it stops.
    with pytest.raises(LockCreationFailed, match="no default coordinator"):
        await decorated_before_any_coordinator(1)


def test_sync_functions_are_refused() -> None:
    with pytest.raises(TypeError, match="plain is not an 'async def'"):

        @synchronized("x")  # type: ignore[arg-type]
        def plain() -> None:
            pass


def test_a_field_that_is_not_a_parameter_is_named_at_decoration() -> None:
    with pytest.raises(LockNameError, match=r"uses snap, which is not a parameter of .*resize"):

        @synchronized("{f_name}-{shr.id}-{snap[name]}")
        async def resize(shr: Share) -> None:
            pass


async def test_a_field_that_cannot_be_formatted_names_the_function(
    coordinator: Coordinator,
) -> None:
    @synchronized("{shr.id}", coordinator=coordinator)
    async def resize(shr: object) -> None:
        pass

    with pytest.raises(LockNameError, match=r"arguments of .*resize\(\).*AttributeError"):
        await resize(object())
    assert coordinator.statistics().locks_held == 0


async def test_the_lock_is_released_when_the_function_raises(coordinator: Coordinator) -> None:
    @synchronized("raises", coordinator=coordinator)
    async def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await boom()
    lock = coordinator.get_lock("raises")
    assert await lock.acquire(blocking=False)
    await lock.release()


def _held_names(coordinator: Coordinator) -> tuple[str, ...]:
    return coordinator.statistics().held_names


@synchronized("module-level-{n}", blocking=2.5)
async def _decorated_at_import(n: int) -> int:
    return n


def test_decorating_at_import_time_needs_no_event_loop() -> None:
    # The decorator above ran when this module was imported, outside any event loop.
    assert _decorated_at_import.__name__ == "_decorated_at_import"
    with pytest.raises(ConfigurationError, match="blocking must be"):
        synchronized("x", blocking=-1)
