"""The held block: what every primitive does around the body of its ``async with``.

`Lock`, `Semaphore` and `RWLock` hold a lock-table `Hold` for the body of an ``async
with`` block. A loss while it runs cancels the body (``cancel_on_loss``), and the exit
turns that cancellation into [`LockLost`][aiotooz.LockLost]; both halves live here once.
"""

from __future__ import annotations

from types import TracebackType

import anyio

from ._exceptions import LockLost
from ._locktable import Hold
from ._telemetry import lost_event

__all__ = ["budget", "close_block", "open_block", "raise_if_lost"]


def budget(blocking: object) -> str:
    """How long an ``async with`` that ran out of its budget waited, for its error."""
    return "at once" if blocking is False else f"within {blocking} s"


def open_block(hold: Hold, cancel_on_loss: bool) -> anyio.CancelScope | None:
    """Open the scope that a loss of ``hold`` cancels, around the block's body.

    Entered here and exited by :func:`close_block`, in the same task. ``None`` (no
    scope) if the body keeps running after a loss.
    """
    if not cancel_on_loss:
        return None
    scope = anyio.CancelScope()
    scope.__enter__()
    hold.on_lost = scope.cancel
    if hold.lost:
        scope.cancel()
    return scope


def close_block(
    scope: anyio.CancelScope | None,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> tuple[BaseException | None, bool]:
    """Exit ``scope`` (from :func:`open_block`) as the block ends.

    Returns:
        The exception the block still ends with (``None`` where the scope swallowed the
        cancellation a loss caused, and only that one), and whether a loss cut the body
        short.
    """
    if scope is not None and scope.__exit__(exc_type, exc, tb):
        return None, True
    return exc, False


def raise_if_lost(
    name: str, reason: str | None, cancel_on_loss: bool, exc: BaseException | None, what: str
) -> None:
    """Raise [`LockLost`][aiotooz.LockLost] out of the block if its hold was lost.

    Not with ``cancel_on_loss=False`` (the loss is recorded and logged only), and not
    when the block was cancelled from outside as well: that cancellation wins.

    Args:
        name: the primitive's name (``LockLost.lock_name``).
        reason: why the hold was lost, or ``None``.
        cancel_on_loss: the primitive's setting.
        exc: what the block ends with (chained to the ``LockLost``).
        what: the start of the message, e.g. ``"lock 'x' was lost"``.
    """
    if reason is None or not cancel_on_loss:
        return
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return
    lost_event(name, reason)
    raise LockLost(f"{what} while held: {reason}", lock_name=name, reason=reason) from exc
