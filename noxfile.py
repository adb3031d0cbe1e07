"""Developer tasks. `nox` runs lint, typecheck, tests and examples; `nox -s bench` is separate."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests", "examples"]

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
