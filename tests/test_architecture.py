"""The layering the code promises, checked on its source: no import cycles, tooz in one
layer, backends known only to the driver registry, classes of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "aiotooz"
SOURCES = sorted(PACKAGE.rglob("*.py"))
#: Modules allowed to import tooz: the driver layer and the connection around it.
TOOZ_LAYER = {"aiotooz._connection", "aiotooz._drivers"}
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


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: _module(path))
def test_classes_stay_readable(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            assert lines <= 300, f"{node.name} has {lines} lines"
