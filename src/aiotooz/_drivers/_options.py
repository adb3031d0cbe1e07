"""The options each backend URL takes in its query string, and what their values must be.

tooz hands a URL's options to its driver as they are and ignores any it does not read,
so a misspelt ``?lock_timout=5`` left the TTL at its default without a word; a value it
cannot convert (``socket_timeout=abc``) failed only when connecting, as if the backend
could not be reached. Each driver declares here what tooz's driver of its backend reads
(tooz 9.1, and what aiotooz adds), and the URL is checked when the settings are made.

Options tooz reads but cannot use from a URL are left out: ZooKeeper's
``connection_retry`` and ``command_retry`` (kazoo takes them as a dict or a retry object
only, and ignores text).
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, final

__all__ = [
    "ETCD",
    "FILE",
    "IPC",
    "MEMCACHED",
    "MYSQL",
    "POSTGRESQL",
    "REDIS",
    "ZOOKEEPER",
    "Option",
    "check_options",
]


@final
@dataclass(frozen=True)
class Option:
    """What one option's value must be (a URL's query string is all text)."""

    #: Said in errors: "must be <what>".
    what: str
    accepts: Callable[[str], bool]


def _number(text: str, kind: Callable[[str], float], least: float, inclusive: bool) -> bool:
    try:
        value = kind(text)
    except ValueError:
        return False
    return math.isfinite(value) and (value >= least if inclusive else value > least)


def _choice(*names: str) -> Option:
    return Option(f"one of {', '.join(names)}", lambda text: text in names)


#: oslo.utils' spellings, which tooz reads flags with.
_FLAGS: Final = frozenset({"1", "t", "true", "on", "y", "yes", "0", "f", "false", "off", "n", "no"})

TEXT: Final = Option("text", lambda text: True)
FLAG: Final = Option(
    "true or false (or yes/no, on/off, 1/0)", lambda text: text.strip().lower() in _FLAGS
)
WHOLE_SECONDS: Final = Option(
    "a whole number of seconds > 0", lambda text: _number(text, int, 0, False)
)
SECONDS: Final = Option("a number of seconds > 0", lambda text: _number(text, float, 0, False))
SECONDS_OR_ZERO: Final = Option(
    "a number of seconds >= 0", lambda text: _number(text, float, 0, True)
)
COUNT: Final = Option("a whole number > 0", lambda text: _number(text, int, 0, False))
INDEX: Final = Option("a whole number >= 0", lambda text: _number(text, int, 0, True))
PORT: Final = Option(
    "a port number (1 to 65535)",
    lambda text: _number(text, int, 1, True) and int(text) <= 65535,
)
#: tooz's executors for the drivers that run callbacks on one (``executor=``).
_EXECUTOR: Final = _choice("threaded", "thread", "threading", "synchronous", "sync")

FILE: Final[Mapping[str, Option]] = {"executor": _EXECUTOR, "timeout": WHOLE_SECONDS}
IPC: Final[Mapping[str, Option]] = {"executor": _EXECUTOR}
REDIS: Final[Mapping[str, Option]] = {
    "executor": _EXECUTOR,
    "timeout": WHOLE_SECONDS,
    "lock_timeout": WHOLE_SECONDS,
    "membership_timeout": SECONDS,
    "namespace": TEXT,
    "encoding": TEXT,
    # Handed to the redis-py client (tooz's CLIENT_ARGS).
    "db": INDEX,
    "retry_on_timeout": FLAG,
    "socket_keepalive": FLAG,
    "socket_timeout": SECONDS,
    "socket_connect_timeout": SECONDS,
    "health_check_interval": SECONDS_OR_ZERO,
    "ssl": FLAG,
    "ssl_certfile": TEXT,
    "ssl_keyfile": TEXT,
    "ssl_ca_certs": TEXT,
    "sentinel": TEXT,
    "sentinel_fallback": TEXT,
    "sentinel_username": TEXT,
    "sentinel_password": TEXT,
    "sentinel_ssl": FLAG,
}
MEMCACHED: Final[Mapping[str, Option]] = {
    "executor": _EXECUTOR,
    "timeout": WHOLE_SECONDS,
    "lock_timeout": WHOLE_SECONDS,
    "membership_timeout": WHOLE_SECONDS,
    "leader_timeout": WHOLE_SECONDS,
    "max_pool_size": COUNT,
    "use_ssl": FLAG,
    "ca_cert": TEXT,
    "ssl_cert": TEXT,
    "ssl_key": TEXT,
    "ssl_key_password": TEXT,
    "ssl_ciphers": TEXT,
    "ssl_check_hostname": FLAG,
}
ZOOKEEPER: Final[Mapping[str, Option]] = {
    "timeout": WHOLE_SECONDS,
    "namespace": TEXT,
    "hosts": TEXT,
    "randomize_hosts": FLAG,
    "use_ssl": FLAG,
    "verify_certs": FLAG,
    "ca": TEXT,
    "certfile": TEXT,
    "keyfile": TEXT,
    "keyfile_password": TEXT,
    # aiotooz waits on kazoo's threads: the eventlet handler cannot serve it.
    "handler": _choice("threading"),
}
ETCD: Final[Mapping[str, Option]] = {
    "executor": _EXECUTOR,
    "timeout": WHOLE_SECONDS,
    "lock_timeout": WHOLE_SECONDS,
    "membership_timeout": WHOLE_SECONDS,
    "api_version": TEXT,
    "ca_cert": TEXT,
    "cert_key": TEXT,
    "cert_cert": TEXT,
}
POSTGRESQL: Final[Mapping[str, Option]] = {
    "host": TEXT,
    "port": PORT,
    "dbname": TEXT,
    # aiotooz's own driver: plain tooz's advisory keys, or a 64-bit key space.
    "keys": Option(
        "tooz (plain tooz's 65,536 advisory keys, the default: aiotooz and plain tooz "
        "exclude each other) or 64 (a 64-bit key space, for fleets with no plain tooz)",
        lambda text: text in ("tooz", "64"),
    ),
}
MYSQL: Final[Mapping[str, Option]] = {
    "unix_socket": TEXT,
    "ssl_ca": TEXT,
    "ssl_capath": TEXT,
    "ssl_cert": TEXT,
    "ssl_key": TEXT,
    "ssl_cipher": TEXT,
    "ssl_verify_mode": TEXT,
    "ssl_check_hostname": FLAG,
}


def check_options(parts: urllib.parse.SplitResult, accepted: Mapping[str, Option]) -> None:
    """Refuse an option not in ``accepted``, or a value it cannot take (``ValueError``).

    The message names the option, never the URL (which may hold a password), and shows
    a value only for options that are not text (numbers and flags hold no secret).
    """
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    backend = f"the {parts.scheme}:// backend"
    for name, values in query.items():
        option = accepted.get(name)
        if option is None:
            raise ValueError(
                f"{backend} takes no option {name!r} (misspelt?); it takes: "
                f"{', '.join(sorted(accepted))}"
            )
        for value in values:
            if not option.accepts(value):
                raise ValueError(f"option {name}={value!r} of {backend} must be {option.what}")
