"""Process-wide state: the few things aiotooz keeps per process, not per coordinator.

Everything else lives in a coordinator. Kept in one module so that it is easy to see
(and to reset in tests) what outlives a coordinator:

* the default coordinator, which [`Lock`][aiotooz.Lock] and
  [`synchronized()`][aiotooz.synchronized] use when given none;
* the file driver's table of lock objects, one per lock file (see
  `aiotooz._drivers.file`), and the mutex that guards its creation.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from ._exceptions import LockCreationFailed

if TYPE_CHECKING:
    from ._coordinator import Coordinator

__all__ = ["FILE_LOCKS", "FILE_LOCKS_GUARD", "get_default_coordinator", "set_default_coordinator"]

_default: Coordinator | None = None

#: The file driver's lock objects, keyed by the lock file's identity (device and inode
#: of its directory, and its name).
FILE_LOCKS: weakref.WeakValueDictionary[tuple[int, int, str], Any] = weakref.WeakValueDictionary()
#: Held while a lock object is created or looked up (tooz's own creation is not atomic).
FILE_LOCKS_GUARD = threading.Lock()


def set_default_coordinator(coordinator: Coordinator | None) -> Coordinator | None:
    """Make ``coordinator`` the process-wide default; returns the previous default.

    [`Lock`][aiotooz.Lock] and [`synchronized()`][aiotooz.synchronized] without a ``coordinator``
    look the default up each time they acquire, so a coordinator installed later (in an
    application's startup) serves functions decorated at import time. A coordinator that
    is the default uninstalls itself when it stops. ``None`` uninstalls.
    """
    global _default
    previous, _default = _default, coordinator
    return previous


def get_default_coordinator() -> Coordinator:
    """The coordinator installed with [set_default_coordinator][aiotooz.set_default_coordinator].

    Raises:
        LockCreationFailed: none is installed.
    """
    if _default is None:
        raise LockCreationFailed(
            "no coordinator given and no default coordinator installed: pass "
            "coordinator=..., or call aiotooz.set_default_coordinator(coordinator) "
            "after starting one"
        )
    return _default


def is_default(coordinator: object) -> bool:
    """Whether ``coordinator`` is the installed default."""
    return _default is coordinator
