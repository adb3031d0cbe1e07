"""FastAPI (and Starlette) integration: a coordinator that lives as long as the app.

Needs ``pip install 'aiotooz[fastapi]'``:

    from fastapi import FastAPI
    from aiotooz import synchronized
    from aiotooz.fastapi import CoordinatorDep, coordinator_lifespan

    app = FastAPI(lifespan=coordinator_lifespan(prefix="svc-"))

    @synchronized("volume-{volume_id}")
    async def resize(volume_id: str, size: int) -> None: ...

    @app.get("/ready")
    async def ready(coordinator: CoordinatorDep) -> dict[str, bool]:
        return {"connected": coordinator.is_connected}

At startup the lifespan starts a [`Coordinator`][aiotooz.Coordinator] (settings from the
``AIOTOOZ_*`` environment unless given), stores it as ``app.state.aiotooz_coordinator``
and installs it as the default coordinator, so that ``@synchronized`` functions and
``Lock`` objects without ``coordinator=`` use it. At shutdown it stops it, which releases
every lock still held through it. A lifespan runs startup and shutdown in one task, as
[`Coordinator.stop()`][aiotooz.Coordinator.stop] requires.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated

try:
    from fastapi import Depends
    from starlette.applications import Starlette
    from starlette.requests import HTTPConnection
# A private name: a module-level `exc` would be a public symbol of this module to pyright.
except ModuleNotFoundError as _missing:  # pragma: no cover - depends on what is installed
    raise ModuleNotFoundError(
        f"aiotooz.fastapi needs FastAPI ({_missing}): pip install 'aiotooz[fastapi]'",
        name=_missing.name,
    ) from _missing

from ._coordinator import Coordinator
from ._process import get_default_coordinator, set_default_coordinator
from ._settings import CoordinationSettings

__all__ = [
    "STATE_ATTRIBUTE",
    "CoordinatorDep",
    "coordinator_lifespan",
    "get_coordinator",
    "run_coordinator",
]

#: The ``app.state`` attribute that holds the running coordinator.
STATE_ATTRIBUTE = "aiotooz_coordinator"


@asynccontextmanager
async def run_coordinator(
    app: Starlette,
    *,
    agent_id: str | None = None,
    prefix: str = "",
    settings: CoordinationSettings | None = None,
    set_default: bool = True,
) -> AsyncIterator[Coordinator]:
    """Run a coordinator for ``app`` inside your own lifespan; yields it once started.

    Use it when the app has a lifespan of its own:

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with run_coordinator(app, prefix="svc-") as coordinator:
                ...  # your own startup
                yield

    Args:
        app: the application; the coordinator is stored as
            ``app.state.aiotooz_coordinator`` while it runs.
        agent_id: as for [`Coordinator`][aiotooz.Coordinator].
        prefix: as for [`Coordinator`][aiotooz.Coordinator].
        settings: as for [`Coordinator`][aiotooz.Coordinator]; from the environment if ``None``.
        set_default: also install it as the process-wide default coordinator (it is
            uninstalled when it stops).

    Raises:
        ConfigurationError: a setting, the prefix or the backend URL is wrong.
        BackendUnavailable: the backend cannot be reached at startup.
    """
    coordinator = Coordinator(agent_id=agent_id, prefix=prefix, settings=settings)
    async with coordinator:
        setattr(app.state, STATE_ATTRIBUTE, coordinator)
        if set_default:
            set_default_coordinator(coordinator)
        try:
            yield coordinator
        finally:
            if getattr(app.state, STATE_ATTRIBUTE, None) is coordinator:
                delattr(app.state, STATE_ATTRIBUTE)


def coordinator_lifespan(
    *,
    agent_id: str | None = None,
    prefix: str = "",
    settings: CoordinationSettings | None = None,
    set_default: bool = True,
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """A lifespan for ``FastAPI(lifespan=...)`` that runs a coordinator with the app.

    The arguments are those of [`run_coordinator()`][aiotooz.fastapi.run_coordinator], which
    this wraps.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with run_coordinator(
            app, agent_id=agent_id, prefix=prefix, settings=settings, set_default=set_default
        ):
            yield

    return lifespan


def get_coordinator(connection: HTTPConnection) -> Coordinator:
    """FastAPI dependency: the app's coordinator (see :data:`CoordinatorDep`).

    Falls back to the default coordinator, for a sub-application mounted under the app
    that runs the lifespan.

    Raises:
        LockCreationFailed: the app has no coordinator and none is the default; the
            message says how to add the lifespan.
    """
    coordinator = getattr(connection.app.state, STATE_ATTRIBUTE, None)
    if isinstance(coordinator, Coordinator):
        return coordinator
    return get_default_coordinator()


#: ``coordinator: CoordinatorDep`` in an endpoint's parameters gets the app's coordinator.
CoordinatorDep = Annotated[Coordinator, Depends(get_coordinator)]
