"""aiotooz: asyncio-native distributed locks on every tooz backend."""

from ._coordinator import Coordinator as Coordinator
from ._coordinator import get_default_coordinator as get_default_coordinator
from ._coordinator import set_default_coordinator as set_default_coordinator
from ._exceptions import BackendUnavailable as BackendUnavailable
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import CoordinationError as CoordinationError
from ._exceptions import LockAcquireFailed as LockAcquireFailed
from ._exceptions import LockCreationFailed as LockCreationFailed
from ._exceptions import LockLost as LockLost
from ._exceptions import LockNameError as LockNameError
from ._exceptions import LockNotHeld as LockNotHeld
from ._exceptions import UnsupportedOperation as UnsupportedOperation
from ._lock import Lock as Lock
from ._settings import CoordinationSettings as CoordinationSettings
from ._synchronized import synchronized as synchronized

__all__ = [
    "BackendUnavailable",
    "ConfigurationError",
    "CoordinationError",
    "CoordinationSettings",
    "Coordinator",
    "Lock",
    "LockAcquireFailed",
    "LockCreationFailed",
    "LockLost",
    "LockNameError",
    "LockNotHeld",
    "UnsupportedOperation",
    "get_default_coordinator",
    "set_default_coordinator",
    "synchronized",
]
