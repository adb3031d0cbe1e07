from __future__ import annotations

import aiotooz


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(aiotooz) if not name.startswith("_")}
    assert sorted(aiotooz.__all__) == aiotooz.__all__
    assert set(aiotooz.__all__) == public


def test_public_objects_say_they_come_from_aiotooz() -> None:
    for name in aiotooz.__all__:
        assert getattr(aiotooz, name).__doc__, f"{name} has no docstring"
