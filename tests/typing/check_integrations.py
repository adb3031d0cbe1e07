"""aiotooz.fastapi, aiotooz.testing and the CLI entry point keep their types."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn, assert_type

from fastapi import FastAPI

from aiotooz import Coordinator
from aiotooz._cli import main
from aiotooz.fastapi import CoordinatorDep, coordinator_lifespan, run_coordinator
from aiotooz.testing import temporary_coordinator

app = FastAPI(lifespan=coordinator_lifespan(prefix="svc-"))


@app.get("/ready")
async def ready(coordinator: CoordinatorDep) -> dict[str, bool]:
    assert_type(coordinator, Coordinator)
    return {"connected": coordinator.is_connected}


@asynccontextmanager
async def own_lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with run_coordinator(app, prefix="svc-", set_default=False) as coordinator:
        assert_type(coordinator, Coordinator)
        yield


other_app = FastAPI(lifespan=own_lifespan)
coordinator_lifespan(prefix=1)  # type: ignore[arg-type]


async def testing_helper() -> None:
    async with temporary_coordinator(prefix="t-") as coordinator:
        assert_type(coordinator, Coordinator)


def cli() -> NoReturn:
    main(["check"])
