"""Developer tasks. `nox` runs lint, typecheck, tests, examples and failover; `nox -s bench` is
separate."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests", "examples", "failover"]

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml("pyproject.toml")


def install(session: nox.Session, *groups: str, extras: str = "all") -> None:
    """Install the project (editable, with backend extras) and dependency groups."""
    session.install("-e", f".[{extras}]")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, against real servers (see README, Development)."""
    install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def failover(session: nox.Session) -> None:
    """Locks on three-node etcd, ZooKeeper and Redis Sentinel clusters under faults.

    Runs tests/failover in a private network namespace (``unshare --net``: its loopback
    carries only the test's traffic, and its firewall rules vanish with it), so it needs
    root, ``unshare``, ``ip`` and ``nft``. Prints each scenario's measured figures
    (docs/failover.md).
    """
    if os.geteuid() != 0:
        reason = "the failover scenarios need root (a network namespace and nftables)"
        if os.environ.get("CI"):
            session.error(reason)  # under CI a scenario that cannot run is a failure
        session.skip(reason)
    install(session, "test")
    with tempfile.TemporaryDirectory(prefix="aiotooz-failover-") as results_dir:
        results = Path(results_dir) / "results.jsonl"
        session.run(
            "unshare",
            "--net",
            "--",
            "sh",
            "-c",
            'ip link set lo up && exec "$@"',
            "sh",
            "python",
            "-m",
            "pytest",
            "-m",
            "failover",
            "tests/failover",
            *session.posargs,
            env={"AIOTOOZ_FAILOVER_RESULTS": str(results)},
            external=True,
        )
        for line in results.read_text().splitlines() if results.exists() else []:
            session.log(" ".join(f"{k}={v}" for k, v in json.loads(line).items()))


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install(session, "typecheck")
    session.run("mypy")


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example on the embedded default backend."""
    install(session, "examples", extras="redis,fastapi")
    for script in sorted((ROOT / "examples").glob("*.py")):
        session.log(f"example: {script.name}")
        session.run("python", str(script), env={"AIOTOOZ_BACKEND_URL": ""}, silent=False)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark against the peers, then waiting across processes on every backend.

    Starts private servers (tests/_servers.py); `-- --quick` for a smoke run.
    """
    install(session, "bench")
    session.run("python", str(ROOT / "benchmarks" / "bench.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "wakeups.py"), *session.posargs)
