"""The one wrapper for tests/support/worker.py processes: run one to completion, or talk
to it line by line (a holder, a driven holder, a waiter)."""

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


class Worker:
    """A running worker.py process: ``send`` it lines, ``expect`` its answers.

    Closing its input ends it: a holder releases its lock and exits.
    """

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __repr__(self) -> str:
        return f"<Worker {' '.join(self.args[:1] + self.args[2:])} pid={self.pid}>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def readline(self) -> str:
        """Its next line of output (blocks until there is one; "" once it exited)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def expect(self, answer: str) -> None:
        """Read its next line; if that is not ``answer``, kill it and fail with its stderr."""
        line = self.readline()
        if line != answer:
            self.kill()
            _, err = self._communicate(timeout=10)
            raise AssertionError(f"{self!r} said {line!r}, not {answer!r}: {err[-3000:]}")

    def end_input(self) -> None:
        """Close its stdin: a holder releases its lock and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def finish(self, timeout: float) -> str:
        """Wait for it to exit; its remaining stdout. Fail with its stderr if it failed."""
        out, err = self._communicate(timeout)
        assert self.proc.returncode == 0, f"{self!r} failed: {err[-3000:]}"
        return out.strip()

    def _communicate(self, timeout: float) -> tuple[str, str]:
        if self.proc.stdin is not None and self.proc.stdin.closed:
            self.proc.stdin = None  # communicate() would flush the closed stream
        return self.proc.communicate(timeout=timeout)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self, grace: float = 30) -> None:
        """End its input, give it ``grace`` seconds to exit, then kill it; close its pipes."""
        if self.proc.poll() is None:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@contextmanager
def worker_process(*args: str, grace: float = 30) -> Iterator[Worker]:
    """A worker for the block's duration; closed (see ``Worker.close``) when it ends."""
    worker = Worker(*args)
    try:
        yield worker
    finally:
        worker.close(grace)


@contextmanager
def holding_process(command: str, *args: str) -> Iterator[Worker]:
    """A worker (``hold`` or ``tooz-hold``) that holds a lock until the block ends."""
    with worker_process(command, *args) as worker:
        worker.expect("waiting")
        worker.expect("held")
        yield worker
