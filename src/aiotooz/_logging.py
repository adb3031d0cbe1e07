"""The library's logger: silent until the application asks, structured when it does.

aiotooz never configures logging. Each event goes to

* the application's **structlog** configuration, if it has one
  (``structlog.is_configured()``), bound to the logger name ``aiotooz``;
* otherwise the **stdlib** logger ``aiotooz``, with the event's fields in the message
  and in ``record.aiotooz`` (a dict), like any library's: nothing below WARNING is shown
  unless the application configures logging, and WARNING and up reach stderr through
  stdlib's last-resort handler.

structlog's own unconfigured default prints every level to stdout, which is why it is
not used unless the application configured it.
"""

from __future__ import annotations

import logging
from typing import Any, final

import structlog

__all__ = ["Logger", "get_logger"]

_STDLIB = logging.getLogger("aiotooz")


@final
class Logger:
    """Events of one coordinator, with its context (agent id, backend) bound."""

    __slots__ = ("_context", "_structlog")

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context
        #: The application's structlog logger with the context bound, made on first use
        #: (structlog is usually configured at start-up, before any coordinator logs).
        self._structlog: Any = None

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc_info: bool) -> None:
        if structlog.is_configured():
            if self._structlog is None:
                self._structlog = structlog.get_logger("aiotooz").bind(**self._context)
            method = getattr(self._structlog, logging.getLevelName(level).lower())
            if exc_info:
                fields["exc_info"] = True
            method(event, **fields)
            return
        if not _STDLIB.isEnabledFor(level):
            return
        merged = {**self._context, **fields}
        shown = " ".join(f"{key}={value!r}" for key, value in merged.items())
        _STDLIB.log(level, "%s %s", event, shown, exc_info=exc_info, extra={"aiotooz": merged})

    def debug(self, event: str, **fields: Any) -> None:
        # The hot path logs at debug: with nobody listening it must cost next to nothing.
        if structlog.is_configured() or _STDLIB.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, event, fields, False)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields, False)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields, False)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields, True)


def get_logger(**context: Any) -> Logger:
    """A logger for aiotooz's events with ``context`` bound to every event."""
    return Logger(context)
