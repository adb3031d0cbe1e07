"""Settings for a coordinator, read from arguments, the environment and ``.env``."""

from __future__ import annotations

import math
import os
import re
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Final

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._exceptions import ConfigurationError

__all__ = ["CoordinationSettings", "check_url", "default_backend_url", "redact_url"]


def default_backend_url() -> str:
    """The embedded default: a lock directory shared by every process of this user.

    Per user, so that one user's directory never blocks another's with its permissions.
    """
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return (Path(tempfile.gettempdir()) / f"aiotooz-{uid}").as_uri()


#: A URL query parameter whose name contains one of these words holds a secret (or key
#: material) and is never shown: ``password``, ``sentinel_password``, ``keyfile_password``,
#: ``ssl_key_password``, ``ssl_key``, ``token``, ``client_secret`` …
_SECRET_WORDS: Final = re.compile(r"pass|pwd|secret|token|key|credential|auth", re.IGNORECASE)
_REDACTED: Final = "***"


def redact_url(url: str) -> str:
    """Return ``url`` with every secret replaced by ``***``, safe to log or show.

    The password in the netloc and the value of every query parameter whose name says
    password, secret, token or key (see ``_SECRET_WORDS``) are replaced.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is not None:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:{_REDACTED}@{hostinfo}")
    if parts.query:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(_SECRET_WORDS.search(name) for name, _ in query):
            shown = [
                (name, _REDACTED if _SECRET_WORDS.search(name) else value) for name, value in query
            ]
            parts = parts._replace(query=urllib.parse.urlencode(shown, safe="*/:,"))
    return urllib.parse.urlunsplit(parts)


def check_url(url: str) -> urllib.parse.SplitResult:
    """Parse ``url`` the way the drivers will, or raise ``ValueError`` saying what is wrong.

    The message never echoes the URL, which may hold a password.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ValueError(
            "must be a URL '<scheme>://...', such as 'file:///var/lock/app' or 'redis://host:6379'"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is what raises for 'host:abc'
    except ValueError as exc:
        raise ValueError(f"is not a parsable URL ({exc}); check its brackets and port") from None
    if scheme == "file" and not parts.path:
        raise ValueError("a file:// URL needs a directory path, e.g. 'file:///var/lock/app'")
    return parts


class CoordinationSettings(BaseSettings):
    """How a :class:`~aiotooz.Coordinator` reaches its backend and keeps it alive.

    Each field is read, in order of precedence, from the constructor's arguments, the
    environment (empty values are ignored: ``AIOTOOZ_BACKEND_URL``, ``AIOTOOZ_HEARTBEAT``,
    ``AIOTOOZ_INITIAL_RECONNECT_BACKOFF``, ``AIOTOOZ_MAX_RECONNECT_BACKOFF``,
    ``AIOTOOZ_CALL_TIMEOUT``), a ``.env``
    file in the working directory, then the defaults below. Settings are immutable.

    Raises:
        ConfigurationError: a value is out of range; the message names the field.
    """

    model_config = SettingsConfigDict(
        env_prefix="AIOTOOZ_",
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
    )

    backend_url: str = Field(
        default_factory=default_backend_url,
        description="tooz backend URL, e.g. redis://127.0.0.1:6379 or file:///var/lock/app.",
    )
    heartbeat: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between heartbeats, for backends that need them.",
    )
    initial_reconnect_backoff: float = Field(
        default=0.1,
        gt=0,
        description="Seconds to wait after the first failed reconnect attempt.",
    )
    max_reconnect_backoff: float = Field(
        default=60.0,
        gt=0,
        description="Cap, in seconds, of the jittered exponential reconnect backoff.",
    )
    call_timeout: float = Field(
        default=5.0,
        gt=0,
        description=(
            "Seconds any one backend call (connect, try, release, heartbeat) may take "
            "before it counts as failed: the bound on how long a backend that accepts "
            "connections but never answers can hold up a caller."
        ),
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None

    @field_validator(
        "heartbeat", "initial_reconnect_backoff", "max_reconnect_backoff", "call_timeout"
    )
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value

    @field_validator("backend_url")
    @classmethod
    def _looks_like_url(cls, value: str) -> str:
        check_url(value)
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> CoordinationSettings:
        if self.max_reconnect_backoff < self.initial_reconnect_backoff:
            raise ValueError(
                "max_reconnect_backoff must be >= initial_reconnect_backoff "
                f"({self.max_reconnect_backoff} < {self.initial_reconnect_backoff})"
            )
        return self

    @property
    def scheme(self) -> str:
        """The backend URL's scheme, such as ``redis`` or ``file``."""
        return self.backend_url.partition("://")[0]

    @property
    def redacted_backend_url(self) -> str:
        """The backend URL with its password replaced by ``***``."""
        return redact_url(self.backend_url)

    def __repr_args__(self) -> Any:
        # repr() and str() must never show a password from the URL.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "backend_url" else value


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    return "invalid aiotooz settings: " + "; ".join(problems)
