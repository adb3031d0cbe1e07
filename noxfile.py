"""Developer tasks; CONTRIBUTING.md says when to run which.

`nox` runs what CI runs: lint, typecheck, the tests on the oldest and newest supported
Python (under coverage), coverage (combines and checks them), a subset of the tests at
the lowest dependency versions, the examples, the docs, the package (built, checked and
installed alone) and the failover scenarios. `nox -s tests-3.12`, `nox -s bench` and
`nox -s docs_serve` are there to be asked for.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import zipfile
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
    "tests_lowest",
    "examples",
    "docs",
    "package",
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


#: What `tests_lowest` runs unless told otherwise: the whole suite (about 11 minutes on two
#: cores for one Python) would push CI past its 30 minutes; this subset is the conformance
#: suite over every backend, each backend's own tests (the client libraries' oldest
#: versions meet their quirks there) and the locks', semaphores' and leadership's files.
LOWEST_TESTS = [
    "tests/test_conformance.py",
    "tests/drivers",
    "tests/test_lock.py",
    "tests/test_semaphore.py",
    "tests/test_leadership.py",
]


def _lowest_pins() -> list[str]:
    """`name==X` for each `name>=X` the package declares: its dependencies and every
    backend's extra (not fastapi or otel, which the tests install at their own bounds)."""
    from packaging.requirements import Requirement

    project = PYPROJECT["project"]
    (everything,) = project["optional-dependencies"]["all"]
    requirements = list(project["dependencies"])
    for extra in sorted(Requirement(everything).extras):
        requirements += project["optional-dependencies"][extra]
    pins = []
    for text in requirements:
        requirement = Requirement(text)
        lowest = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lowest) != 1:
            raise ValueError(f"{text!r}: no single lower bound (>=) to test at")
        pins.append(f"{requirement.name}=={lowest[0]}")
    return pins


@nox.session(python=OLDEST)
def tests_lowest(session: nox.Session) -> None:
    """A subset of the tests (LOWEST_TESTS; test paths after -- replace it) with every
    direct dependency at the lowest version pyproject.toml allows (pinned as constraints:
    tooz, anyio, pydantic-settings, structlog and each backend's client). Not under
    coverage; asyncio only (see below). anyio 4.7 exercises `_tasks.native_loop`'s branch
    for anyio < 4.11 (the loop returned as is)."""
    constraints = Path(session.create_tmp()) / "lowest-constraints.txt"
    pins = _lowest_pins()
    constraints.write_text("\n".join(pins) + "\n")
    session.log(f"pinned: {' '.join(pins)}")
    session.install("-c", str(constraints), "-e", ".[all]")
    session.install("-c", str(constraints), *nox.project.dependency_groups(PYPROJECT, "test"))
    # The pins held (the test tools' own requirements could have moved one).
    session.run("python", "-m", "pip", "check")
    session.run(
        "python",
        "-c",
        "import sys; from importlib.metadata import version\n"
        "from packaging.requirements import Requirement\n"
        "for pin in sys.argv[1:]:\n"
        "    r = Requirement(pin); v = version(r.name)\n"
        "    assert v in r.specifier, f'{r.name} {v} is installed, not {r.specifier}'",
        *pins,
    )
    # Test paths after -- replace the subset; other arguments (-x, -k ...) go with it.
    # On asyncio only: under anyio 4.5's pytest plugin a trio test hung in an async
    # fixture's teardown (its test runner waiting on a queue nothing fed; seen once, not
    # yet understood), and a hang would eat CI's time. aiotooz on trio is tested at the
    # current versions by the tests sessions.
    paths = [arg for arg in session.posargs if arg.startswith("tests")]
    subset = [] if paths else [*LOWEST_TESTS, "-k", "not trio"]
    session.run("pytest", "-n", TEST_PROCESSES, *subset, *session.posargs)


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
    """mypy --strict over src/ and tests/, with every backend's client library; then
    pyright's type-completeness check of the public API (`--verifytypes`: 100% of the
    exported symbols, or it fails; types that come from other packages, tooz's above all,
    are theirs to complete: `--ignoreexternal`)."""
    install(session, "typecheck")
    session.run("mypy")
    session.run("pyright", "--verifytypes", "aiotooz", "--ignoreexternal")


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


#: What a wheel may hold besides the package: its metadata directory.
WHEEL_TOP_LEVEL = {"aiotooz"}
#: Never in the sdist or the wheel: tool state, build output, local data.
STRAY = (".nox", ".venv", ".git/", "__pycache__", ".pyc", ".coverage", "site/", "dist/", ".cache")


def _check_wheel(session: nox.Session, wheel: Path) -> None:
    """py.typed, the `aiotooz` command, and nothing but the package and its metadata."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(name.split("/")[0] for name in names if ".dist-info/" in name)
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    tops = {name.split("/")[0] for name in names} - {dist_info}
    if tops != WHEEL_TOP_LEVEL:
        session.error(f"{wheel.name}: unexpected top-level entries {sorted(tops)}")
    if "aiotooz/py.typed" not in names:
        session.error(f"{wheel.name}: no aiotooz/py.typed (type checkers would ignore it)")
    if "aiotooz = aiotooz._cli:main" not in entry_points:
        session.error(f"{wheel.name}: no `aiotooz` console script:\n{entry_points}")
    stray = [name for name in names if any(part in name for part in STRAY)]
    if stray:
        session.error(f"{wheel.name}: stray files {stray}")
    session.log(f"{wheel.name}: {len(names)} files, py.typed and the aiotooz command")


def _check_sdist(session: nox.Session, sdist: Path) -> None:
    """The sources, README and licence metadata; no tool state or build output."""
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    for needed in (
        "pyproject.toml",
        "README.md",
        "src/aiotooz/__init__.py",
        "src/aiotooz/py.typed",
    ):
        if needed not in names:
            session.error(f"{sdist.name}: {needed} is missing")
    stray = [name for name in names if any(part in name for part in STRAY)]
    if stray:
        session.error(f"{sdist.name}: stray files {stray}")
    session.log(f"{sdist.name}: {len(names)} files")


@nox.session
def package(session: nox.Session) -> None:
    """Build the sdist and wheel, check them, and run the wheel as a user installs it.

    `twine check --strict` (the metadata PyPI renders), the archives' contents (py.typed,
    the `aiotooz` console script, no stray files), then the wheel alone (no editable
    install, no extras) in a fresh venv: the quickstart example on the embedded file
    backend, and `aiotooz --help`.
    """
    session.install(*nox.project.dependency_groups(PYPROJECT, "package"))
    with tempfile.TemporaryDirectory(prefix="aiotooz-package-") as tmp:
        dist = Path(tmp) / "dist"
        session.run("python", "-m", "build", "--outdir", str(dist), str(ROOT))
        (wheel,) = dist.glob("*.whl")
        (sdist,) = dist.glob("*.tar.gz")
        session.run("twine", "check", "--strict", str(wheel), str(sdist))
        _check_wheel(session, wheel)
        _check_sdist(session, sdist)

        venv = Path(tmp) / "venv"
        session.run("python", "-m", "venv", str(venv))
        python, command = str(venv / "bin" / "python"), str(venv / "bin" / "aiotooz")
        session.run(python, "-m", "pip", "install", "-q", str(wheel), external=True)
        # Run from the temporary directory: nothing of this checkout is importable there.
        with session.chdir(tmp):
            shown = session.run(
                python,
                "-c",
                "import aiotooz; print(aiotooz.__file__, aiotooz.__version__)",
                external=True,
                silent=True,
            )
            where, version = str(shown).split()
            if not where.startswith(str(venv)):
                session.error(f"aiotooz was imported from {where!r}, not the fresh venv")
            if f"aiotooz-{version}-" not in wheel.name:
                session.error(f"aiotooz.__version__ is {version!r}; the wheel is {wheel.name}")
            session.log(f"aiotooz {version} from the wheel")
            session.run(
                python,
                str(ROOT / "examples" / "quickstart.py"),
                env={"AIOTOOZ_BACKEND_URL": ""},
                external=True,
            )
            session.run(command, "--help", external=True)


@nox.session(default=False)
def docs_serve(session: nox.Session) -> None:
    """Serve the docs with live reload on http://127.0.0.1:8000."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run("mkdocs", "serve", *session.posargs, env=MKDOCS_ENV)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark against the peers, waiting across processes, and scale per backend.

    Starts private servers (tests/support/servers.py); `-- --quick` for a smoke run.
    """
    install(session, "bench")
    session.run("python", str(ROOT / "benchmarks" / "bench.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "wakeups.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "scale.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "rwlock.py"), *session.posargs)
