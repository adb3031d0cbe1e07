"""One failover scenario: holder processes on a cluster, a fault, the checker's verdict.

A :class:`Scenario` starts holder processes (tests/failover/holder.py), lets them take
turns, records the test's own ``fault`` and ``heal`` events in the same history, stops
the holders and runs :func:`tests.support.checker.check`. :meth:`Scenario.figures` turns
the history into the measured times the docs quote (docs/failover.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..support.checker import FencedStore, Recorder, Report, check
from ..support.clusters import as_client_user
from ..support.servers import _dying_with_this_process

HOLDER = str(Path(__file__).with_name("holder.py"))

#: Where `nox -s failover` collects every scenario's figures (one JSON line each).
RESULTS = os.environ.get("AIOTOOZ_FAILOVER_RESULTS")


class Scenario:
    """Holders on one lock name, each with its own URL; the test drives the fault."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._harness = Recorder(directory, "harness")
        self._store = FencedStore(directory)
        self._prefix = f"failover{uuid.uuid4().hex[:6]}-"
        #: The holders' prefix (the lock's key is made from it and the name "lock").
        self.prefix = self._prefix
        self.holders: dict[str, subprocess.Popen[str]] = {}
        self._logs: list[Any] = []

    def start_holders(self, urls: dict[str, str], cut_off: str | None = None) -> None:
        """Start a holder per URL; ``cut_off`` runs as ``CLIENT_UID`` (see Firewall.cut_off)."""
        for holder, url in urls.items():
            log = (self.directory / f"{holder}.stderr").open("w")
            self._logs.append(log)
            command = [
                sys.executable,
                HOLDER,
                url,
                self._prefix,
                "lock",
                holder,
                str(self.directory),
            ]
            if holder == cut_off:
                command = as_client_user(command)
            self.holders[holder] = subprocess.Popen(
                _dying_with_this_process(command),  # no holder outlives a killed test
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        for holder, proc in self.holders.items():
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line == "started", f"{holder} did not start: {self.stderr(holder)}"

    def stderr(self, holder: str) -> str:
        return (self.directory / f"{holder}.stderr").read_text(errors="replace")[-3000:]

    def event(self, kind: str, **fields: Any) -> float:
        """Record the test's own event (``fault``, ``heal``) in the history."""
        return self._harness.record(kind, **fields)

    def in_section(self, holder: str) -> bool:
        """Whether ``holder``'s last recorded event is an ``enter``."""
        path = self.directory / f"{holder}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return bool(lines) and json.loads(lines[-1])["event"] == "enter"

    def wait_for_section(self, holders: list[str], timeout: float = 30) -> str:
        """Wait until one of ``holders`` enters a section (from now on); which one.

        The fault then hits it at the start of its section, not as it ends.
        """
        return self.wait_for_entry(time.monotonic(), timeout, holders)

    def wait_for_entry(
        self, after: float, timeout: float = 30, holders: list[str] | None = None
    ) -> str:
        """Wait until a holder (of ``holders``) enters a section after ``after``; which one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for holder in holders or list(self.holders):
                path = self.directory / f"{holder}.jsonl"
                for line in path.read_text().splitlines()[-3:] if path.exists() else []:
                    event = json.loads(line)
                    if event["event"] == "enter" and event["t"] > after:
                        return holder
            time.sleep(0.01)
        raise AssertionError(f"none of {holders or 'the holders'} entered a section in {timeout} s")

    def pause_holder(self, holder: str) -> None:
        os.kill(self.holders[holder].pid, signal.SIGSTOP)

    def resume_holder(self, holder: str) -> None:
        os.kill(self.holders[holder].pid, signal.SIGCONT)

    def finish(self, backend_breaks: bool = False) -> Report:
        """Stop the holders, then check the history (see ``check`` for ``backend_breaks``)."""
        (self.directory / "stop").touch()
        for holder, proc in self.holders.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{holder} did not stop: {self.stderr(holder)}") from None
        self.close()
        try:
            report = check(self.directory, backend_breaks)
        except AssertionError as exc:
            logs = "\n".join(f"--- {h}'s log ---\n{self.stderr(h)[-1500:]}" for h in self.holders)
            raise AssertionError(f"{self.name}: {exc}\n{logs}") from None
        self._publish(report)
        return report

    def close(self) -> None:
        for proc in self.holders.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for log in self._logs:
            log.close()
        self._harness.close()
        self._store.close()

    def figures(self, report: Report) -> dict[str, Any]:
        """Measured times after the first fault: loss told, next grant, sections, writes."""
        faults = [e["t"] for e in report.events if e["event"] == "fault"]
        heals = [e["t"] for e in report.events if e["event"] == "heal"]
        figures: dict[str, Any] = {
            "scenario": self.name,
            "sections": len(report.sections),
            "lost": len(report.lost()),
            "tolerated_overlaps": len(report.tolerated_overlaps),
            "untold_overlaps": len(report.untold_overlaps),
            "accepted_writes": report.accepted_writes,
            "refused_writes": len(report.refused_writes),
        }
        if faults:
            fault = faults[0]
            told = [s.exit - fault for s in report.lost() if s.exit is not None and s.exit > fault]
            figures["lost_told_after_fault_s"] = round(min(told), 3) if told else None
            # The section that was open when the fault hit, and the next grant after it.
            held = [s for s in report.sections if s.enter <= fault < s.end(float("inf"))]
            after = [s.enter - fault for s in report.sections if s.enter > fault]
            figures["held_at_fault"] = held[0].holder if held else None
            figures["next_grant_after_fault_s"] = round(min(after), 3) if after else None
            if heals:
                figures["fault_window_s"] = round(heals[0] - fault, 3)
        return figures

    def _publish(self, report: Report) -> None:
        figures = self.figures(report)
        print(f"\nFAILOVER {json.dumps(figures)}")
        for _, _, history in report.untold_overlaps[:2]:
            print(f"UNTOLD OVERLAP (a backend shortfall): {history}")
        if RESULTS:
            with open(RESULTS, "a") as results:
                results.write(json.dumps(figures) + "\n")
