"""A history of critical sections, a fenced resource, and the checker that judges them.

Holders (tests/failover/holder.py, one process each) append one JSON line per event to a
file of their own in a shared directory, which lives on the local filesystem and so
outside any network partition: ``enter`` (with the fencing token), ``exit`` (``how``:
``released``, ``lost`` for :class:`~aiotooz.LockLost`, ``error`` for anything else),
``error`` outside a section. Times are ``time.monotonic()``: every process is on this
machine, so CLOCK_MONOTONIC is comparable across them. The test adds ``fault`` and
``heal`` events of its own.

:class:`FencedStore` is the resource the locks protect: it refuses a write whose token
is lower than the highest it accepted (a file guarded by ``flock``, so every holder
process sees the same highest token).

:func:`check` then verifies the promise: two sections overlap only if the later one has
the larger token and the earlier holder was told (its section ended with ``lost``); no
two grants share a token; the store accepted no write below a token it had seen. A
violation fails with the history around it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["FencedStore", "Recorder", "Report", "Section", "check", "load_events"]


class Recorder:
    """Appends a holder's events to ``<directory>/<holder>.jsonl``, flushed at once."""

    def __init__(self, directory: Path, holder: str) -> None:
        self.holder = holder
        self._file = (directory / f"{holder}.jsonl").open("a", buffering=1)

    def record(self, event: str, **fields: Any) -> float:
        now = time.monotonic()
        self._file.write(json.dumps({"t": now, "holder": self.holder, "event": event, **fields}))
        self._file.write("\n")
        return now

    def close(self) -> None:
        self._file.close()


class FencedStore:
    """A resource that refuses writes with a token lower than the highest it accepted.

    Every write, accepted or refused, is logged to ``<directory>/store.jsonl``.
    """

    def __init__(self, directory: Path) -> None:
        self._log = directory / "store.jsonl"
        self._highest = directory / "store.highest"
        self._guard = directory / "store.lock"

    def write(self, holder: str, token: int) -> bool:
        with self._guard.open("a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                highest = int(self._highest.read_text()) if self._highest.exists() else -1
                accepted = token >= highest
                if accepted:
                    self._highest.write_text(str(token))
                entry = {
                    "t": time.monotonic(),
                    "holder": holder,
                    "event": "write",
                    "token": token,
                    "accepted": accepted,
                    "highest": highest,
                }
                with self._log.open("a") as log:
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
        return accepted


@dataclasses.dataclass
class Section:
    """One holder's critical section: from ``enter`` to its ``exit`` (``None``: none seen)."""

    holder: str
    token: int
    enter: float
    exit: float | None = None
    how: str = "open"

    def end(self, horizon: float) -> float:
        return self.exit if self.exit is not None else horizon


@dataclasses.dataclass
class Report:
    """What :func:`check` found (it raises on violations; this is for the figures)."""

    sections: list[Section]
    #: Overlapping pairs (earlier, later) that the rule allows: later token larger,
    #: earlier holder told. Each is a window where fencing alone protected the resource.
    tolerated_overlaps: list[tuple[Section, Section]]
    #: Overlaps the rule forbids, kept (not raised) under ``check(..., backend_breaks=True)``
    #: for a backend known to break mutual exclusion under the fault; with the history.
    untold_overlaps: list[tuple[Section, Section, str]]
    accepted_writes: int
    refused_writes: list[dict[str, Any]]
    events: list[dict[str, Any]]

    def lost(self) -> list[Section]:
        return [section for section in self.sections if section.how == "lost"]


def load_events(directory: Path) -> list[dict[str, Any]]:
    """Every event of every file in ``directory``, in time order."""
    events: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.jsonl")):
        events.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    events.sort(key=lambda event: event["t"])
    return events


def _sections(events: list[dict[str, Any]]) -> list[Section]:
    open_by_holder: dict[str, Section] = {}
    sections: list[Section] = []
    for event in events:
        holder = event["holder"]
        if event["event"] == "enter":
            section = Section(holder, int(event["token"]), event["t"])
            open_by_holder[holder] = section
            sections.append(section)
        elif event["event"] == "exit" and holder in open_by_holder:
            section = open_by_holder.pop(holder)
            section.exit = event["t"]
            section.how = event["how"]
    return sections


def format_history(events: list[dict[str, Any]], around: float, span: float = 3.0) -> str:
    """The events within ``span`` seconds of ``around``, one per line, times relative."""
    origin = events[0]["t"] if events else 0.0
    lines = []
    for event in events:
        if abs(event["t"] - around) <= span:
            rest = {k: v for k, v in event.items() if k not in ("t", "holder", "event")}
            details = " ".join(f"{k}={v}" for k, v in rest.items())
            marker = ">>" if abs(event["t"] - around) < 1e-9 else "  "
            lines.append(
                f"{marker} {event['t'] - origin:9.3f}s {event['holder']:>10} "
                f"{event['event']:<6} {details}"
            )
    return "\n".join(lines)


def _pairs(sections: list[Section], horizon: float) -> Iterator[tuple[Section, Section]]:
    """Every overlapping pair (earlier enter first)."""
    ordered = sorted(sections, key=lambda section: section.enter)
    for i, earlier in enumerate(ordered):
        for later in ordered[i + 1 :]:
            if later.enter >= earlier.end(horizon):
                continue
            yield earlier, later


def check(directory: Path, backend_breaks: bool = False) -> Report:
    """Judge the history in ``directory``; raise AssertionError with the history if broken.

    ``backend_breaks``: the backend is known not to keep mutual exclusion under this
    fault (Redis Sentinel's split brain): overlaps the holders were not told of are
    reported in :attr:`Report.untold_overlaps` instead of raised. The fenced store's
    rule and unique tokens are still enforced.
    """
    events = load_events(directory)
    writes = [event for event in events if event["event"] == "write"]
    history = [event for event in events if event["event"] != "write"]
    horizon = events[-1]["t"] if events else 0.0
    sections = _sections(history)
    problems: list[tuple[str, float]] = []
    tolerated = []
    untold = []
    for earlier, later in _pairs(sections, horizon):
        if later.token > earlier.token and earlier.how == "lost":
            tolerated.append((earlier, later))
            continue
        message = (
            f"{earlier.holder} (token {earlier.token}, section ended: {earlier.how}) "
            f"and {later.holder} (token {later.token}) were both in the critical "
            f"section from {later.enter - events[0]['t']:.3f}s"
        )
        if backend_breaks:
            untold.append((earlier, later, f"{message}\n{format_history(events, later.enter)}"))
        else:
            problems.append((message, later.enter))
    tokens: dict[int, Section] = {}
    for section in sections:
        other = tokens.setdefault(section.token, section)
        if other is not section:
            problems.append(
                (
                    f"{other.holder} and {section.holder} were granted the same token "
                    f"{section.token}",
                    section.enter,
                )
            )
    highest = -1
    for write in writes:
        if write["accepted"]:
            if write["token"] < highest:
                problems.append(
                    (f"the store accepted token {write['token']} after {highest}", write["t"])
                )
            highest = max(highest, write["token"])
    if problems:
        text = []
        for message, when in problems[:3]:
            text.append(f"VIOLATION: {message}\n{format_history(events, when)}")
        raise AssertionError(f"{len(problems)} violation(s)\n" + "\n\n".join(text))
    return Report(
        sections=sections,
        tolerated_overlaps=tolerated,
        untold_overlaps=untold,
        accepted_writes=sum(1 for write in writes if write["accepted"]),
        refused_writes=[write for write in writes if not write["accepted"]],
        events=events,
    )
