"""The layering the code promises, checked on its source: no import cycles, tooz in one
layer, backends known only to the driver registry, classes of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "aiotooz"
SOURCES = sorted(PACKAGE.rglob("*.py"))
#: Modules allowed to import tooz: the driver layer and the connection around it.
TOOZ_LAYER = {"aiotooz._connection", "aiotooz._calls", "aiotooz._drivers"}
SCHEMES = {"file", "ipc", "redis", "memcached", "zookeeper", "kazoo", "etcd3+http",
           "etcd3+https", "postgresql", "mysql"}  # fmt: skip


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Every module ``path`` imports (absolute names), and whether only for type checking."""
    tree = ast.parse(path.read_text())
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in typing_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.append((base, id(node) in typing_only))
    return found


def test_no_import_cycles_at_run_time() -> None:
    graph = {
        _module(path): {
            name
            for name, typing_only in _imports(path)
            if name.startswith("aiotooz") and not typing_only and name != _module(path)
        }
        for path in SOURCES
    }

    def visit(module: str, trail: list[str]) -> None:
        for target in graph.get(module, ()):
            # "from . import x" names the package: an import of its __init__ only.
            if target in trail:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(target) :], target]))
            visit(target, [*trail, target])

    for module in graph:
        if module != "aiotooz":  # the package's __init__ re-exports: it sits on top
            visit(module, [module])


#: The layers under the coordinator: the lock table, its tries and queues, the state the
#: coordinator shares with them, the connection and the drivers.
BELOW_THE_COORDINATOR = {
    "aiotooz._locktable",
    "aiotooz._tries",
    "aiotooz._queue",
    "aiotooz._state",
    "aiotooz._connection",
    "aiotooz._calls",
    "aiotooz._watch",
    "aiotooz._drivers",
}
#: The coordinator and what is built on it.
ABOVE = {
    "aiotooz._coordinator",
    "aiotooz._lock",
    "aiotooz._semaphore",
    "aiotooz._rwlock",
    "aiotooz._leadership",
    "aiotooz._holders",
    "aiotooz._once",
    "aiotooz._synchronized",
}


def test_calls_go_down_only() -> None:
    """No layer under the coordinator imports it or a primitive, not even for typing: the
    lock table reads the coordinator's state (``_state``) and never calls it back."""
    for path in SOURCES:
        module = _module(path)
        if not any(module == low or module.startswith(low + ".") for low in BELOW_THE_COORDINATOR):
            continue
        upward = [name for name, _ in _imports(path) if name in ABOVE]
        assert not upward, f"{module} imports {upward}"


def test_tooz_is_imported_only_by_the_driver_layer_and_the_connection() -> None:
    for path in SOURCES:
        module = _module(path)
        if any(module == layer or module.startswith(layer + ".") for layer in TOOZ_LAYER):
            continue
        tooz = [name for name, _ in _imports(path) if name.split(".")[0] == "tooz"]
        assert not tooz, f"{module} imports {tooz}"


def test_no_scheme_strings_outside_the_driver_registry() -> None:
    for path in SOURCES:
        if _module(path).startswith("aiotooz._drivers"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [
                    child.value
                    for child in ast.walk(node)
                    if isinstance(child, ast.Constant) and isinstance(child.value, str)
                ]
                assert not SCHEMES & set(constants), f"{path.name}: {ast.unparse(node)}"
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("startswith"):
                text = ast.unparse(node)
                assert not any(f"'{scheme}:" in text for scheme in SCHEMES), text


#: Lines a module may have before it is asked whether it holds more than one idea.
MODULE_BUDGET = 500
#: Modules over the budget, each with the reason it is not split (yet).
OVER_BUDGET = {
    "aiotooz._cli": "one command line: argparse set-up, `run` and `check`, with their exit codes",
    "aiotooz._drivers.redis_cluster": (
        "one driver that is its own cluster client (tokens and scripts, a beat per node, "
        "per-node release channels, and closing redis-py's asyncio client whatever state "
        "a cancel left it in)"
    ),
    "aiotooz._connection": (
        "one connection: its driver loaded from the URL, the lock handles, and the calls "
        "the lock table makes (try, release, fence, beat, holders); the ways a call "
        "reaches the driver are in _calls, the watches in _watch"
    ),
    "aiotooz._locktable": "the lock table with its holdings and loss delivery: one idea, long",
    "aiotooz._drivers._base": "the driver interface with its defaults and the file-record helpers",
    "aiotooz._drivers.redis": "tooz's driver adapted, the native asyncio path and the batched beat",
    "aiotooz._drivers.etcd": (
        "locks on one lease per coordinator (tries, the beat, keys a failed release left on "
        "it), watches, records and holders; its read-write locks are in _etcdrw already"
    ),
    "aiotooz._drivers._sessions": (
        "one coordinator's database sessions: the main session, the waiter links that queue "
        "at the server and park their grants, and the dialect interface they share"
    ),
}
#: Private base classes and mixins with a single user, each with why it still exists.
SINGLE_USER_BASES: dict[str, str] = {}


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: _module(path))
def test_modules_stay_within_their_budget(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    if _module(path) in OVER_BUDGET:
        # An exception that is no longer needed goes, so the list stays a true one.
        assert lines > MODULE_BUDGET, f"{_module(path)} is within budget: drop it from OVER_BUDGET"
        return
    assert lines <= MODULE_BUDGET, (
        f"{_module(path)} has {lines} lines: split it by idea, or name it in OVER_BUDGET "
        "with the reason it is one idea"
    )


def test_no_private_base_class_has_a_single_user() -> None:
    """A base class exists when two real classes share it, never to keep one short."""
    trees = [ast.parse(path.read_text()) for path in SOURCES]
    classes = [node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    users: dict[str, int] = {}
    for node in classes:
        for base in node.bases:
            name = ast.unparse(base).rsplit(".", 1)[-1]
            users[name] = users.get(name, 0) + 1
    ours = {node.name for node in classes}
    single = {
        name
        for name, count in users.items()
        if count == 1 and name in ours and (name.startswith("_") or name.endswith("Methods"))
    }
    # Both ways: a name listed here that is gone, or has found a second user, goes too.
    assert single == set(SINGLE_USER_BASES), sorted(single ^ set(SINGLE_USER_BASES))
