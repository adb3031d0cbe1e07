"""Process-wide state: the few things aiotooz keeps per process, not per coordinator.

Everything else lives in a coordinator. Kept in one module so that it is easy to see
(and to reset in tests) what outlives a coordinator:

* the default coordinator, which [`Lock`][aiotooz.Lock] and
  [`synchronized()`][aiotooz.synchronized] use when given none;
* the file driver's table of lock objects, one per lock file (see
  `aiotooz._drivers.file`), and the mutex that guards its creation;
* how many forks separate this process from the one that first imported aiotooz.

A child made by ``os.fork()`` starts afresh: no default coordinator, no file lock
objects (the parent's say "held" for locks the child does not hold, and would keep
the child waiting for a release that only the parent can make), a new mutex (another
thread may have held the parent's at the fork). Coordinators started before the fork
refuse to work in the child (`forks()` tells them apart): their connection's threads
and their event loop stayed in the parent.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._exceptions import LockCreationFailed

if TYPE_CHECKING:
    from ._coordinator import Coordinator

__all__ = ["file_lock_object", "forks", "get_default_coordinator", "set_default_coordinator"]

_default: Coordinator | None = None

#: The file driver's lock objects, keyed by the lock file's identity (device and inode
#: of its directory, and its name).
_FILE_LOCKS: weakref.WeakValueDictionary[tuple[int, int, str], Any] = weakref.WeakValueDictionary()
#: Held while a lock object is created or looked up (tooz's own creation is not atomic).
_FILE_LOCKS_GUARD = threading.Lock()

_forks = 0


def file_lock_object(identity: tuple[int, int, str], make: Callable[[], Any]) -> Any:
    """The process's one lock object for the lock file ``identity``, made if missing.

    ``make`` creates it (a new one has not opened its file yet).
    """
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(identity)
        if lock is None:
            lock = _FILE_LOCKS[identity] = make()
        return lock


def forks() -> int:
    """How many ``os.fork()`` calls separate this process from the one that imported us."""
    return _forks


def _start_afresh_in_child() -> None:
    global _default, _forks, _FILE_LOCKS, _FILE_LOCKS_GUARD
    _forks += 1
    _default = None
    _FILE_LOCKS = weakref.WeakValueDictionary()
    _FILE_LOCKS_GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_start_afresh_in_child)


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
