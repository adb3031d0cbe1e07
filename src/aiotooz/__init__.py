"""aiotooz: asyncio-native distributed locks on every tooz backend."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from ._coordinator import Coordinator as Coordinator
from ._coordinator import CoordinatorStatistics as CoordinatorStatistics
from ._exceptions import BackendUnavailable as BackendUnavailable
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import CoordinationError as CoordinationError
from ._exceptions import LeadershipLost as LeadershipLost
from ._exceptions import LockAcquireFailed as LockAcquireFailed
from ._exceptions import LockCreationFailed as LockCreationFailed
from ._exceptions import LockLost as LockLost
from ._exceptions import LockNameError as LockNameError
from ._exceptions import LockNotHeld as LockNotHeld
from ._exceptions import UnsupportedOperation as UnsupportedOperation
from ._exceptions import WrongEventLoop as WrongEventLoop
from ._holders import Holder as Holder
from ._leadership import Leadership as Leadership
from ._leadership import Term as Term
from ._lock import Lock as Lock
from ._lock import fencing_token as fencing_token
from ._once import once_per as once_per
from ._process import get_default_coordinator as get_default_coordinator
from ._process import set_default_coordinator as set_default_coordinator
from ._rwlock import RWLock as RWLock
from ._semaphore import Semaphore as Semaphore
from ._settings import CoordinationSettings as CoordinationSettings
from ._synchronized import synchronized as synchronized

__all__ = [
    "BackendUnavailable",
    "ConfigurationError",
    "CoordinationError",
    "CoordinationSettings",
    "Coordinator",
    "CoordinatorStatistics",
    "Holder",
    "Leadership",
    "LeadershipLost",
    "Lock",
    "LockAcquireFailed",
    "LockCreationFailed",
    "LockLost",
    "LockNameError",
    "LockNotHeld",
    "RWLock",
    "Semaphore",
    "Term",
    "UnsupportedOperation",
    "WrongEventLoop",
    "fencing_token",
    "get_default_coordinator",
    "once_per",
    "set_default_coordinator",
    "synchronized",
]

try:
    #: The installed distribution's version (set from the git tag at build time).
    __version__: str = _version("aiotooz")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
del PackageNotFoundError


def _report_the_package_as_their_module() -> None:
    # Public names say they come from `aiotooz`, not from the private module that
    # defines them (as anyio's fix_package_names does): reprs, docs and pickles show the
    # import path users write.
    for name in __all__:
        value = globals()[name]
        if getattr(value, "__module__", "").startswith("aiotooz."):
            value.__module__ = __name__


_report_the_package_as_their_module()
