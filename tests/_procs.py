"""Helpers to run tests/worker.py processes and talk to them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WORKER = str(Path(__file__).with_name("worker.py"))


def run_worker(*args: str, timeout: float = 120) -> str:
    """Run a worker to completion; return its stdout, fail with its stderr."""
    done = subprocess.run(
        [sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@contextmanager
def holding_process(command: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A worker that holds a lock until the block ends (its stdin is closed)."""
    proc = subprocess.Popen(
        [sys.executable, WORKER, command, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "held":
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"holder did not start: {line!r} {err}")
        yield proc
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()
