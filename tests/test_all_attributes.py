from __future__ import annotations

import importlib.metadata
from types import ModuleType

import aiotooz


def test_all_lists_exactly_the_public_names() -> None:
    # Submodules (aiotooz.fastapi, aiotooz.testing) become attributes once imported.
    public = {
        name
        for name, value in vars(aiotooz).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert sorted(aiotooz.__all__) == aiotooz.__all__
    assert set(aiotooz.__all__) == public


def test_public_objects_say_they_come_from_aiotooz() -> None:
    for name in aiotooz.__all__:
        assert getattr(aiotooz, name).__doc__, f"{name} has no docstring"
    for name in aiotooz.__all__:
        assert getattr(aiotooz, name).__module__ == "aiotooz", name


def test_the_version_is_the_installed_distributions() -> None:
    # Set from the git tag at build time (hatch-vcs); read back from the metadata.
    assert aiotooz.__version__ == importlib.metadata.version("aiotooz")
