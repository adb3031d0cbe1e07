"""The failover checker (tests/support/checker.py) judges histories: it must be able to fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .support.checker import FencedStore, StoreClient, check


def _history(directory: Path, *events: tuple[float, str, str, dict[str, object]]) -> None:
    for t, holder, event, fields in events:
        with (directory / f"{holder}.jsonl").open("a") as file:
            file.write(json.dumps({"t": t, "holder": holder, "event": event, **fields}) + "\n")


def test_sections_one_after_the_other_pass(tmp_path: Path) -> None:
    _history(
        tmp_path,
        (1.0, "a", "enter", {"token": 1}),
        (2.0, "a", "exit", {"how": "released"}),
        (2.1, "b", "enter", {"token": 2}),
        (3.0, "b", "exit", {"how": "released"}),
    )
    report = check(tmp_path)
    assert len(report.sections) == 2
    assert report.tolerated_overlaps == []


def test_an_overlap_the_stale_holder_was_not_told_of_fails_with_the_history(
    tmp_path: Path,
) -> None:
    _history(
        tmp_path,
        (1.0, "a", "enter", {"token": 1}),
        (1.5, "b", "enter", {"token": 2}),
        (2.0, "a", "exit", {"how": "released"}),
        (2.5, "b", "exit", {"how": "released"}),
    )
    with pytest.raises(AssertionError) as raised:
        check(tmp_path)
    text = str(raised.value)
    assert "a (token 1, section ended: released) and b (token 2)" in text
    assert ">>     0.500s          b enter  token=2" in text  # the history, violation marked
    assert "a exit   how=released" in text


def test_an_overlap_with_a_smaller_later_token_fails(tmp_path: Path) -> None:
    _history(
        tmp_path,
        (1.0, "a", "enter", {"token": 5}),
        (1.5, "b", "enter", {"token": 2}),
        (2.0, "a", "exit", {"how": "lost"}),
        (2.5, "b", "exit", {"how": "released"}),
    )
    with pytest.raises(AssertionError, match="1 violation"):
        check(tmp_path)


def test_an_overlap_is_tolerated_when_told_and_fenced(tmp_path: Path) -> None:
    _history(
        tmp_path,
        (1.0, "a", "enter", {"token": 1}),
        (1.5, "b", "enter", {"token": 2}),
        (2.0, "a", "exit", {"how": "lost"}),
        (2.5, "b", "exit", {"how": "released"}),
    )
    report = check(tmp_path)
    assert [(x.holder, y.holder) for x, y in report.tolerated_overlaps] == [("a", "b")]


def test_a_section_never_closed_overlaps_everything_after_it(tmp_path: Path) -> None:
    _history(
        tmp_path,
        (1.0, "a", "enter", {"token": 1}),
        (2.0, "b", "enter", {"token": 2}),
        (3.0, "b", "exit", {"how": "released"}),
    )
    with pytest.raises(AssertionError, match="section ended: open"):
        check(tmp_path)


def test_the_same_token_twice_fails(tmp_path: Path) -> None:
    _history(
        tmp_path,
        (1.0, "a", "enter", {"token": 7}),
        (2.0, "a", "exit", {"how": "released"}),
        (3.0, "b", "enter", {"token": 7}),
        (4.0, "b", "exit", {"how": "released"}),
    )
    with pytest.raises(AssertionError, match="same token 7"):
        check(tmp_path)


def test_the_fenced_store_refuses_a_stale_token(tmp_path: Path) -> None:
    store = FencedStore(tmp_path)
    client = StoreClient(tmp_path)  # as a holder process talks to it
    try:
        assert client.write("a", 1)
        assert client.write("b", 3)
        assert not client.write("a", 1)
        assert client.write("b", 3)
    finally:
        client.close()
        store.close()
    report = check(tmp_path)
    assert report.accepted_writes == 3
    assert [write["holder"] for write in report.refused_writes] == ["a"]


def test_a_store_that_accepted_a_stale_write_fails(tmp_path: Path) -> None:
    _history(
        tmp_path,
        (1.0, "store", "write", {"token": 3, "accepted": True}),
        (2.0, "store", "write", {"token": 1, "accepted": True}),
    )
    with pytest.raises(AssertionError, match="accepted token 1 after 3"):
        check(tmp_path)


def test_a_backend_known_to_break_reports_the_overlap_but_not_a_stale_write(
    tmp_path: Path,
) -> None:
    _history(
        tmp_path,
        (1.0, "a", "enter", {"token": 1}),
        (1.5, "b", "enter", {"token": 2}),
        (2.0, "a", "exit", {"how": "released"}),
        (2.5, "b", "exit", {"how": "released"}),
    )
    report = check(tmp_path, backend_breaks=True)
    [(earlier, later, history)] = report.untold_overlaps
    assert (earlier.holder, later.holder) == ("a", "b")
    assert "b enter  token=2" in history
    _history(
        tmp_path,
        (3.0, "store", "write", {"token": 2, "accepted": True}),
        (3.1, "store", "write", {"token": 1, "accepted": True}),
    )
    with pytest.raises(AssertionError, match="accepted token 1 after 2"):
        check(tmp_path, backend_breaks=True)
