"""Thousands of locks on one coordinator: beat duration, loop lag, acquire rate per backend.

Run by ``nox -s bench`` (or ``python benchmarks/scale.py [--quick]``, with the project's
``tests`` directory importable: the private servers are ``tests/support/servers.py``'s). One
coordinator per backend, with the issue's service set-up: a 3 s lock TTL (4 s on
memcached, which may expire an item a second early: 3 s guaranteed) and a 1 s heartbeat.
It takes distinct names in steps and, at each step:

* acquiring: seconds to take the first 2,000 names (16 tries in flight);
* beat: the duration of one heartbeat (refresh and ownership check of every lock held,
  the call the coordinator's heartbeat makes), median of 5, while holding 100, 1,000
  and 10,000 locks (``--quick``: 100 and 1,000);
* hold: 5,000 locks held for 20 s (``--quick``: 1,000 for 5 s) with a 1 ms ticker on the
  event loop: its lag (p50, p99, max) and how many locks were lost (target: none, and
  p99 <= 10 ms).

Every server is private, on a free loopback port, and stopped at the end. Results go to
``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from aiotooz import CoordinationSettings, Coordinator, Lock

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"
BACKENDS = ["redis", "memcached", "etcd3+http", "zookeeper"]
#: The URL option that gives each backend a 3 s guaranteed lock TTL.
TTL_OPTION = {
    "redis": "lock_timeout=3",
    "memcached": "lock_timeout=4",
    "etcd3+http": "lock_timeout=3",
    "zookeeper": "timeout=3",
}
PARALLEL = 16


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def take(coordinator: Coordinator, locks: list[Lock], start: int, stop: int) -> float:
    """Acquire ``start``..``stop`` (new names), ``PARALLEL`` at a time; the seconds it took.

    ``PARALLEL`` workers take the numbers in turn: spawning a task per name would block
    the event loop itself for seconds at 10,000 names on a loaded machine.
    """
    numbers = iter(range(start, stop))

    async def worker() -> None:
        for number in numbers:
            lock = Lock(f"n{number}", coordinator=coordinator)
            assert await lock.acquire()
            locks.append(lock)

    began = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(PARALLEL):
            group.start_soon(worker)
    return time.perf_counter() - began


async def beat_seconds(coordinator: Coordinator) -> float:
    """One heartbeat over every lock held, as the coordinator's heartbeat makes it."""
    connection = coordinator._connection
    assert connection is not None
    handles = [hold.handle for hold in coordinator.lock_table.holds_through(connection)]
    times = []
    for _ in range(5):
        began = time.perf_counter()
        await connection.heartbeat(handles)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


async def hold(seconds: float) -> list[float]:
    """Lags of a 1 ms ticker on the event loop for ``seconds``."""
    lags = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        began = time.perf_counter()
        await anyio.sleep(0.001)
        lags.append(time.perf_counter() - began - 0.001)
    return lags


async def run_backend(url: str, quick: bool) -> dict[str, Any]:
    steps = [100, 1000] if quick else [100, 1000, 10_000]
    held_count, held_for = (1000, 5.0) if quick else (5000, 20.0)
    settings = CoordinationSettings(backend_url=url, heartbeat=1.0)
    row: dict[str, Any] = {"beat": {}}
    locks: list[Lock] = []
    coordinator = Coordinator(prefix=f"scale-{uuid.uuid4().hex[:6]}-", settings=settings)
    async with coordinator:
        marks = sorted({*steps, 2000, held_count})
        have = 0
        for mark in marks:
            print(f"  taking {have}..{mark}", file=sys.stderr, flush=True)
            seconds = await take(coordinator, locks, have, mark)
            if mark <= 2000:
                row["acquire_2000_s"] = row.get("acquire_2000_s", 0.0) + seconds
            have = mark
            if mark in steps:
                row["beat"][str(mark)] = await beat_seconds(coordinator)
            if mark == held_count:
                lost_before = coordinator.statistics().locks_lost
                lags = await hold(held_for)
                row["hold"] = {
                    "locks": held_count,
                    "seconds": held_for,
                    "lost": coordinator.statistics().locks_lost - lost_before,
                    "lag_p50_ms": pct(lags, 0.5) * 1000,
                    "lag_p99_ms": pct(lags, 0.99) * 1000,
                    "lag_max_ms": max(lags) * 1000,
                }
        row["lost_in_all"] = sum(lock.lost for lock in locks)
        print("  releasing", file=sys.stderr, flush=True)
        held = iter(locks)

        async def release() -> None:
            for lock in held:
                await lock.release()

        async with anyio.create_task_group() as group:
            for _ in range(PARALLEL):
                group.start_soon(release)
    return row


def render(results: dict[str, Any]) -> str:
    steps = sorted({int(step) for row in results["backends"].values() for step in row["beat"]})
    header = ["backend", "acquire 2,000 (s)"] + [f"beat @{step:,} (ms)" for step in steps]
    header += ["held x s", "lost", "lag p50/p99/max (ms)"]
    lines = [" | ".join(header)]
    for name, row in results["backends"].items():
        hold_row = row["hold"]
        cells = [name, f"{row['acquire_2000_s']:.2f}"]
        cells += [f"{row['beat'].get(str(step), float('nan')) * 1000:.1f}" for step in steps]
        cells += [
            f"{hold_row['locks']:,} x {hold_row['seconds']:g}",
            str(hold_row["lost"]),
            f"{hold_row['lag_p50_ms']:.2f} / {hold_row['lag_p99_ms']:.2f} / "
            f"{hold_row['lag_max_ms']:.1f}",
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (small counts)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    options = parser.parse_args()
    names = options.backends.split(",")
    sys.path.insert(0, str(HERE))
    from wakeups import private_servers

    results: dict[str, Any] = {"quick": options.quick, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="aiotooz-scale-") as tmp:
        servers = [{"etcd3+http": "etcd"}.get(name, name) for name in names]
        with private_servers(Path(tmp), servers) as urls:
            for name, server in zip(names, servers, strict=True):
                print(f"{name}:", file=sys.stderr, flush=True)
                url = f"{urls[server]}?{TTL_OPTION[name]}"
                results["backends"][name] = anyio.run(run_backend, url, options.quick)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(results, indent=2))
    print(render(results))
    print(f"\nJSON: {options.output}")


if __name__ == "__main__":
    main()
