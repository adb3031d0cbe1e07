"""The library's structlog logger. aiotooz never configures structlog: the application does."""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["get_logger"]


def get_logger(**context: Any) -> Any:
    """A structlog logger named ``aiotooz`` with ``context`` bound to every event."""
    return structlog.get_logger("aiotooz").bind(**context)
