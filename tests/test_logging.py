"""aiotooz is silent until the application configures logging, then structured.

Each case runs in a fresh interpreter: logging and structlog configurations are
process-wide, and this test process has both configured by other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: A quickstart-sized program: a coordinator, a lock taken and released, a stop.
PROGRAM = """\
import anyio
from aiotooz import CoordinationSettings, Coordinator

async def main():
    settings = CoordinationSettings(backend_url={url!r})
    async with Coordinator(prefix="quiet-", settings=settings) as coordinator:
        async with coordinator.get_lock("printer"):
            pass

anyio.run(main)
"""


def _run(tmp_path: Path, setup: str) -> subprocess.CompletedProcess[str]:
    program = textwrap.dedent(setup) + PROGRAM.format(url=(tmp_path / "locks").as_uri())
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    return done


def test_silent_by_default(tmp_path: Path) -> None:
    """structlog's unconfigured default printed every debug and info event to stdout."""
    done = _run(tmp_path, "")
    assert done.stdout == ""
    assert done.stderr == ""


def test_stdlib_logging_gets_the_events_with_their_fields(tmp_path: Path) -> None:
    done = _run(
        tmp_path,
        """\
        import logging
        logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")
        """,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("aiotooz ")]
    assert any("INFO coordinator started" in line and "heartbeat=1.0" in line for line in lines)
    assert any("DEBUG lock acquired" in line and "lock='printer'" in line for line in lines)
    assert any("DEBUG lock released" in line for line in lines)
    assert done.stdout == ""


@pytest.mark.parametrize("level", ["DEBUG", "WARNING"])
def test_structlog_configuration_gets_the_events(tmp_path: Path, level: str) -> None:
    done = _run(
        tmp_path,
        f"""\
        import logging, sys, structlog
        structlog.configure(
            processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(logging.{level}),
            logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        )
        """,
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    if level == "WARNING":
        assert events == []
        return
    by_name = {event["event"]: event for event in events}
    assert by_name["lock acquired"]["lock"] == "printer"
    assert by_name["lock acquired"]["level"] == "debug"
    assert by_name["coordinator started"]["heartbeat"] == 1.0
    assert "agent_id" in by_name["coordinator stopped"]
    assert done.stderr == ""
