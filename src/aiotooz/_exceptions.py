"""The exceptions aiotooz raises.

Every error that reaches a user from tooz or from a backend's client library is
translated, once, in `aiotooz._calls`, into one of these:

    CoordinationError
    ├── ConfigurationError        a setting, argument, URL or scheme; a missing client library
    ├── BackendUnavailable        the backend cannot be reached or failed mid-call
    ├── LockCreationFailed        no started coordinator, or a lock name that cannot be built
    │   └── LockNameError         a name that is not a non-empty str, or a format field missing
    ├── LockAcquireFailed         not acquired within the ``blocking`` budget
    ├── LockLost                  a held lock was lost (expired, taken over, connection gone)
    │   └── LeadershipLost        a leadership term ended while leading (its lock was lost)
    ├── LockNotHeld               release of a lock that is not held
    ├── UnsupportedOperation      the backend cannot do what was asked
    └── WrongEventLoop            a coordinator used outside the event loop (or the
                                  process) that started it

``ConfigurationError`` and ``LockNameError`` are also ``ValueError``, and
``WrongEventLoop`` is also ``RuntimeError`` (as asyncio's "attached to a different
loop"), so that code written for the standard library's conventions keeps working.
"""

from __future__ import annotations


class CoordinationError(Exception):
    """Root of every error raised by aiotooz."""


class ConfigurationError(CoordinationError, ValueError):
    """A setting, an argument, the backend URL, or the installed client libraries are wrong."""


class BackendUnavailable(CoordinationError):
    """The coordination backend could not be reached, or failed during a call."""


class LockCreationFailed(CoordinationError):
    """A lock could not be created: no started coordinator, or a bad name."""


class LockNameError(LockCreationFailed, ValueError):
    """A lock name is not a non-empty ``str``, or a field it formats is missing."""


class LockAcquireFailed(CoordinationError):
    """The lock was not acquired within the ``blocking`` budget."""


class LockLost(CoordinationError):
    """A lock was lost while it was held.

    It expired, the backend gave it to another owner, the connection it was taken on
    failed, or the coordinator stopped. ``async with lock:`` and ``@synchronized``
    cancel their body and raise this when it happens (unless ``cancel_on_loss=False``).
    """

    def __init__(self, message: str, *, lock_name: str, reason: str) -> None:
        super().__init__(message)
        self.lock_name = lock_name
        self.reason = reason


class LeadershipLost(LockLost):
    """Leadership was lost while leading: the lock behind it was lost.

    ``async with coordinator.leadership(name):`` cancels its body and raises this;
    `run_as_leader()` campaigns again. ``lock_name`` is the leadership's
    name.
    """


class LockNotHeld(CoordinationError):
    """A lock was released that is not held."""


class UnsupportedOperation(CoordinationError):
    """The backend cannot do what was asked (for example a non-blocking try)."""


class WrongEventLoop(CoordinationError, RuntimeError):
    """A coordinator was used from an event loop other than the one that started it.

    Or from a process forked after it started. Its heartbeat and lease watchdog run as
    tasks of that event loop, and its connection's threads live in that process: from
    anywhere else locks would be taken with nothing to keep them or tell of their loss.
    Nothing is taken or released; start a coordinator in the event loop that uses it.
    """
