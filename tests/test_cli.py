"""The ``aiotooz`` command, run as users run it: in a subprocess, on real backends."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from aiotooz._cli import EXIT_CONFIG, EXIT_LOCK_LOST, EXIT_NOT_ACQUIRED
from aiotooz._cli_locks import EXIT_NOT_HELD, EXIT_REFUSED

from .support.helpers import ServerPool, url_for
from .support.procs import holding_process, worker_process
from .support.servers import PrivateRedis, free_port

PY = sys.executable

# A command that records when it ran: "<tag> start <t>" and "<tag> end <t>" lines.
RECORD = """\
import sys, time
log, tag, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(log, "a") as f:
    f.write(f"{tag} start {time.time()!r}\\n")
time.sleep(seconds)
with open(log, "a") as f:
    f.write(f"{tag} end {time.time()!r}\\n")
"""

# A command that says it started (touches a file) and runs until a file appears.
HOLD = """\
import os, sys, time
ready, release = sys.argv[1], sys.argv[2]
open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.02)
"""

# A command that exits with 40 + the number of the first signal it gets.
TRAP = """\
import os, signal, sys, time
def on_signal(signum, frame):
    os._exit(40 + signum)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, on_signal)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])  # whole, or not there yet
time.sleep(60)
os._exit(1)
"""


def env(**extra: str) -> dict[str, str]:
    """The environment for aiotooz, without the developer's own AIOTOOZ_* settings.

    The call timeout is raised from 5 s: on a loaded 2-core machine (a full test run
    beside other work) a new process's first connection to Redis took longer, and
    ``aiotooz run`` exited with 69 before the behaviour under test. Tests of the
    timeout itself set their own.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIOTOOZ_")}
    clean["AIOTOOZ_CALL_TIMEOUT"] = "20"
    clean.update(extra)
    return clean


def aiotooz(*args: str, cwd: Path, pipes: bool = True, **extra: str) -> subprocess.Popen[str]:
    """Start aiotooz; without ``pipes``, its output is discarded (a command that outlives
    it would otherwise keep the pipes open)."""
    output = subprocess.PIPE if pipes else subprocess.DEVNULL
    return subprocess.Popen(
        [PY, "-m", "aiotooz", *args],
        cwd=cwd,
        env=env(**extra),
        stdout=output,
        stderr=output,
        text=True,
    )


def run(
    *args: str, cwd: Path, timeout: float = 60, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "aiotooz", *args],
        cwd=cwd,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_args(
    *command: str,
    backend: str | None = None,
    prefix: str | None = None,
    options: Sequence[str] = (),
    name: str = "job",
) -> list[str]:
    """The arguments of ``aiotooz run [--backend B] [--prefix P] OPTIONS NAME -- COMMAND``,
    for :func:`aiotooz` (started) or :func:`run` (to completion)."""
    where = []
    if backend is not None:
        where += ["--backend", backend]
    if prefix is not None:
        where += ["--prefix", prefix]
    return ["run", *where, *options, name, "--", *command]


def wait_for_file(path: Path, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"exited with {proc.returncode} before {path.name}: {err}")
        assert time.monotonic() < deadline, f"{path} did not appear within 60 s"
        time.sleep(0.02)


def wait_for_log(proc: subprocess.Popen[str], text: str) -> None:
    """Read ``proc``'s stderr until a line holds ``text`` (what it read is consumed)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if text in line:
            return
    raise AssertionError(f"aiotooz exited with {proc.wait()} before it logged {text!r}")


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"aiotooz did not finish within {timeout} s: {err}") from None
    return proc.returncode, out, err


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits to be reaped. (Its /proc entry can go between
    # the kill(0) and the read, which then fails with ESRCH or ENOENT: dead as well.)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


@pytest.fixture
def holder(tmp_path: Path, backend_url: str, prefix: str) -> Iterator[tuple[str, Path]]:
    """Another ``aiotooz run`` holds the lock "job" until the test ends."""
    ready, release = tmp_path / "ready", tmp_path / "release"
    hold = (PY, "-c", HOLD, str(ready), str(release))
    proc = aiotooz(*run_args(*hold, backend=backend_url, prefix=prefix), cwd=tmp_path)
    try:
        wait_for_file(ready, proc)
        yield backend_url, release
    finally:
        release.touch()
        status, _, err = finish(proc)
        assert status == 0, err


# -- help and packaging -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ["run", "check", "locks", "AIOTOOZ_BACKEND_URL"]),
        (("locks",), ["list", "show", "break", f"{EXIT_REFUSED}   the backend refused"]),
        (("locks", "list"), ["--json", "--prefix", "NAME_PREFIX"]),
        (("locks", "break"), ["--yes", "--backend"]),
        (
            ("run",),
            [
                "--no-wait",
                "--wait",
                str(EXIT_NOT_ACQUIRED),
                "128+N",
                "SIGKILL",
                "--kill-after",
                f"{EXIT_LOCK_LOST}   the lock was lost while the command ran",
                "--once-per DURATION",
                "--finish-required",
                "with --once-per: this window was claimed already",
            ],
        ),
        (("check",), ["probe lock", "--timeout", "AIOTOOZ_BACKEND_URL"]),
    ],
)
def test_help_for_every_command(tmp_path: Path, args: tuple[str, ...], expected: list[str]) -> None:
    done = run(*args, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for text in expected:
        assert text in done.stdout


def test_no_command_prints_usage_and_fails(tmp_path: Path) -> None:
    done = run(cwd=tmp_path)
    assert done.returncode == 2
    assert "usage: aiotooz" in done.stderr


def test_console_script_is_declared() -> None:
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="aiotooz")
    assert script.value == "aiotooz._cli:main"
    installed = shutil.which("aiotooz", path=str(Path(PY).parent))
    assert installed is not None, "reinstall the project (pip install -e .) for the script"
    done = subprocess.run([installed, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: aiotooz" in done.stdout


# -- run --------------------------------------------------------------------------


def test_two_runs_on_one_name_take_turns(tmp_path: Path, backend_url: str, prefix: str) -> None:
    log = tmp_path / "log"
    records = [(PY, "-c", RECORD, str(log), tag, "0.5") for tag in ("a", "b")]
    procs = [
        aiotooz(
            *run_args(*record, backend=backend_url, prefix=prefix, name="nightly"), cwd=tmp_path
        )
        for record in records
    ]
    for proc in procs:
        status, _, err = finish(proc)
        assert status == 0, err
    events = [line.split() for line in log.read_text().splitlines()]
    assert len(events) == 4
    # One ran start to end, then the other: never interleaved.
    (first, s1, t1), (first_end, e1, t2), (second, s2, t3), (second_end, e2, t4) = events
    assert (s1, e1, s2, e2) == ("start", "end", "start", "end")
    assert first == first_end != second == second_end
    assert float(t1) <= float(t2) <= float(t3) <= float(t4)


def test_runs_on_different_names_run_side_by_side(tmp_path: Path, file_url: str) -> None:
    # Each command waits until the other one has started: they can both finish only if
    # they run at the same time.
    script = """\
import os, sys, time
mine, other = sys.argv[1], sys.argv[2]
open(mine, "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(other):
    assert time.monotonic() < deadline, "the other command never ran alongside"
    time.sleep(0.02)
"""
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [
        aiotooz(
            *run_args(PY, "-c", script, str(x), str(y), backend=file_url, name=name), cwd=tmp_path
        )
        for name, x, y in (("one", a, b), ("two", b, a))
    ]
    for proc in procs:
        status, _, err = finish(proc)
        assert status == 0, err


def test_no_wait_gives_the_documented_status_at_once(
    tmp_path: Path, holder: tuple[str, Path], prefix: str
) -> None:
    url, _ = holder
    marker = tmp_path / "ran"
    started = time.monotonic()
    touch = ("touch", str(marker))
    done = run(*run_args(*touch, backend=url, prefix=prefix, options=["--no-wait"]), cwd=tmp_path)
    assert done.returncode == EXIT_NOT_ACQUIRED == 75, done.stderr
    assert time.monotonic() - started < 30
    assert "'job' is held elsewhere" in done.stderr
    assert not marker.exists()
    custom = run(
        *run_args(*touch, backend=url, prefix=prefix, options=["-n", "-E", "3"]), cwd=tmp_path
    )
    assert custom.returncode == 3
    assert not marker.exists()


def test_wait_gives_up_after_its_budget(
    tmp_path: Path, holder: tuple[str, Path], prefix: str
) -> None:
    url, _ = holder
    started = time.monotonic()
    done = run(*run_args("true", backend=url, prefix=prefix, options=["--wait", "1"]), cwd=tmp_path)
    assert done.returncode == EXIT_NOT_ACQUIRED, done.stderr
    assert time.monotonic() - started >= 1
    assert "not acquired within 1.0 s" in done.stderr


def test_wait_gets_the_lock_when_it_is_released(
    tmp_path: Path, holder: tuple[str, Path], prefix: str
) -> None:
    url, release = holder
    echo = ("echo", "mine now")
    proc = aiotooz(
        *run_args(*echo, backend=url, prefix=prefix, options=["--wait", "60"]), cwd=tmp_path
    )
    time.sleep(0.5)
    assert proc.poll() is None, "did not wait for the holder"
    release.touch()
    status, out, err = finish(proc)
    assert (status, out) == (0, "mine now\n"), err


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["true"], 0),
        (["sh", "-c", "exit 3"], 3),
        (["sh", "-c", "exit 255"], 255),
        (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
        (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
        (["no-such-command-for-aiotooz"], 127),
        (["/etc/hostname"], 126),
    ],
)
def test_exit_status_is_the_commands(
    tmp_path: Path, file_url: str, command: list[str], expected: int
) -> None:
    done = run(*run_args(*command, backend=file_url), cwd=tmp_path)
    assert done.returncode == expected, done.stderr
    # And the lock is free again, whatever happened to the command.
    again = run(*run_args("true", backend=file_url, options=["--no-wait"]), cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_output_and_arguments_pass_through(tmp_path: Path, file_url: str) -> None:
    script = "import sys; print(sys.argv[1:]); print('err', file=sys.stderr)"
    done = run(*run_args(PY, "-c", script, "-n", "a b", backend=file_url), cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == "['-n', 'a b']\n"
    assert done.stderr == "err\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_are_passed_on_to_the_command(
    tmp_path: Path, backend_url: str, prefix: str, signum: signal.Signals
) -> None:
    pid_file = tmp_path / "pid"
    trap = (PY, "-c", TRAP, str(pid_file))
    proc = aiotooz(*run_args(*trap, backend=backend_url, prefix=prefix), cwd=tmp_path)
    wait_for_file(pid_file, proc)
    time.sleep(0.2)  # the pid file is written after the handlers are installed
    proc.send_signal(signum)
    status, _, err = finish(proc)
    # The command caught it and chose its own status: aiotooz passed it on and waited.
    assert status == 40 + signum, err
    free = run_args("true", backend=backend_url, prefix=prefix, options=["--no-wait"])
    again = run(*free, cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_a_signal_while_waiting_gives_up_without_running(
    tmp_path: Path, holder: tuple[str, Path], prefix: str
) -> None:
    url, _ = holder
    marker = tmp_path / "ran"
    touch = ("touch", str(marker))
    proc = aiotooz(*run_args(*touch, backend=url, prefix=prefix, options=["-v"]), cwd=tmp_path)
    # Connected, then waiting: a fixed sleep was too short on a loaded machine (the
    # signal came before aiotooz handled signals, and killed it).
    wait_for_log(proc, "coordinator started")
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    status, _, err = finish(proc)
    assert status == 128 + signal.SIGTERM, err
    assert not marker.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_aiotooz_kills_the_command_and_frees_the_lock(
    tmp_path: Path, file_url: str
) -> None:
    pid_file = tmp_path / "pid"
    trap = (PY, "-c", TRAP, str(pid_file))
    proc = aiotooz(*run_args(*trap, backend=file_url), cwd=tmp_path, pipes=False)
    try:
        wait_for_file(pid_file, proc)
        child = int(pid_file.read_text())
    finally:
        proc.kill()
        proc.wait(timeout=30)
    try:
        deadline = time.monotonic() + 30
        while pid_alive(child):
            assert time.monotonic() < deadline, "the command outlived aiotooz"
            time.sleep(0.05)
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)
    # The file backend's lock died with the process that held it.
    again = run(*run_args("true", backend=file_url, options=["--no-wait"]), cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_killing_aiotooz_on_redis_frees_the_lock_when_its_ttl_ends(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    # The TTL leaves time for the check below: a new aiotooz process, started beside a
    # full test run, took more than 3 s to ask (and found the lock already expired).
    url = f"{redis_url}?lock_timeout=8"
    pid_file = tmp_path / "pid"
    trap = (PY, "-c", TRAP, str(pid_file))
    proc = aiotooz(*run_args(*trap, backend=url, prefix=prefix), cwd=tmp_path, pipes=False)
    wait_for_file(pid_file, proc)
    child = int(pid_file.read_text())
    proc.kill()
    proc.wait(timeout=30)
    if pid_alive(child):  # not Linux: the command outlives aiotooz
        os.kill(child, signal.SIGKILL)
    blocked = run(*run_args("true", backend=url, prefix=prefix, options=["-n"]), cwd=tmp_path)
    assert blocked.returncode == EXIT_NOT_ACQUIRED, "Redis freed a dead client's lock early"
    later = run(
        *run_args("true", backend=url, prefix=prefix, options=["--wait", "30"]), cwd=tmp_path
    )
    assert later.returncode == 0, later.stderr


def test_settings_come_from_the_environment(tmp_path: Path, prefix: str) -> None:
    locks = tmp_path / "env-locks"
    done = run(*run_args("true", prefix=prefix), cwd=tmp_path, AIOTOOZ_BACKEND_URL=locks.as_uri())
    assert done.returncode == 0, done.stderr
    assert any(locks.iterdir()), "the lock was not taken on the backend from the environment"


def test_backend_option_overrides_the_environment(tmp_path: Path, file_url: str) -> None:
    unreachable = "redis://127.0.0.1:1"
    done = run(*run_args("true", backend=file_url), cwd=tmp_path, AIOTOOZ_BACKEND_URL=unreachable)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("backend", "expected", "message"),
    [
        ("not a url", 78, "backend_url: must be a URL"),
        ("nosuchscheme://x", 78, "nosuchscheme"),
        ("redis://:hunter2@127.0.0.1:{port}", 69, "cannot reach the backend"),
    ],
)
def test_run_fails_clearly_on_a_bad_backend(
    tmp_path: Path, backend: str, expected: int, message: str
) -> None:
    marker = tmp_path / "ran"
    url = backend.format(port=free_port())
    done = run(*run_args("touch", str(marker), backend=url), cwd=tmp_path)
    assert done.returncode == expected, done.stderr
    assert message in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--wait", "-1"), "seconds >= 0"),
        (("--wait", "soon"), "seconds >= 0"),
        (("--wait", "1", "--no-wait"), "not allowed with"),
        (("-E", "256"), "exit status 0..255"),
        (("--kill-after", "-1"), "seconds >= 0"),
        (("--kill-after", "inf"), "seconds >= 0"),
        (("--once-per", "0.5s"), "at least 1 s such as 30s"),
        (("--once-per", "1w"), "at least 1 s such as 30s"),
        (("--once-per", "1h", "--no-wait"), "not allowed with"),
        (("--finish-required",), "--finish-required goes with --once-per"),
    ],
)
def test_run_rejects_bad_options(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    done = run(*run_args("true", options=args), cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr


def test_once_per_runs_the_command_once_a_window(
    tmp_path: Path, backend_url: str, prefix: str
) -> None:
    log = tmp_path / "log"
    command = (PY, "-c", RECORD, str(log))
    options = ("--backend", backend_url, "--prefix", prefix, "--once-per", "1h")
    first = run("run", *options, "nightly", "--", *command, "first", "0", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run("run", *options, "nightly", "--", *command, "second", "0", cwd=tmp_path)
    assert second.returncode == 0, second.stderr  # the documented status: not run
    told = run("run", *options, "-E", "75", "nightly", "--", *command, "third", "0", cwd=tmp_path)
    assert told.returncode == 75, told.stderr
    assert [line.split()[:2] for line in log.read_text().splitlines()] == [
        ["first", "start"],
        ["first", "end"],
    ]


def test_once_per_finish_required_runs_again_after_a_failure(tmp_path: Path, file_url: str) -> None:
    options = ("--backend", file_url, "--once-per", "1h", "--finish-required")
    marker = tmp_path / "ran"
    fail = ("--", PY, "-c", "raise SystemExit(3)")
    assert run("run", *options, "job", *fail, cwd=tmp_path).returncode == 3
    touch = ("--", PY, "-c", f"open({str(marker)!r}, 'a').write('x')")
    assert run("run", *options, "job", *touch, cwd=tmp_path).returncode == 0
    assert run("run", *options, "job", *touch, cwd=tmp_path).returncode == 0
    assert marker.read_text() == "x"  # failed, then ran, then done


@pytest.mark.parametrize(
    ("name", "message"), [("", "must not be empty"), ("x" * 1025, "at most 1024 characters")]
)
def test_run_refuses_a_bad_lock_name_as_bad_usage(
    tmp_path: Path, file_url: str, name: str, message: str
) -> None:
    """It exited 69, as if the backend could not be reached."""
    marker = tmp_path / "ran"
    done = run(*run_args("touch", str(marker), backend=file_url, name=name), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "argument NAME" in done.stderr and message in done.stderr
    assert not marker.exists()


def test_run_refuses_a_name_the_backend_cannot_lock_as_configuration(
    tmp_path: Path, server_pool: ServerPool
) -> None:
    """MySQL keys are at most 64 characters: a long prefix and name exited 69."""
    url = url_for("mysql", server_pool, tmp_path)
    marker = tmp_path / "ran"
    touch = ("touch", str(marker))
    done = run(*run_args(*touch, backend=url, prefix="p" * 10, name="x" * 60), cwd=tmp_path)
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "64" in done.stderr
    assert not marker.exists()


# -- check ------------------------------------------------------------------------


def test_check_reports_a_working_backend(tmp_path: Path, backend_url: str) -> None:
    done = run("check", "--backend", backend_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    assert lines["backend"].strip() == backend_url
    assert lines["connect"].strip().endswith("ms")
    assert lines["lock"].strip().split()[1] == "ms"
    assert "CoordinationSettings(backend_url=" in lines["settings"]
    assert done.stdout.splitlines()[-1] == "ok"


def test_check_fails_on_an_unreachable_backend(tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}"
    done = run("check", "--backend", url, cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED: BackendUnavailable" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "redis://:***@127.0.0.1" in done.stdout


def test_check_fails_on_bad_settings(tmp_path: Path) -> None:
    done = run("check", cwd=tmp_path, AIOTOOZ_HEARTBEAT="-1")
    assert done.returncode == EXIT_CONFIG
    assert "heartbeat" in done.stderr


@pytest.mark.parametrize("subcommand", [("check",), ("run", "--no-wait", "job", "--", "true")])
@pytest.mark.parametrize(
    "url", ["redis://[::1", "redis://:hunter2@127.0.0.1:port", "nosuchscheme://host"]
)
def test_a_bad_backend_url_is_a_configuration_error(
    tmp_path: Path, subcommand: tuple[str, ...], url: str
) -> None:
    """An unparsable URL printed a traceback and exited 1."""
    done = run(subcommand[0], "--backend", url, *subcommand[1:], cwd=tmp_path)
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "Traceback" not in done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "backend" in done.stderr


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[str]:
    """A private redis-server that requires the password ``hunter2``."""
    server = PrivateRedis(tmp_path / "redis", password="hunter2")
    server.start()
    try:
        yield server.url
    finally:
        server.close()


def test_check_never_prints_the_password(tmp_path: Path, redis_with_password: str) -> None:
    done = run("check", cwd=tmp_path, AIOTOOZ_BACKEND_URL=redis_with_password)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "redis://:***@127.0.0.1" in done.stdout
    wrong = run("check", "--backend", redis_with_password.replace("hunter2", "wrong"), cwd=tmp_path)
    assert wrong.returncode == 1
    assert "wrong" not in wrong.stdout + wrong.stderr


# -- losing the lock while the command runs ------------------------------------------

# A command that writes its pid, then runs for argv[4] seconds and exits 0. On SIGTERM
# it appends the time to argv[2], then exits with argv[3], or runs on if that is "ignore".
LOSE = """\
import os, signal, sys, time
pid_file, term_file, on_term, runs_for = sys.argv[1:5]
def on_sigterm(signum, frame):
    with open(term_file, "a") as f:
        f.write(f"{time.time()!r}\\n")
    if on_term != "ignore":
        os._exit(int(on_term))
signal.signal(signal.SIGTERM, on_sigterm)
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)  # whole, or not there yet
deadline = time.monotonic() + float(runs_for)
while time.monotonic() < deadline:
    time.sleep(0.02)
os._exit(0)
"""


def run_and_lose_the_lock(
    tmp_path: Path, url: str, prefix: str, *options: str, on_term: str, runs_for: float
) -> tuple[subprocess.Popen[str], int]:
    """Start ``aiotooz run`` of LOSE on Redis, then lose its lock; return it and the pid."""
    import redis

    pid_file = tmp_path / "pid"
    lose = (PY, "-c", LOSE, str(pid_file), str(tmp_path / "term"), on_term, str(runs_for))
    proc = aiotooz(*run_args(*lose, backend=url, prefix=prefix, options=options), cwd=tmp_path)
    wait_for_file(pid_file, proc)
    time.sleep(0.2)  # the pid file is written after the handler is installed
    # The lock's key vanishes from Redis (an operator, an eviction, a TTL that ran out):
    # the next heartbeat's ownership check finds the lock gone.
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"*{prefix}job*"))
    assert keys, "the lock's key was not found in Redis"
    client.delete(*keys)
    client.close()
    return proc, int(pid_file.read_text())


def sigterms(tmp_path: Path) -> list[float]:
    """When the command got SIGTERM (LOSE's record), oldest first."""
    term = tmp_path / "term"
    return [float(line) for line in term.read_text().split()] if term.exists() else []


@pytest.mark.parametrize(
    ("on_loss", "on_term", "command_status"),
    [
        ("terminate", "0", 0),  # exits 0 on SIGTERM: was 0, as if all went well
        ("terminate", "55", 55),
        ("ignore", "ignore", 0),  # runs to its end, with no lock for most of it
    ],
)
def test_losing_the_lock_gives_its_own_status_whatever_the_commands(
    tmp_path: Path, private_redis: PrivateRedis, prefix: str, on_loss: str, on_term: str,
    command_status: int,
) -> None:  # fmt: skip
    proc, _ = run_and_lose_the_lock(tmp_path, private_redis.url, prefix, "--on-loss", on_loss,
                                    on_term=on_term, runs_for=5)  # fmt: skip
    status, _, err = finish(proc)
    assert status == EXIT_LOCK_LOST == 76, err
    assert "lock 'job' was lost while the command ran (" in err, err
    assert f"exit status {EXIT_LOCK_LOST}, not the command's {command_status}" in err, err
    # terminate: the command got SIGTERM (once); ignore: it was left alone.
    assert len(sigterms(tmp_path)) == (on_loss == "terminate"), err
    # The lock is free again for the next run.
    free = run_args("true", backend=private_redis.url, prefix=prefix, options=["--no-wait"])
    again = run(*free, cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_a_command_that_ignores_sigterm_is_killed_after_kill_after(
    tmp_path: Path, private_redis: PrivateRedis, prefix: str
) -> None:
    proc, child = run_and_lose_the_lock(tmp_path, private_redis.url, prefix,
                                        "--kill-after", "0.5", on_term="ignore",
                                        runs_for=60)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while pid_alive(child):
            assert time.monotonic() < deadline, "the command ran on without the lock"
            time.sleep(0.01)
        died = time.time()
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)
    status, _, err = finish(proc)
    (term,) = sigterms(tmp_path)
    # SIGTERM first, then SIGKILL --kill-after seconds later, not before (the upper bound
    # is generous for a loaded machine).
    assert 0.4 <= died - term < 10, (died - term, err)
    assert status == EXIT_LOCK_LOST, err
    assert "sending SIGKILL" in err, err
    assert f"not the command's {128 + signal.SIGKILL}" in err, err


def test_kill_after_zero_kills_at_once_without_sigterm(
    tmp_path: Path, private_redis: PrivateRedis, prefix: str
) -> None:
    proc, _ = run_and_lose_the_lock(tmp_path, private_redis.url, prefix, "--kill-after", "0",
                                    on_term="0", runs_for=60)  # fmt: skip
    status, _, err = finish(proc, timeout=30)
    assert status == EXIT_LOCK_LOST, err
    assert sigterms(tmp_path) == [], "--kill-after 0 sent SIGTERM first"
    assert f"not the command's {128 + signal.SIGKILL}" in err, err


def test_logs_go_to_stderr_and_never_into_the_commands_output(
    tmp_path: Path, backend_url: str, prefix: str
) -> None:
    echo = ("echo", "only this")
    done = run(*run_args(*echo, backend=backend_url, prefix=prefix, options=["-vv"]), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "only this\n"
    assert "coordinator started" in done.stderr and "lock acquired" in done.stderr


# Counts the SIGINTs it gets in the second after the first one; exits with 40 + count.
COUNT_SIGINT = """\
import os, signal, sys, time
count = 0
def on_sigint(signum, frame):
    global count
    count += 1
signal.signal(signal.SIGINT, on_sigint)
open(sys.argv[1], "w").close()
deadline = time.monotonic() + 60
while count == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(1.0)
os._exit(40 + count)
"""


def test_ctrl_c_at_a_terminal_reaches_the_command_once(tmp_path: Path, file_url: str) -> None:
    import pty
    import select

    ready = tmp_path / "ready"
    argv = [PY, "-m", "aiotooz", *run_args(PY, "-c", COUNT_SIGINT, str(ready), backend=file_url)]
    environment = env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: aiotooz in the foreground of a terminal of its own
        try:
            os.chdir(tmp_path)
            os.execve(PY, argv, environment)
        finally:
            os._exit(99)
    output = b""
    status = None
    try:
        deadline = time.monotonic() + 60
        typed = False
        while status is None:
            assert time.monotonic() < deadline, f"no exit within 60 s: {output!r}"
            if not typed and ready.exists():
                os.write(fd, b"\x03")  # Ctrl-C: the terminal signals the foreground group
                typed = True
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:  # the terminal closed
                    pass
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    # One SIGINT from the terminal; aiotooz did not pass on a second one.
    assert status == 41, output


# -- locks: who holds which lock, and breaking one ------------------------------------------


def test_locks_list_and_show_name_the_holder(
    tmp_path: Path, holder: tuple[str, Path], prefix: str
) -> None:
    backend_url, _ = holder
    listed = run("locks", "list", "--backend", backend_url, "--prefix", prefix, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "MEMBER", "PID"]
    assert row.split()[0] == "job"
    assert row.split()[1].startswith(prefix)
    as_json = run(
        "locks", "list", "--json", "--backend", backend_url, "--prefix", prefix, cwd=tmp_path
    )
    assert as_json.returncode == 0, as_json.stderr
    (held,) = json.loads(as_json.stdout)
    assert held["name"] == "job"
    assert held["member_id"].startswith(prefix)
    assert isinstance(held["pid"], int)
    assert held["since"] <= time.time()
    assert set(held) == {"name", "member_id", "pid", "host", "since", "fencing_token", "waiters"}
    shown = run(
        "locks", "show", "job", "--json", "--backend", backend_url, "--prefix", prefix, cwd=tmp_path
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == held
    elsewhere = run(
        "locks", "list", "nothing-", "--backend", backend_url, "--prefix", prefix, cwd=tmp_path
    )
    assert elsewhere.stdout.splitlines()[1:] == []
    free = run("locks", "show", "free", "--backend", backend_url, "--prefix", prefix, cwd=tmp_path)
    assert (free.returncode, free.stdout.strip()) == (EXIT_NOT_HELD, "free: not held")


@pytest.mark.parametrize("backend", ["redis", "zookeeper", "etcd3+http"])
def test_locks_break_frees_the_lock_and_tells_its_holder(
    tmp_path: Path, backend: str, server_pool: ServerPool, prefix: str
) -> None:
    url = url_for(backend, server_pool, tmp_path)
    with worker_process("hold-fenced", url, prefix, "stuck") as worker:
        held = worker.readline()
        assert held.startswith("held "), held
        done = run(
            "locks", "break", "stuck", "--yes", "--backend", url, "--prefix", prefix, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr
        assert "stuck: broken" in done.stdout
        told = worker.readline()  # within its heartbeat (0.3 s); the test's timeout bounds it
        assert told.startswith("lost ") and "broken" in told, told
        again = run(
            "locks", "break", "stuck", "--yes", "--backend", url, "--prefix", prefix, cwd=tmp_path
        )
        assert again.returncode == EXIT_NOT_HELD, again.stderr


def test_locks_break_is_refused_where_the_backend_cannot(
    tmp_path: Path, file_url: str, prefix: str
) -> None:
    with holding_process("hold", file_url, prefix, "stuck") as worker:
        done = run(
            "locks",
            "break",
            "stuck",
            "--yes",
            "--backend",
            file_url,
            "--prefix",
            prefix,
            cwd=tmp_path,
        )
        assert done.returncode == EXIT_REFUSED
        assert f"kill {worker.pid}" in done.stderr
        assert "Traceback" not in done.stderr
        # Without --yes and without a terminal to confirm at, nothing is done.
        unasked = run(
            "locks", "break", "stuck", "--backend", file_url, "--prefix", prefix, cwd=tmp_path
        )
        assert unasked.returncode == 2
        assert "--yes" in unasked.stderr


def test_locks_refuses_bad_settings_and_names(tmp_path: Path) -> None:
    bad = run("locks", "list", "--backend", "nosuchscheme://host", cwd=tmp_path)
    assert bad.returncode == EXIT_CONFIG, bad.stderr
    assert "Traceback" not in bad.stderr
    env_bad = run("locks", "show", "x", cwd=tmp_path, AIOTOOZ_HEARTBEAT="-1")
    assert env_bad.returncode == EXIT_CONFIG
    empty = run("locks", "show", "", "--backend", (tmp_path / "l").as_uri(), cwd=tmp_path)
    assert empty.returncode != 0
    assert "Traceback" not in empty.stderr


def test_locks_list_is_refused_where_the_backend_cannot_list(
    tmp_path: Path, server_pool: ServerPool
) -> None:
    url = url_for("memcached", server_pool, tmp_path)
    done = run("locks", "list", "--backend", url, cwd=tmp_path)
    assert done.returncode == EXIT_REFUSED
    assert "cannot list the locks held" in done.stderr
