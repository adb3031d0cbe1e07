"""Lock names: any str works, distinct names never share a key, none escapes the directory.

That hostile names lock distinctly, and that plain names are plain tooz's keys, is
checked on every backend by tests/test_conformance.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiotooz import Coordinator, Lock, LockNameError, synchronized
from aiotooz._names import MAX_NAME_LENGTH, MAX_PLAIN_LENGTH, backend_key

from .support.helpers import HOSTILE_NAMES, make_coordinator

SAFE_KEY = re.compile(r"[A-Za-z0-9._~-]+")


def test_plain_names_pass_through_unchanged() -> None:
    assert backend_key("svc-", "volume-42") == "svc-volume-42"
    assert backend_key("", "A.b_c-9") == "A.b_c-9"
    assert backend_key("", "x" * MAX_PLAIN_LENGTH) == "x" * MAX_PLAIN_LENGTH


def test_other_names_are_mapped_readably() -> None:
    key = backend_key("svc-", "share/ümlaut")
    assert key.startswith("svc-share__mlaut~")
    assert backend_key("", "x" * (MAX_PLAIN_LENGTH + 1)) != "x" * (MAX_PLAIN_LENGTH + 1)
    assert backend_key("", "groups", reserved={"groups"}) != "groups"
    assert backend_key("", ".hidden").startswith("hidden~")


@given(st.text(min_size=1), st.text(min_size=1))
def test_the_mapping_is_injective(first: str, second: str) -> None:
    if first != second:
        assert backend_key("p-", first) != backend_key("p-", second)


@given(st.text(min_size=1, max_size=2000))
def test_every_key_is_backend_safe(name: str) -> None:
    key = backend_key("p-", name, reserved={"p-groups"})
    assert SAFE_KEY.fullmatch(key)
    assert len(key) <= MAX_PLAIN_LENGTH
    assert not key.startswith(".") and "/" not in key
    assert key not in {".", ".."}


async def test_no_name_escapes_the_file_backend_directory(tmp_path: Path, prefix: str) -> None:
    locks = tmp_path / "locks"
    sibling = tmp_path / "locks-sibling"
    await anyio.Path(sibling).mkdir()
    names = [*HOSTILE_NAMES, "../locks-sibling/x", "../../escape", "/tmp/abs"]
    async with make_coordinator(locks.as_uri(), prefix) as coordinator:
        for name in names:
            async with coordinator.get_lock(name):
                pass

    def look() -> None:  # in a worker thread: the event loop never blocks on the disk
        outside = [
            path
            for path in tmp_path.rglob("*")
            if not path.is_relative_to(locks) and path != sibling and path != locks
        ]
        assert outside == []
        assert all(path.parent == locks for path in locks.iterdir() if path.is_file())
        assert not os.listdir(sibling)

    await anyio.to_thread.run_sync(look)


@pytest.mark.parametrize("bad", ["", 42, None, b"bytes"])
async def test_non_string_or_empty_names_are_refused(coordinator: Coordinator, bad: object) -> None:
    with pytest.raises(LockNameError):
        coordinator.get_lock(bad)  # type: ignore[arg-type]
    with pytest.raises(LockNameError):
        Lock(bad, coordinator=coordinator)  # type: ignore[arg-type]


def test_format_names_from_data() -> None:
    class Share:
        id = "s-1"

    assert Lock("share-{share.id}", {"share": Share()}).name == "share-s-1"
    assert Lock("{a[k]}-{b}", {"a": {"k": "v"}, "b": 2}).name == "v-2"
    assert Lock("literal-{x}").name == "literal-{x}"  # no data: taken as is
    with pytest.raises(LockNameError, match="uses the field 'share'"):
        Lock("share-{share.id}", {})
    with pytest.raises(LockNameError, match="AttributeError"):
        Lock("share-{share.nope}", {"share": Share()})


SECRET = "hunter2"


class _Share:
    id = 42

    def __init__(self) -> None:
        self._token = "private"


@pytest.mark.parametrize(
    "template",
    [
        "{share.__init__.__globals__[SECRET]}",
        "{share.__class__}",
        "{share._token}",
        "vol-{share.id.__class__.__name__}",
    ],
)
def test_fields_reaching_private_attributes_are_refused(template: str) -> None:
    with pytest.raises(LockNameError, match="private attribute") as raised:
        Lock(template, {"share": _Share()})
    assert SECRET not in str(raised.value)


def test_synchronized_refuses_private_attributes_when_decorating() -> None:
    with pytest.raises(LockNameError, match="private attribute"):

        @synchronized("{share.__init__.__globals__}")
        async def resize(share: _Share) -> None:  # pragma: no cover - never decorated
            pass


@pytest.mark.parametrize("template", ["{share.id:>200000000}", "{share.id:.5000}", "{w:{n}}"])
def test_format_specs_cannot_build_huge_names(template: str) -> None:
    with pytest.raises(LockNameError, match="exceeds"):
        Lock(template, {"share": _Share(), "w": 1, "n": 10**9})


def test_names_are_capped_in_length() -> None:
    assert Lock("x" * MAX_NAME_LENGTH).name == "x" * MAX_NAME_LENGTH
    with pytest.raises(LockNameError, match=f"at most {MAX_NAME_LENGTH}"):
        Lock("x" * (MAX_NAME_LENGTH + 1))
    with pytest.raises(LockNameError, match=f"at most {MAX_NAME_LENGTH}"):
        Lock("{big}", {"big": "y" * (MAX_NAME_LENGTH + 1)})


def test_public_fields_still_format() -> None:
    assert Lock("share-{share.id:>5}-{d[k]}", {"share": _Share(), "d": {"k": "v"}}).name == (
        "share-   42-v"
    )
