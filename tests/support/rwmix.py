"""Readers and a writer of one RWLock, logging to a shared file: the cross-process check.

`run_mix` runs in every process of the test (tests/support/worker.py ``rwlock``, and the
test's own). Each line is one ``os.write`` to a file opened with ``O_APPEND``: it lands
whole, in the order of the writes, so the file orders every process's entries and exits in
time. An entry is logged after the grant and an exit before the release: logged
intervals lie inside the holds, so two that overlap in the file overlapped for real.
Each entry names its task (``<pid>.r<n>`` or ``<pid>.w``): the check can tell that
nobody was starved without counting on how fast the machine is.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import anyio

from aiotooz import RWLock, fencing_token


async def run_mix(rw: RWLock, log: str, seconds: float, readers: int = 3) -> None:
    """``readers`` reader tasks in a dense stream and one writer, for ``seconds``."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    end = time.monotonic() + seconds

    async def reader(number: int) -> None:
        while time.monotonic() < end:
            async with rw.read():
                os.write(fd, f"R+ {os.getpid()}.r{number}\n".encode())
                await anyio.sleep(random.uniform(0.01, 0.04))
                os.write(fd, b"R-\n")
            await anyio.sleep(random.uniform(0, 0.005))

    async def writer() -> None:
        while time.monotonic() < end:
            await anyio.sleep(random.uniform(0.05, 0.15))
            asked = time.monotonic()
            async with rw.write():
                waited = time.monotonic() - asked
                os.write(fd, f"W+ {waited:.4f} {fencing_token()} {os.getpid()}.w\n".encode())
                await anyio.sleep(0.01)
                os.write(fd, b"W-\n")

    try:
        async with anyio.create_task_group() as group:
            for number in range(readers):
                group.start_soon(reader, number)
            group.start_soon(writer)
    finally:
        os.close(fd)


@dataclass
class MixReport:
    """What a log shows."""

    reads: int = 0
    writes: int = 0
    peak_readers: int = 0
    longest_writer_wait: float = 0.0
    waits: list[float] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    tokens_out_of_order: int = 0
    #: How many times each task (``<pid>.r<n>``, ``<pid>.w``) got in.
    entries: Counter[str] = field(default_factory=Counter)


def check_log(text: str) -> MixReport:
    """Replay the log: count overlaps, the peak of readers, the writers' waits and tokens."""
    report = MixReport()
    readers = 0
    writing = False
    last_token = -1
    for number, line in enumerate(text.splitlines(), 1):
        kind, *rest = line.split()
        if kind == "R+":
            if writing:
                report.overlaps.append(f"line {number}: a reader entered while a writer held")
            readers += 1
            report.reads += 1
            report.entries[rest[0]] += 1
            report.peak_readers = max(report.peak_readers, readers)
        elif kind == "R-":
            readers -= 1
        elif kind == "W+":
            if writing or readers:
                report.overlaps.append(
                    f"line {number}: a writer entered with {readers} readers, writing={writing}"
                )
            writing = True
            report.writes += 1
            waited, token = float(rest[0]), int(rest[1])
            report.entries[rest[2]] += 1
            report.waits.append(waited)
            report.longest_writer_wait = max(report.longest_writer_wait, waited)
            if token <= last_token:
                report.tokens_out_of_order += 1
            last_token = token
        elif kind == "W-":
            writing = False
    return report
