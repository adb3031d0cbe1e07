"""Settings for a coordinator, read from arguments, the environment and ``.env``."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._drivers import check_url_for_driver
from ._exceptions import ConfigurationError
from ._urls import check_url, redact_url, scheme_of

__all__ = ["CoordinationSettings", "default_backend_url"]


def default_backend_url() -> str:
    """The embedded default: a lock directory shared by every process of this user.

    Per user, so that one user's directory never blocks another's with its permissions.
    """
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return (Path(tempfile.gettempdir()) / f"aiotooz-{uid}").as_uri()


class CoordinationSettings(BaseSettings):
    """How a [`Coordinator`][aiotooz.Coordinator] reaches its backend and keeps it alive.

    Each field is read, in order of precedence, from the constructor's arguments, the
    environment (empty values are ignored: ``AIOTOOZ_BACKEND_URL``, ``AIOTOOZ_HEARTBEAT``,
    ``AIOTOOZ_INITIAL_RECONNECT_BACKOFF``, ``AIOTOOZ_MAX_RECONNECT_BACKOFF``,
    ``AIOTOOZ_CALL_TIMEOUT``, ``AIOTOOZ_METRICS_LOCK_NAMES``), a ``.env``
    file in the working directory, then the defaults below. Settings are immutable.

    Raises:
        ConfigurationError: a value is out of range; the message names the field.
    """

    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
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
    metrics_lock_names: bool = Field(
        default=False,
        description=(
            "Put the lock name on OpenTelemetry metrics (attribute aiotooz.lock); off by "
            "default, since names can be unbounded."
        ),
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
        check_url_for_driver(check_url(value))
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
        return scheme_of(self.backend_url)

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
