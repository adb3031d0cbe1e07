"""Developer tasks; CONTRIBUTING.md says when to run which.

`nox` runs what CI runs: lint, typecheck, the tests on the oldest and newest supported
Python (under coverage), coverage (combines and checks them), examples, the docs and
the failover scenarios.
`nox -s tests-3.12`, `nox -s bench` and `nox -s docs_serve` are there to be asked for.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

# Every Python the package supports (requires-python and the classifiers say the same).
PYTHONS = ["3.11", "3.12", "3.13"]
OLDEST, NEWEST = PYTHONS[0], PYTHONS[-1]

# The order matters: `coverage` combines the data the `tests` sessions before it wrote.
nox.options.sessions = [
    "lint",
    "typecheck",
    f"tests-{OLDEST}",
    f"tests-{NEWEST}",
    "coverage",
    "examples",
    "docs",
    "failover",
]

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml("pyproject.toml")
# Test processes at once (pytest-xdist): the suite mostly waits on servers and timers,
# so three on two cores take about half the time of one.
TEST_PROCESSES = os.environ.get("AIOTOOZ_TEST_PROCESSES", "3")
# One data file per process of every tests session (hundreds: the tests start processes).
COVERAGE_DATA = ROOT / ".coverage-data"
# mkdocs-material prints a banner about MkDocs 2.0 on every build; it says nothing about ours.
MKDOCS_ENV = {"NO_MKDOCS_2_WARNING": "1"}


def install(session: nox.Session, *groups: str, extras: str = "all") -> None:
    """Install the project (editable, with backend extras) and dependency groups."""
    session.install("-e", f".[{extras}]" if extras else ".")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite against real servers, under coverage (CONTRIBUTING.md)."""
    install(session, "test", "coverage")
    # Each run replaces its own Python's data; `coverage` combines what is there.
    # (An absolute path: the processes the tests start run in other directories.)
    COVERAGE_DATA.mkdir(exist_ok=True)
    data = COVERAGE_DATA / f".coverage.tests-{session.python}"
    for stale in COVERAGE_DATA.glob(f"{data.name}.*"):
        stale.unlink()
    env = {"COVERAGE_FILE": str(data)}
    # `-- -n 0` (or any -n) after the session overrides the number of test processes.
    workers = ["-n", TEST_PROCESSES]
    session.run("coverage", "run", "-m", "pytest", *workers, *session.posargs, env=env)


@nox.session
def coverage(session: nox.Session) -> None:
    """Combine the `tests` sessions' data; fail under the floor set in pyproject.toml."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "coverage"))
    if not any(COVERAGE_DATA.glob(".coverage.tests-*")):
        session.error("no coverage data: run a tests session first (nox -s tests-3.11)")
    session.run("coverage", "combine", "--keep", str(COVERAGE_DATA))
    session.run("coverage", "report")


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
    """ruff (lint and format) and codespell; the pre-commit hooks run the same."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("codespell")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src/ and tests/, with every backend's client library."""
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
def docs(session: nox.Session) -> None:
    """Build the site into site/, strictly: a warning, broken link or reference fails."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs, env=MKDOCS_ENV
    )


@nox.session(default=False)
def docs_serve(session: nox.Session) -> None:
    """Serve the docs with live reload on http://127.0.0.1:8000."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run("mkdocs", "serve", *session.posargs, env=MKDOCS_ENV)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark against the peers, waiting across processes, and scale per backend.

    Starts private servers (tests/_servers.py); `-- --quick` for a smoke run.
    """
    install(session, "bench")
    session.run("python", str(ROOT / "benchmarks" / "bench.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "wakeups.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "scale.py"), *session.posargs)
