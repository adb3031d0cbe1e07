"""A history of critical sections, a fenced resource, and the checker that judges them.

Holders (tests/failover/holder.py, one process each) append one JSON line per event to a
file of their own in a shared directory, which lives on the local filesystem and so
outside any network partition: ``enter`` (with the fencing token), ``exit`` (``how``:
``released``, ``lost`` for :class:`~aiotooz.LockLost`, ``error`` for anything else),
``error`` outside a section. Times are ``time.monotonic()``: every process is on this
machine, so CLOCK_MONOTONIC is comparable across them. The test adds ``fault`` and
``heal`` events of its own.

:class:`FencedStore` is the resource the locks protect: it refuses a write whose token
is lower than the highest it accepted. The test process serves it to the holders
(:class:`StoreClient`) over a Unix socket, outside any network partition.

:func:`check` then verifies the promise: two sections overlap only if the later one has
the larger token and the earlier holder was told (its section ended with ``lost``); no
two grants share a token; the store accepted no write below a token it had seen. A
violation fails with the history around it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["FencedStore", "Recorder", "Report", "Section", "StoreClient", "check", "load_events"]


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
    """The fenced resource, served by the test process to the holders over a Unix socket.

    It refuses a write whose token is lower than the highest it accepted, and logs every
    write, accepted or refused, to ``<directory>/store.jsonl``. It runs in the test's
    own process (a thread per holder), never in a holder: a holder that is paused
    mid-write then holds nothing that the others wait for.
    """

    def __init__(self, directory: Path) -> None:
        self._log = (directory / "store.jsonl").open("a", buffering=1)
        self._highest = -1
        self._guard = threading.Lock()
        # A short path: Unix socket paths are limited to about 100 bytes.
        self._socket_dir = tempfile.mkdtemp(prefix="aiotooz-store-")
        self.address = os.path.join(self._socket_dir, "store.sock")
        (directory / "store.address").write_text(self.address)
        self._server = socketserver.ThreadingUnixStreamServer(self.address, self._handler())
        self._server.daemon_threads = True
        os.chmod(self.address, 0o777)  # a holder may run as another user
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def write(self, holder: str, token: int) -> bool:
        """Accept the write of ``holder`` with ``token`` unless a larger one came first."""
        with self._guard:
            accepted = token >= self._highest
            entry = {
                "t": time.monotonic(),
                "holder": holder,
                "event": "write",
                "token": token,
                "accepted": accepted,
                "highest": self._highest,
            }
            if accepted:
                self._highest = token
            self._log.write(json.dumps(entry) + "\n")
        return accepted

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        store = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:  # "holder token", one write per line
                    holder, token = line.decode().split()
                    self.wfile.write(b"1\n" if store.write(holder, int(token)) else b"0\n")

        return Handler

    def close(self) -> None:
        if self._log.closed:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._log.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)


class StoreClient:
    """A holder's connection to the :class:`FencedStore` whose address is in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self._address = (directory / "store.address").read_text()
        self._socket: socket.socket | None = None
        self._file: Any = None

    def write(self, holder: str, token: int) -> bool:
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socket.connect(self._address)
            self._file = self._socket.makefile("rwb")
        self._file.write(f"{holder} {token}\n".encode())
        self._file.flush()
        return bool(self._file.readline().strip() == b"1")

    def close(self) -> None:
        if self._socket is not None:
            self._file.close()
            self._socket.close()


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
