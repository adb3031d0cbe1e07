"""``@synchronized``: run an async function under a lock named from its arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from ._coordinator import Coordinator
from ._lock import Blocking, Lock, check_blocking
from ._names import call_namer, check_name, format_fields

__all__ = ["synchronized"]

P = ParamSpec("P")
T = TypeVar("T")


def synchronized(
    name: str,
    *,
    blocking: Blocking = True,
    coordinator: Coordinator | None = None,
    cancel_on_loss: bool = True,
    fencing: bool = False,
) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Run the decorated ``async def`` under a distributed lock named from its call.

    The name is a format string over the call's arguments (bound by name, defaults
    applied) and ``f_name``, the function's name:

        @synchronized("{f_name}-{shr.id}-{snap[name]}")
        async def resize(shr, snap, force=False): ...

    Args:
        name: the lock name template.
        blocking: ``True`` waits as long as it takes; ``False`` tries once; a number
            waits at most that many seconds.
        coordinator: the coordinator to lock through; without one, the default
            coordinator is looked up at each call.
        cancel_on_loss: if the lock is lost while the function runs, cancel it and
            raise [`LockLost`][aiotooz.LockLost] (the default); with ``False`` it runs on
            and a warning is logged.
        fencing: take a fencing token with the lock; the function reads it with
            [`aiotooz.fencing_token()`][aiotooz.fencing_token].

    Raises:
        TypeError: the decorated function is not an ``async def``.
        LockNameError: (at decoration) a field of ``name`` is not a parameter of the
            function; (at call) a field cannot be formatted from the arguments.
        LockAcquireFailed: (at call) the lock was not acquired within ``blocking``.
        LockLost: (at call) the lock was lost while the function ran.
    """
    format_fields(check_name(name))  # refuse a bad template before there is a function
    check_blocking(blocking)  # refuse a bad value at decoration, not at the first call

    def decorate(
        func: Callable[P, Coroutine[Any, Any, T]],
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"@synchronized decorates async functions; {func.__qualname__} is not "
                "an 'async def' (for sync code use tooz directly)"
            )
        name_for = call_namer(name, func)

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            lock = Lock(
                name_for(*args, **kwargs),
                coordinator=coordinator,
                cancel_on_loss=cancel_on_loss,
                fencing=fencing,
            )
            async with lock(blocking):
                return await func(*args, **kwargs)

        return wrapper

    return decorate
