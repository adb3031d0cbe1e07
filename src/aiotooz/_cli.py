"""The ``aiotooz`` command: run a command under a distributed lock, or check a backend.

(``aiotooz locks``, who holds which lock, is in ``_cli_locks``.)

``aiotooz run NAME -- COMMAND [ARGS...]`` is util-linux ``flock`` across machines: it
takes the lock, runs the command with the lock held, forwards SIGINT, SIGTERM and SIGHUP
to it, releases the lock when it ends, and exits with its status. If the lock is lost
while the command runs, the command gets SIGTERM, then SIGKILL ``--kill-after`` seconds
later, and ``run`` exits with :data:`EXIT_LOCK_LOST` whatever the command's status: a
caller must be able to tell that work ran without the lock. ``aiotooz check`` is a
health check for a backend. Both read the same ``AIOTOOZ_*`` settings as the library.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Final, NoReturn

import anyio
import structlog
from anyio.abc import Process

from ._cli_locks import add_locks_parser, locks_main
from ._coordinator import Coordinator
from ._exceptions import (
    BackendUnavailable,
    ConfigurationError,
    CoordinationError,
    LockAcquireFailed,
    LockLost,
    LockNameError,
    UnsupportedOperation,
)
from ._lock import Lock
from ._names import MAX_NAME_LENGTH, check_name
from ._once import WindowClaim, check_every
from ._settings import CoordinationSettings

__all__ = [
    "EXIT_BACKEND_UNAVAILABLE",
    "EXIT_CANNOT_EXECUTE",
    "EXIT_CONFIG",
    "EXIT_LOCK_LOST",
    "EXIT_NOT_ACQUIRED",
    "EXIT_NOT_FOUND",
    "main",
]

#: ``run``: the lock was not acquired (``--no-wait``, or ``--wait`` ran out). As sysexits'
#: EX_TEMPFAIL: "try again later". ``--conflict-exit-code`` changes it, like ``flock -E``.
EXIT_NOT_ACQUIRED: Final = 75
#: ``run``: the lock was lost while the command ran, so the command (or part of it) ran
#: without it. This wins over the command's own status, even 0: the work may have
#: overlapped with another holder's. Next to EXIT_NOT_ACQUIRED; sysexits has no such
#: status (its 76, EX_PROTOCOL, is for a remote protocol error, which commands rarely
#: return), and it is clear of 1, 2, 126, 127 and 128+N.
EXIT_LOCK_LOST: Final = 76
#: The backend could not be reached or failed (sysexits' EX_UNAVAILABLE).
EXIT_BACKEND_UNAVAILABLE: Final = 69
#: A setting, the backend URL or a client library is wrong (sysexits' EX_CONFIG).
EXIT_CONFIG: Final = 78
#: ``run``: the command was found but cannot be executed (as the shell and ``env``).
EXIT_CANNOT_EXECUTE: Final = 126
#: ``run``: the command was not found (as the shell and ``env``).
EXIT_NOT_FOUND: Final = 127

#: The signals ``run`` passes on to the command.
FORWARDED: Final = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)

# On Linux the command is started through this shim, which asks the kernel to SIGKILL
# it if aiotooz dies (PR_SET_PDEATHSIG, which survives exec) and then execs it: a
# command must never outlive the process that holds its lock. If aiotooz is already
# gone when the shim runs, the command is not started. The kernel ties the signal to
# the *thread* that forked; asyncio forks on the event loop's thread, which is the main
# thread here and lives as long as aiotooz. (A shim, not preexec_fn: preexec_fn is not
# safe in a process that has threads, and the coordinator has some.)
_SHIM: Final = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    os._exit(128 + signal.SIGKILL)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    print(f"aiotooz run: cannot execute {sys.argv[2]!r}: {exc.strerror}", file=sys.stderr)
    os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
"""

_EPILOG_RUN: Final = f"""\
exit status:
  the command's own status, or 128+N if it died by signal N;
  {EXIT_NOT_ACQUIRED}   the lock was not acquired (--no-wait, or --wait ran out;
       see --conflict-exit-code)
  0    with --once-per: this window was claimed already (or the lock stayed busy
       until it ended), so the command did not run (see --conflict-exit-code)
  {EXIT_LOCK_LOST}   the lock was lost while the command ran (whatever the command's
       own status, even 0, and with --on-loss ignore too)
  {EXIT_BACKEND_UNAVAILABLE}   the backend could not be reached
  {EXIT_CONFIG}   bad settings or backend URL, a missing client library, or a NAME the
       backend cannot lock (MySQL: over 64 characters with the prefix)
  {EXIT_CANNOT_EXECUTE}  the command cannot be executed; {EXIT_NOT_FOUND} it was not found
  2    bad usage (a bad option, an empty or over-long lock NAME, no COMMAND)

The lock is held from before the command starts until after it ends. SIGINT, SIGTERM
and SIGHUP sent to aiotooz are passed on to the command (a Ctrl-C at a terminal reaches
the command directly and is not passed on twice). If aiotooz itself is killed with
SIGKILL, the command is killed too (Linux), and the backend frees the lock as it does
for any dead client: the file backend, PostgreSQL and MySQL at once; Redis, memcached
and etcd when the lock's TTL ends (30 s unless the URL sets lock_timeout); ZooKeeper
when the session expires. If the lock is lost while the command runs (its TTL ran out,
the backend connection was replaced), the command gets SIGTERM, then SIGKILL if it
still runs --kill-after seconds later (see --on-loss), and aiotooz exits with {EXIT_LOCK_LOST}.
Like the signals passed on, these go to the command only, not to processes it started.

With --once-per DURATION, NAME is a job that runs once per window of DURATION across
every host (windows aligned to the Unix epoch, UTC: 1h is each clock hour): the command
runs only if no host has claimed this window yet, e.g. from the same cron line on every
host. With --finish-required, a window counts as done only once a command exited 0 in
it: one that failed, was killed or lost its lock may run again in the same window.
"""

_EPILOG_SETTINGS: Final = """\
settings come from the environment as for the library (AIOTOOZ_BACKEND_URL,
AIOTOOZ_HEARTBEAT, AIOTOOZ_INITIAL_RECONNECT_BACKOFF, AIOTOOZ_MAX_RECONNECT_BACKOFF,
or a .env file); --backend overrides AIOTOOZ_BACKEND_URL.
"""


class _Failure(Exception):
    """Ends the command with ``status`` after printing ``message`` to stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``aiotooz`` console script and ``python -m aiotooz``."""
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (``sys.argv[1:]`` by default), run the command, return the status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(args.verbose)
    try:
        settings = _settings(args.backend)
        if args.subcommand == "run":
            return _run_main(parser, args, settings)
        if args.subcommand == "locks":
            return locks_main(args, settings)
        return _check_main(args, settings)
    except _Failure as failure:
        if args.subcommand == "check":
            # A health check says 0 or 1, or 78: the check itself is misconfigured.
            print(f"aiotooz check: FAILED: {failure}", file=sys.stderr)
            return EXIT_CONFIG if failure.status == EXIT_CONFIG else 1
        print(f"aiotooz {args.subcommand}: {failure}", file=sys.stderr)
        return failure.status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiotooz",
        description="Distributed locks on every tooz backend, for scripts and cron.",
        epilog=_EPILOG_SETTINGS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backend",
        metavar="URL",
        help="tooz backend URL, e.g. redis://host:6379 (default: $AIOTOOZ_BACKEND_URL, "
        "else the file backend in the temporary directory)",
    )
    common.add_argument(
        "--prefix",
        default="",
        help="prepended to the lock name, as Coordinator(prefix=...) (default: none)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log to stderr: -v connection events, -vv lock events too",
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a command while holding a lock",
        description="Run COMMAND while holding the distributed lock NAME, like flock(1) "
        "across machines.",
        usage="aiotooz run [options] NAME -- COMMAND [ARGS ...]",
        epilog=_EPILOG_RUN + "\n" + _EPILOG_SETTINGS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wait = run.add_mutually_exclusive_group()
    wait.add_argument(
        "-w",
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="give up if the lock is not acquired within SECONDS (default: wait as long "
        "as it takes)",
    )
    wait.add_argument(
        "-n",
        "--no-wait",
        action="store_true",
        help=f"give up at once if the lock is held elsewhere (exit {EXIT_NOT_ACQUIRED})",
    )
    wait.add_argument(
        "--once-per",
        type=_duration,
        metavar="DURATION",
        help="run the command at most once per window of DURATION (30s, 15m, 1h, 1d; at "
        "least 1 s) across hosts; if this window was claimed already, exit 0 without "
        "running it (see --conflict-exit-code). Waits for the lock at most until the "
        "window ends",
    )
    run.add_argument(
        "--finish-required",
        action="store_true",
        help="with --once-per: a window counts as done only once the command exited 0 "
        "in it (else it may run again in the same window)",
    )
    run.add_argument(
        "-E",
        "--conflict-exit-code",
        type=_status,
        metavar="STATUS",
        help="exit status when the lock is not acquired, or with --once-per when the "
        f"window was claimed already (default: {EXIT_NOT_ACQUIRED}; with --once-per, 0)",
    )
    run.add_argument(
        "--on-loss",
        choices=["terminate", "ignore"],
        default="terminate",
        help="if the lock is lost while the command runs (its TTL ran out, the backend "
        "connection was replaced), send the command SIGTERM and, after --kill-after, "
        f"SIGKILL (default), or let it run; either way the exit status is {EXIT_LOCK_LOST}",
    )
    run.add_argument(
        "--kill-after",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="after the lock is lost, send SIGKILL to the command if it still runs "
        "SECONDS after SIGTERM, like timeout -k (default: 5; 0: SIGKILL at once, "
        "without SIGTERM)",
    )
    run.add_argument(
        "name",
        type=_lock_name,
        metavar="NAME",
        help=f"the lock name (any non-empty string of at most {MAX_NAME_LENGTH} characters)",
    )
    run.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="COMMAND",
        help="the command to run, after '--'",
    )

    sub.add_parser(
        "check",
        parents=[common],
        help="check that the backend works (a health check)",
        description="Connect to the backend, take and release a probe lock, print the "
        "backend, the latencies and the settings in effect (password redacted). Exit "
        "status 0 if it all worked, 1 if it did not within --timeout (a hard bound, "
        "whatever the backend does), 78 if the settings or the URL are wrong.",
        epilog=_EPILOG_SETTINGS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="fail if the check takes longer (default: 10)",
    )
    add_locks_parser(sub, common)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {text!r}")
    return value


#: The units ``--once-per`` takes, in seconds.
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    """``30s``, ``15m``, ``1h``, ``1d`` (or plain seconds), in microseconds (``check_every``)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        return check_every(float(number) * _UNITS[unit])
    except (ValueError, ConfigurationError):
        raise argparse.ArgumentTypeError(
            f"expected a duration of at least 1 s such as 30s, 15m, 1h or 1d, not {text!r}"
        ) from None


def _lock_name(text: str) -> str:
    # Checked as the command line is parsed: a name no backend can take is bad usage,
    # not a backend that could not be reached.
    try:
        return check_name(text)
    except LockNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _status(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 255:
        raise argparse.ArgumentTypeError(f"expected an exit status 0..255, not {text!r}")
    return int(text)


def _configure_logging(verbose: int) -> None:
    # An application configures logging, the library never does. aiotooz's stdout
    # belongs to the command it runs, so logs go to stderr.
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
    )


def _settings(backend: str | None) -> CoordinationSettings:
    try:
        if backend is not None:
            return CoordinationSettings(backend_url=backend)
        return CoordinationSettings()
    except ConfigurationError as exc:
        raise _Failure(EXIT_CONFIG, str(exc)) from None


def _status_for(exc: CoordinationError) -> int:
    # A key the backend cannot lock (MySQL: over 64 characters with the prefix) is fixed
    # by changing the name, the prefix or the backend: configuration, not availability.
    if isinstance(exc, ConfigurationError | UnsupportedOperation):
        return EXIT_CONFIG
    return EXIT_BACKEND_UNAVAILABLE


# -- run ---------------------------------------------------------------------------


def _run_main(
    parser: argparse.ArgumentParser, args: argparse.Namespace, settings: CoordinationSettings
) -> int:
    command: list[str] = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("run: a COMMAND to run is required, after '--' (see aiotooz run --help)")
    if shutil.which(command[0]) is None:
        # Checked before taking the lock, so that a typo does not wait for it.
        if os.sep in command[0] and os.path.exists(command[0]):
            raise _Failure(EXIT_CANNOT_EXECUTE, f"not an executable file: {command[0]!r}")
        raise _Failure(EXIT_NOT_FOUND, f"command not found: {command[0]!r}")
    if args.finish_required and args.once_per is None:
        parser.error("run: --finish-required goes with --once-per")
    blocking: bool | float = False if args.no_wait else (True if args.wait is None else args.wait)
    conflict_status = args.conflict_exit_code
    if conflict_status is None:
        conflict_status = EXIT_NOT_ACQUIRED if args.once_per is None else 0
    runner = _Runner(
        name=args.name,
        command=command,
        blocking=blocking,
        conflict_status=conflict_status,
        once_per=args.once_per,
        finish_required=args.finish_required,
        prefix=args.prefix,
        settings=settings,
        on_loss=args.on_loss,
        kill_after=args.kill_after,
    )
    return anyio.run(runner.run)


class _Runner:
    """Holds the lock around one run of the command, passing signals on to it."""

    def __init__(
        self,
        *,
        name: str,
        command: list[str],
        blocking: bool | float,
        conflict_status: int,
        once_per: int | None = None,
        finish_required: bool = False,
        prefix: str,
        settings: CoordinationSettings,
        on_loss: str,
        kill_after: float,
    ) -> None:
        self.name = name
        self.on_loss = on_loss
        self.kill_after = kill_after
        self.command = command
        self.blocking = blocking
        self.conflict_status = conflict_status
        #: ``--once-per``, in microseconds.
        self.once_per = once_per
        self.finish_required = finish_required
        self.prefix = prefix
        self.settings = settings
        self.child: Process | None = None
        # A signal that arrived before the command started: aiotooz then stops waiting
        # and exits as if killed by it.
        self.interrupted: signal.Signals | None = None
        self.waiting: anyio.CancelScope | None = None

    async def run(self) -> int:
        outcome: int | _Failure
        self.waiting = anyio.CancelScope()
        with anyio.open_signal_receiver(*FORWARDED) as signals:
            async with anyio.create_task_group() as group:
                group.start_soon(self._pass_on, signals)
                # Caught here, not outside, so that it is not wrapped in an ExceptionGroup.
                try:
                    outcome = await self._locked_run()
                except _Failure as failure:
                    outcome = failure
                except CoordinationError as exc:
                    outcome = _Failure(_status_for(exc), str(exc))
                group.cancel_scope.cancel()
        if isinstance(outcome, _Failure):
            raise outcome
        return outcome

    async def _locked_run(self) -> int:
        async with Coordinator(prefix=self.prefix, settings=self.settings) as coordinator:
            if self.once_per is not None:
                return await self._once_run(coordinator, self.once_per)
            lock = coordinator.get_lock(self.name)
            acquired = False
            assert self.waiting is not None
            with self.waiting:
                try:
                    acquired = await lock.acquire(self.blocking)
                except LockAcquireFailed as exc:  # already held by this very task: cannot be
                    raise _Failure(self.conflict_status, str(exc)) from None
            try:
                if self.interrupted is not None:
                    return 128 + self.interrupted
                if not acquired:
                    budget = "at once" if self.blocking is False else f"within {self.blocking} s"
                    raise _Failure(
                        self.conflict_status,
                        f"lock {self.name!r} is held elsewhere; not acquired {budget}",
                    )
                return await self._spawn_and_wait(lock)
            finally:
                if lock.locked():
                    await lock.release()

    async def _once_run(self, coordinator: Coordinator, every: int) -> int:
        claim = WindowClaim(
            self.name,
            every,
            coordinator=coordinator,
            finish_required=self.finish_required,
            cancel_on_loss=False,  # a loss is handled as for any run (see _on_loss)
        )
        assert self.waiting is not None
        with self.waiting:
            await claim.__aenter__()
        try:
            if self.interrupted is not None:
                return 128 + self.interrupted
            if not claim.claimed:
                return self.conflict_status
            status = await self._spawn_and_wait(claim.lock)
            if status == 0:
                try:
                    await claim.finish()
                except LockLost as exc:
                    _say(f"aiotooz run: {exc}; exit status {EXIT_LOCK_LOST}, not 0")
                    return EXIT_LOCK_LOST
            return status
        finally:
            await claim.__aexit__(None, None, None)

    async def _spawn_and_wait(self, lock: Lock) -> int:
        with anyio.CancelScope(shield=True):
            # Shielded: a process started but never waited for would run unlocked.
            try:
                self.child = await anyio.open_process(
                    _with_shim(self.command), stdin=None, stdout=None, stderr=None
                )
            except PermissionError as exc:
                raise _Failure(
                    EXIT_CANNOT_EXECUTE, f"cannot execute {self.command[0]!r}: {exc.strerror}"
                ) from None
            except OSError as exc:
                raise _Failure(
                    EXIT_NOT_FOUND, f"cannot execute {self.command[0]!r}: {exc.strerror}"
                ) from None
            if self.interrupted is not None:
                self.child.send_signal(self.interrupted)
            async with anyio.create_task_group() as group:
                group.start_soon(self._on_loss, lock, self.child)
                returncode = await self.child.wait()
                group.cancel_scope.cancel()
            # Before the release: check_lost() applies the lease rule on the spot, so a
            # loss the watchdog has not reported yet still counts.
            lost = lock.check_lost()
        status = 128 - returncode if returncode < 0 else returncode
        if lost:
            # Whatever the command says, it did not hold the lock all along: a caller
            # (cron, a script) must not take its work for done under the lock.
            _say(
                f"aiotooz run: lock {self.name!r} was lost while the command ran "
                f"({lock.lost_reason or 'no reason given'}); exit status {EXIT_LOCK_LOST}, "
                f"not the command's {status}"
            )
            return EXIT_LOCK_LOST
        return status

    async def _on_loss(self, lock: Lock, child: Process) -> None:
        # Someone else may hold the lock now: the command must not go on as if it did.
        await lock.wait_lost()
        if not lock.lost or child.returncode is not None:
            return
        lost = f"aiotooz run: lock {self.name!r} was lost ({lock.lost_reason})"
        if self.on_loss == "ignore":  # the exit status still tells (EXIT_LOCK_LOST)
            _say(f"{lost}; the command runs on (--on-loss ignore)")
            return
        if self.kill_after > 0:
            _say(f"{lost}; sending SIGTERM to the command, SIGKILL in {self.kill_after} s")
            child.send_signal(signal.SIGTERM)
            # A command that ignores or outlasts SIGTERM would go on working unlocked
            # while another holder runs. If it ends first, this task is cancelled.
            await anyio.sleep(self.kill_after)
            if child.returncode is not None:
                return
            _say(
                f"aiotooz run: the command still runs {self.kill_after} s after SIGTERM; "
                "sending SIGKILL"
            )
        else:
            _say(f"{lost}; sending SIGKILL to the command (--kill-after 0)")
        child.kill()

    async def _pass_on(self, signals: AsyncIterator[signal.Signals]) -> None:
        async for signum in signals:
            if self.child is None:
                self.interrupted = signum
                if self.waiting is not None:
                    self.waiting.cancel()
            elif self.child.returncode is None and not _terminal_sent(signum):
                self.child.send_signal(signum)


def _say(message: str) -> None:
    # Flushed at once: these lines tell when the lock was lost, next to the command's own
    # output on the same stderr.
    print(message, file=sys.stderr, flush=True)


def _with_shim(command: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-I", "-S", "-c", _SHIM, str(os.getpid()), *command]


def _terminal_sent(signum: int) -> bool:
    """Whether ``signum`` is a Ctrl-C that the terminal sent to the command as well.

    The command runs in aiotooz's process group, so when that group is the terminal's
    foreground group, a Ctrl-C reached the command already; passing it on would deliver
    it twice.
    """
    if signum != signal.SIGINT:
        return False
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


# -- check -------------------------------------------------------------------------


#: How long past ``--timeout`` ``aiotooz check`` waits for its probe to wind down.
_CHECK_GRACE: Final = 0.5


def _check_main(args: argparse.Namespace, settings: CoordinationSettings) -> int:
    print(f"backend:  {settings.redacted_backend_url}")
    # The probe runs in a thread of its own so that --timeout is a hard bound whatever
    # the backend does: a server that accepts but never answers cannot keep a health
    # check (or the monitoring system calling it) waiting.
    outcome: list[tuple[float, float] | BaseException] = []

    def probe() -> None:
        try:
            outcome.append(anyio.run(_probe, settings, args.prefix, args.timeout))
        except BaseException as exc:  # handed to the main thread
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="aiotooz check", daemon=True)
    thread.start()
    thread.join(args.timeout + _CHECK_GRACE)
    result = outcome[0] if outcome else TimeoutError()
    if isinstance(result, ConfigurationError):
        print(f"aiotooz check: FAILED: {type(result).__name__}: {result}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(result, CoordinationError):
        print(f"aiotooz check: FAILED: {type(result).__name__}: {result}", file=sys.stderr)
        return 1
    if isinstance(result, TimeoutError):
        print(
            f"aiotooz check: FAILED: no answer from {settings.redacted_backend_url} "
            f"within {args.timeout} s",
            file=sys.stderr,
        )
        return 1
    if isinstance(result, BaseException):
        raise result
    connect, lock = result
    print(f"connect:  {connect * 1000:.1f} ms")
    print(f"lock:     {lock * 1000:.1f} ms (acquire and release of a probe lock)")
    print(f"settings: {settings!r}")
    print("ok")
    return 0


async def _probe(settings: CoordinationSettings, prefix: str, within: float) -> tuple[float, float]:
    # No call may outlast the check, nor the shutdown that follows a timeout.
    settings = settings.model_copy(update={"call_timeout": min(settings.call_timeout, within)})
    with anyio.fail_after(within):
        started = time.perf_counter()
        async with Coordinator(prefix=prefix, settings=settings) as coordinator:
            connected = time.perf_counter()
            lock = coordinator.get_lock(f"aiotooz-check-{uuid.uuid4().hex[:12]}")
            if not await lock.acquire(blocking=False):
                raise BackendUnavailable(
                    "the probe lock, a fresh name nobody else uses, was not acquired"
                )
            await lock.release()
            locked = time.perf_counter()
    return connected - started, locked - connected
