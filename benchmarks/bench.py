"""aiotooz against its peers, on a private Redis and on the file backend, in one run.

Run it with ``nox -s bench`` (or ``python benchmarks/bench.py [--quick]``). It prints a
table with the issue's target verdicts and writes every figure to
``benchmarks/results/latest.json``.

Sections:

* thread hop: one no-op round trip loop -> worker thread -> loop (aiotooz's bridge,
  ``anyio.to_thread.run_sync``, a bare one-thread executor);
* uncontended acquire+release cycles/s: aiotooz, raw sync tooz, the naive wrapper
  (``await anyio.to_thread.run_sync(tooz_lock.acquire)``), redis-py's asyncio Lock;
* one process, many tasks, one name, 1 ms critical section: total time, hand-offs/s, and
  the event-loop lag (1 ms ticker) meanwhile; redis-py's asyncio Lock polls every 0.1 s,
  so it runs fewer tasks and its time is scaled linearly (said so in the output);
* 4 processes x 100 tasks, one name: hand-offs/s, p50/p99 wait, exclusion checked with a
  shared counter file (read, sleep 1 ms, write);
* memory: RSS growth of a fresh process after 100,000 distinct names acquired and
  released, and no per-name state left in the coordinator.

The private ``redis-server`` is the tests' (``tests/support/servers.py``): on a free loopback
port, gone at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from aiotooz import CoordinationSettings, Coordinator, Lock

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.json"

#: Times one debug event that nobody listens to, in a fresh process: with logging left
#: unconfigured, or with structlog configured to drop debug (argv[1]: "none"/"structlog").
DEBUG_COST = """
import logging, sys, time
import structlog
from aiotooz._logging import get_logger
if sys.argv[1] == "structlog":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
log = get_logger(agent_id="bench", backend="file")
n = 200_000
for _ in range(2):
    start = time.perf_counter()
    for _ in range(n):
        log.debug("lock acquired", lock="x", key="x", waited=0.0)
    seconds = time.perf_counter() - start
print(seconds / n)
"""


def debug_cost(setup: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", DEBUG_COST, setup], capture_output=True, text=True, check=True
    )
    return float(done.stdout)


# -- plumbing ----------------------------------------------------------------------


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[tuple[str, str]]:
    """The tests' throwaway redis-server (``tests/support/servers.py``) and its version."""
    sys.path.insert(0, str(HERE.parent))
    from tests.support.servers import PrivateRedis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server.url, version.split()[2].removeprefix("v=")
    finally:
        server.close()


def coordinator(url: str, prefix: str | None = None) -> Coordinator:
    """A coordinator with a prefix of its own (so runs never share keys), or ``prefix``."""
    prefix = prefix or f"b{uuid.uuid4().hex[:8]}-"
    return Coordinator(prefix=prefix, settings=CoordinationSettings(backend_url=url))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def tooz_driver(url: str) -> Any:
    from tooz import coordination

    driver = coordination.get_coordinator(url, f"raw-{uuid.uuid4().hex[:8]}".encode())
    driver.start(start_heart=False)
    return driver


class LagTicker:
    """A 1 ms ticker: how late each tick wakes up is the event loop's lag."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await anyio.sleep(0.001)
            self.lags.append(time.perf_counter() - before - 0.001)


# -- thread hop --------------------------------------------------------------------


async def hop_aiotooz(n: int) -> float:
    """One round trip through aiotooz's thread bridge (a lane of two threads)."""
    from aiotooz._bridge import Lane, loop_scheduler, run_in_lane

    lane = Lane("aiotooz-bench", 2)
    schedule = loop_scheduler()

    def noop() -> None:
        return None

    try:
        for _ in range(50):
            await run_in_lane(lane, schedule, noop, 5.0)
        start = time.perf_counter()
        for _ in range(n):
            await run_in_lane(lane, schedule, noop, 5.0)
        return (time.perf_counter() - start) / n
    finally:
        lane.close(schedule)


async def hop_to_thread(n: int) -> float:
    limiter = anyio.CapacityLimiter(2)

    def noop() -> None:
        return None

    for _ in range(50):
        await anyio.to_thread.run_sync(noop, limiter=limiter)
    start = time.perf_counter()
    for _ in range(n):
        await anyio.to_thread.run_sync(noop, limiter=limiter)
    return (time.perf_counter() - start) / n


async def hop_executor(n: int) -> float:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:

        def noop() -> None:
            return None

        for _ in range(50):
            await loop.run_in_executor(pool, noop)
        start = time.perf_counter()
        for _ in range(n):
            await loop.run_in_executor(pool, noop)
        return (time.perf_counter() - start) / n


# -- uncontended -------------------------------------------------------------------


async def cycles_uninstrumented(url: str, n: int) -> float:
    """aiotooz's cycles with every OpenTelemetry instrument replaced by nothing at all."""
    from aiotooz._telemetry import instruments

    with instruments.disabled():
        return await cycles_aiotooz(url, n)


async def cycles_aiotooz(url: str, n: int, fencing: bool = False) -> float:
    async with coordinator(url) as coord:
        lock = Lock("uncontended", coordinator=coord, fencing=fencing)
        for _ in range(min(50, n)):
            async with lock:
                pass
        start = time.perf_counter()
        for _ in range(n):
            async with lock:
                pass
        return n / (time.perf_counter() - start)


async def handoffs(url: str, rounds: int) -> list[float]:
    """Seconds from one coordinator's release to a waiting coordinator's grant."""
    latencies = []
    prefix = f"b{uuid.uuid4().hex[:8]}-"  # one for both: they must contend for one key
    async with coordinator(url, prefix) as first, coordinator(url, prefix) as second:
        for number in range(rounds):
            holder = Lock("handed", coordinator=first)
            await holder.acquire()
            times: dict[str, float] = {}
            granted = anyio.Event()

            async def wait(times: dict[str, float] = times, granted: anyio.Event = granted) -> None:
                lock = Lock("handed", coordinator=second)
                await lock.acquire()
                times["granted"] = time.perf_counter()
                await lock.release()
                granted.set()

            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await anyio.sleep(0.02 + 0.003 * (number % 7))  # release at varied moments
                times["released"] = time.perf_counter()
                await holder.release()
                await granted.wait()
            latencies.append(times["granted"] - times["released"])
    return latencies


async def child_grant(args: list[str]) -> None:
    """A waiter in a process of its own: print when it asked, then when it was granted."""
    url, prefix = args
    async with coordinator(url, prefix) as coord:
        lock = Lock("busy", coordinator=coord)
        print(f"{time.time():.6f}", flush=True)
        await lock.acquire()
        print(f"{time.time():.6f}", flush=True)
        await lock.release()


async def foreign_waits(url: str, rounds: int) -> list[float]:
    """A waiter of another process against 20 tasks of this one looping on the lock with
    1 ms holds: how long it waits, per round (fairness between processes)."""
    prefix = f"b{uuid.uuid4().hex[:8]}-"
    waits = []
    async with coordinator(url, prefix) as coord:
        stop = anyio.Event()

        async def busy() -> None:
            while not stop.is_set():
                async with Lock("busy", coordinator=coord):
                    await anyio.sleep(0.001)

        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(busy)
            await anyio.sleep(0.2)
            for _ in range(rounds):
                done = await anyio.run_process(
                    [sys.executable, __file__, "_grant", url, prefix], check=True
                )
                asked, granted = (float(x) for x in done.stdout.split())
                waits.append(granted - asked)
            stop.set()
    return waits


def cycles_tooz(url: str, n: int) -> float:
    driver = tooz_driver(url)
    try:
        lock = driver.get_lock(f"raw-{uuid.uuid4().hex[:8]}".encode())
        for _ in range(min(50, n)):
            lock.acquire()
            lock.release()
        start = time.perf_counter()
        for _ in range(n):
            lock.acquire()
            lock.release()
        return n / (time.perf_counter() - start)
    finally:
        driver.stop()


async def cycles_naive(url: str, n: int) -> float:
    driver = await anyio.to_thread.run_sync(tooz_driver, url)
    try:
        lock = driver.get_lock(f"naive-{uuid.uuid4().hex[:8]}".encode())
        for _ in range(min(50, n)):
            await anyio.to_thread.run_sync(lock.acquire)
            await anyio.to_thread.run_sync(lock.release)
        start = time.perf_counter()
        for _ in range(n):
            await anyio.to_thread.run_sync(lock.acquire)
            await anyio.to_thread.run_sync(lock.release)
        return n / (time.perf_counter() - start)
    finally:
        await anyio.to_thread.run_sync(driver.stop)


async def cycles_redis_py(url: str, n: int) -> float:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        lock = client.lock(f"redispy-{uuid.uuid4().hex[:8]}", timeout=30)
        for _ in range(min(50, n)):
            async with lock:
                pass
        start = time.perf_counter()
        for _ in range(n):
            async with lock:
                pass
        return n / (time.perf_counter() - start)
    finally:
        await client.aclose()


# -- one process, many tasks -------------------------------------------------------


@dataclass
class Contention:
    tasks: int
    total: float = 0.0
    in_section: float = 0.0
    lags: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    leftover: int = 0
    #: Critical sections completed; fewer than ``tasks`` if the run hit its time cap.
    done: int = 0
    capped: bool = False


async def contend(
    tasks: int,
    section: float,
    enter: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
    cap: float = math.inf,
) -> Contention:
    """``tasks`` tasks take turns on one lock; stopped after ``cap`` seconds if need be."""
    result = Contention(tasks)
    inside = 0
    go = anyio.Event()
    ticker = LagTicker()

    async def one() -> None:
        nonlocal inside
        await go.wait()
        asked = time.perf_counter()
        async with enter():
            entered = time.perf_counter()
            result.waits.append(entered - asked)
            inside += 1
            assert inside == 1, "two tasks inside the critical section"
            await anyio.sleep(section)
            inside -= 1
            result.in_section += time.perf_counter() - entered
            result.done += 1

    async with anyio.create_task_group() as outer:
        outer.start_soon(ticker.run)
        with anyio.move_on_after(cap + 0.05) as capped:
            async with anyio.create_task_group() as group:
                for _ in range(tasks):
                    group.start_soon(one)
                await anyio.sleep(0.05)
                start = time.perf_counter()
                go.set()
        result.capped = capped.cancelled_caught
        result.total = time.perf_counter() - start
        outer.cancel_scope.cancel()
    result.lags = ticker.lags
    return result


async def contention_aiotooz(url: str, tasks: int, section: float) -> Contention:
    async with coordinator(url) as coord:
        result = await contend(tasks, section, lambda: Lock("contended", coordinator=coord))
        stats = coord.statistics()
        result.leftover = stats.locks_held + stats.names_waited_for
        return result


async def contention_redis_py(url: str, tasks: int, section: float, cap: float) -> Contention:
    import redis.asyncio

    # A connection per polling task (redis-py's default pool stops at 100 and then raises).
    client = redis.asyncio.Redis.from_url(url, max_connections=tasks + 10)
    name = f"redispy-{uuid.uuid4().hex[:8]}"
    try:
        return await contend(tasks, section, lambda: client.lock(name, timeout=60), cap)
    finally:
        await client.aclose()


async def idle_lag(seconds: float) -> list[float]:
    ticker = LagTicker()
    with anyio.move_on_after(seconds):
        await ticker.run()
    return ticker.lags


# -- several processes -------------------------------------------------------------


async def child_contend(args: list[str]) -> None:
    url, prefix, name, counter_path, tasks, rounds, start_at = args
    counter = Path(counter_path)
    waits: list[float] = []
    async with Coordinator(prefix=prefix, settings=CoordinationSettings(backend_url=url)) as coord:

        async def one() -> None:
            for _ in range(int(rounds)):
                asked = time.perf_counter()
                async with Lock(name, coordinator=coord):
                    waits.append(time.perf_counter() - asked)
                    value = int(counter.read_text())
                    await anyio.sleep(0.001)
                    counter.write_text(str(value + 1))

        await anyio.sleep(max(0.0, float(start_at) - time.time()))
        began = time.time()
        async with anyio.create_task_group() as group:
            for _ in range(int(tasks)):
                group.start_soon(one)
        ended = time.time()
    print(json.dumps({"began": began, "ended": ended, "waits": waits}))


def processes(url: str, workdir: Path, procs: int, tasks: int, rounds: int) -> dict[str, Any]:
    counter = workdir / f"counter-{uuid.uuid4().hex[:6]}"
    counter.write_text("0")
    prefix = f"p{uuid.uuid4().hex[:8]}-"
    start_at = time.time() + 1.5  # every child connected and waiting by then
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "_contend",
                url,
                prefix,
                "shared",
                str(counter),
                str(tasks),
                str(rounds),
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    outputs = [child.communicate(timeout=600)[0] for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError(f"a contending process failed: {outputs}")
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    waits = [w for report in reports for w in report["waits"]]
    span = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
    expected = procs * tasks * rounds
    counted = int(counter.read_text())
    return {
        "processes": procs,
        "tasks": tasks,
        "rounds": rounds,
        "handoffs": expected,
        "seconds": span,
        "handoffs_per_s": expected / span,
        "wait_p50": pct(waits, 50),
        "wait_p99": pct(waits, 99),
        "counter": counted,
        "exclusive": counted == expected,
    }


# -- memory ------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def child_memory(args: list[str]) -> None:
    from aiotooz import _process  # its table is replaced after a fork: read it at the end

    url, names, concurrency = args[0], int(args[1]), int(args[2])
    async with coordinator(url) as coord:

        async def run(prefix: str, count: int) -> None:
            async def worker(offset: int) -> None:
                for i in range(offset, count, concurrency):
                    async with coord.get_lock(f"{prefix}-{i}"):
                        pass

            async with anyio.create_task_group() as group:
                for offset in range(concurrency):
                    group.start_soon(worker, offset)

        await run("warm", 2_000)
        gc.collect()
        before = rss_bytes()
        start = time.perf_counter()
        await run("name", names)
        seconds = time.perf_counter() - start
        gc.collect()
        after = rss_bytes()
        report = {
            "names": names,
            "seconds": seconds,
            "rss_before": before,
            "rss_after": after,
            "growth": after - before,
            "waited_for_left": coord.statistics().names_waited_for,
            "holds_left": coord.statistics().locks_held,
            # The file backend's process-wide table of lock-file handles (weak values).
            "file_handles_left": len(_process._FILE_LOCKS),
        }
    print(json.dumps(report))


def memory(url: str, names: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "_memory", url, str(names), "32"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode:
        raise RuntimeError(f"memory run failed: {done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


# -- the run -----------------------------------------------------------------------


@dataclass
class Plan:
    quick: bool
    hops: int
    cycles: int
    rounds: int
    tasks: int
    redis_py_cap: float
    procs: int
    proc_tasks: int
    proc_rounds: int
    names: int
    handoffs: int
    foreign: int


def plan(quick: bool) -> Plan:
    if quick:
        return Plan(True, 300, 200, 1, 200, 5.0, 4, 25, 1, 5_000, 10, 2)
    return Plan(False, 2_000, 1_000, 3, 1_000, 60.0, 4, 100, 1, 100_000, 30, 5)


def run_async(func: Callable[..., Awaitable[Any]], *args: Any, backend: str = "asyncio") -> Any:
    return anyio.run(func, *args, backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (small counts)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args()
    p = plan(options.quick)
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="aiotooz-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "redis").mkdir()
        with private_redis(workdir / "redis") as (redis_url, redis_version):
            backends = {"redis": redis_url, "file": (workdir / "locks").as_uri()}
            steps: list[tuple[str, Callable[[], Any]]] = []
            results: dict[str, Any] = {}

            def step(key: str, func: Callable[[], Any]) -> None:
                steps.append((key, func))

            step("hop/to_thread", lambda: run_async(hop_to_thread, p.hops))
            step("hop/executor", lambda: run_async(hop_executor, p.hops))
            step("hop/aiotooz", lambda: run_async(hop_aiotooz, p.hops))
            step(
                "hop/aiotooz-trio",
                lambda: run_async(hop_aiotooz, p.hops, backend="trio"),
            )
            step("lag/idle", lambda: run_async(idle_lag, 1.0))
            step("debug/none", lambda: debug_cost("none"))
            step("debug/structlog", lambda: debug_cost("structlog"))
            for rnd in range(p.rounds):
                for name, url in backends.items():
                    step(f"cycles/{name}/tooz/{rnd}", lambda u=url: cycles_tooz(u, p.cycles))
                    step(
                        f"cycles/{name}/aiotooz/{rnd}",
                        lambda u=url: run_async(cycles_aiotooz, u, p.cycles),
                    )
                    step(
                        f"cycles/{name}/aiotooz-trio/{rnd}",
                        lambda u=url: run_async(cycles_aiotooz, u, p.cycles, backend="trio"),
                    )
                    step(
                        f"cycles/{name}/aiotooz-bare/{rnd}",
                        lambda u=url: run_async(cycles_uninstrumented, u, p.cycles),
                    )
                    step(
                        f"cycles/{name}/aiotooz-fenced/{rnd}",
                        lambda u=url: run_async(cycles_aiotooz, u, p.cycles, True),
                    )
                    step(
                        f"cycles/{name}/naive/{rnd}",
                        lambda u=url: run_async(cycles_naive, u, p.cycles),
                    )
                step(
                    f"cycles/redis/redis-py/{rnd}",
                    lambda: run_async(cycles_redis_py, backends["redis"], p.cycles),
                )
            for name, url in backends.items():
                step(f"foreign/{name}", lambda u=url: run_async(foreign_waits, u, p.foreign))
                step(f"handoff/{name}", lambda u=url: run_async(handoffs, u, p.handoffs))
                step(
                    f"handoff/{name}-trio",
                    lambda u=url: run_async(handoffs, u, p.handoffs, backend="trio"),
                )
            for name, url in backends.items():
                step(
                    f"contention/{name}/aiotooz",
                    lambda u=url: run_async(contention_aiotooz, u, p.tasks, 0.001),
                )
            step(
                "contention/redis/redis-py",
                lambda: run_async(
                    contention_redis_py, backends["redis"], p.tasks, 0.001, p.redis_py_cap
                ),
            )
            for name, url in backends.items():
                step(
                    f"processes/{name}",
                    lambda u=url: processes(u, workdir, p.procs, p.proc_tasks, p.proc_rounds),
                )
            for name, url in backends.items():
                step(f"memory/{name}", lambda u=url: memory(u, p.names))

            bar = tqdm(steps, desc="bench", unit="step", disable=options.no_progress)
            for key, func in bar:
                bar.set_postfix_str(key)
                results[key] = func()
            bar.close()

    report = summarise(p, results, redis_version)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(report, indent=2, default=_json_default))
    print(render(report))
    print(f"\nJSON: {options.output}")


def _json_default(obj: object) -> Any:
    if isinstance(obj, Contention):
        return {
            "tasks": obj.tasks,
            "total": obj.total,
            "in_section": obj.in_section,
            "lag_p50": pct(obj.lags, 50),
            "lag_p99": pct(obj.lags, 99),
            "wait_p50": pct(obj.waits, 50),
            "wait_p99": pct(obj.waits, 99),
            "leftover": obj.leftover,
            "done": obj.done,
            "capped": obj.capped,
        }
    raise TypeError(type(obj))


def summarise(p: Plan, results: dict[str, Any], redis_version: str) -> dict[str, Any]:
    cycles: dict[str, dict[str, list[float]]] = {}
    for key, value in results.items():
        if key.startswith("cycles/"):
            _, backend, impl, _ = key.split("/")
            cycles.setdefault(backend, {}).setdefault(impl, []).append(value)
    medians = {b: {i: statistics.median(v) for i, v in d.items()} for b, d in cycles.items()}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": p.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "python": platform.python_version(),
            "redis": redis_version,
            "platform": platform.platform(),
        },
        "plan": p.__dict__,
        "hop_us": {k.split("/")[1]: v * 1e6 for k, v in results.items() if k.startswith("hop/")},
        "debug_event_us": {
            k.split("/")[1]: v * 1e6 for k, v in results.items() if k.startswith("debug/")
        },
        "idle_lag": {"p50": pct(results["lag/idle"], 50), "p99": pct(results["lag/idle"], 99)},
        "cycles_per_s": medians,
        "cycles_runs": cycles,
        "contention": {
            k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("contention/")
        },
        "processes": {k.split("/")[1]: v for k, v in results.items() if k.startswith("processes/")},
        "handoff": {
            k.split("/")[1]: {"median": statistics.median(v), "max": max(v)}
            for k, v in results.items()
            if k.startswith("handoff/")
        },
        "foreign_waits": {
            k.split("/")[1]: v for k, v in results.items() if k.startswith("foreign/")
        },
        "memory": {k.split("/")[1]: v for k, v in results.items() if k.startswith("memory/")},
    }


def render(r: dict[str, Any]) -> str:
    p = r["plan"]
    out: list[str] = []
    ms = 1e3
    out.append(
        f"aiotooz benchmark {r['date']}{' (QUICK: small counts)' if r['quick'] else ''}; "
        f"{r['machine']['cpus']} CPUs, load "
        f"{', '.join(f'{x:.2f}' for x in r['machine']['load_avg'])}, "
        f"Python {r['machine']['python']}, Redis {r['machine']['redis']} (private, loopback)"
    )
    hop = r["hop_us"]
    out.append("")
    out.append("Thread hop, no-op round trip (asyncio unless noted)")
    out.append(
        f"  aiotooz bridge {hop['aiotooz']:.0f} µs (trio {hop['aiotooz-trio']:.0f} µs) | "
        f"anyio.to_thread.run_sync {hop['to_thread']:.0f} µs | "
        f"one-thread executor {hop['executor']:.0f} µs"
    )
    out.append(
        f"  idle event-loop lag (1 ms ticker): p50 {r['idle_lag']['p50'] * ms:.2f} ms, "
        f"p99 {r['idle_lag']['p99'] * ms:.2f} ms"
    )
    debug = r["debug_event_us"]
    out.append(
        f"  a debug event nobody wants: {debug['none']:.2f} µs (logging unconfigured), "
        f"{debug['structlog']:.2f} µs (structlog filtering at WARNING)"
    )
    out.append("")
    out.append(
        f"Uncontended acquire+release, cycles/s (median of {p['rounds']} x {p['cycles']} cycles)"
    )
    out.append(f"  {'':<38}{'redis':>10}{'file':>10}")
    labels = {
        "aiotooz": "aiotooz (asyncio)",
        "aiotooz-trio": "aiotooz (trio)",
        "aiotooz-fenced": "aiotooz, fencing=True (asyncio)",
        "aiotooz-bare": "aiotooz, no OpenTelemetry (asyncio)",
        "tooz": "raw sync tooz",
        "naive": "naive to_thread wrapper",
        "redis-py": "redis-py asyncio Lock",
    }
    c = r["cycles_per_s"]
    for impl, label in labels.items():
        row = [c.get(b, {}).get(impl) for b in ("redis", "file")]
        out.append(f"  {label:<38}" + "".join(f"{v:>10.0f}" if v else f"{'-':>10}" for v in row))
    out.append("")
    con = r["contention"]
    out.append(f"One process, one name, 1 ms critical section ({p['tasks']} tasks)")
    out.append(
        f"  {'':<24}{'done':>6}{'total s':>9}{'hand-offs/s':>13}{'x sum(CS)':>10}"
        f"{'gap µs':>8}{'lag p50 ms':>11}{'lag p99 ms':>11}"
    )
    for key, label in (
        ("redis/aiotooz", "aiotooz, redis"),
        ("file/aiotooz", "aiotooz, file"),
        ("redis/redis-py", "redis-py asyncio Lock"),
    ):
        x = con[key]
        total = x.total
        out.append(
            f"  {label:<24}{x.done:>6}{total:>9.2f}{x.done / total:>13.0f}"
            f"{total / (x.done * 0.001):>10.2f}{(total - x.in_section) / x.done * 1e6:>8.0f}"
            f"{pct(x.lags, 50) * ms:>11.2f}{pct(x.lags, 99) * ms:>11.2f}"
        )
    rp = con["redis/redis-py"]
    scaled = rp.total * rp.tasks / rp.done
    if rp.capped:
        out.append(
            f"  redis-py's Lock polls every 0.1 s: its run of {rp.tasks} tasks was stopped "
            f"after {rp.total:.0f} s with {rp.done} hand-offs done; at that rate all "
            f"{rp.tasks} would take ~{scaled:.0f} s"
        )
    out.append(
        "  x sum(CS): total / (done x 1 ms); gap: (total - time spent inside the critical "
        "sections) / done, i.e. the cost of one hand-off"
    )
    out.append("")
    out.append(
        f"{p['procs']} processes x {p['proc_tasks']} tasks x {p['proc_rounds']} round, "
        "one name, 1 ms critical section (shared counter file)"
    )
    out.append(
        f"  {'':<10}{'hand-offs/s':>13}{'wait p50 ms':>13}{'wait p99 ms':>13}{'exclusion':>11}"
    )
    for backend, x in r["processes"].items():
        out.append(
            f"  {backend:<10}{x['handoffs_per_s']:>13.0f}{x['wait_p50'] * ms:>13.1f}"
            f"{x['wait_p99'] * ms:>13.1f}{'ok' if x['exclusive'] else 'BROKEN':>11}"
        )
    out.append("")
    out.append(f"Memory: {p['names']:,} distinct names acquired and released (fresh process)")
    for backend, x in r["memory"].items():
        out.append(
            f"  {backend:<8} RSS growth {x['growth'] / 2**20:6.1f} MB in {x['seconds']:.1f} s; "
            f"left: {x['waited_for_left']} names waited for, {x['holds_left']} holds, "
            f"{x['file_handles_left']} lock-file handles"
        )

    out.append("")
    out.append(f"Hand-off between two coordinators, release to grant ({p['handoffs']} rounds)")
    for name, h in r["handoff"].items():
        out.append(f"  {name:<12} median {h['median'] * ms:6.2f} ms   max {h['max'] * ms:6.2f} ms")
    out.append("")
    out.append(
        "A waiter in another process against 20 tasks looping on the lock (1 ms holds), "
        f"{p['foreign']} rounds"
    )
    for name, waits in r["foreign_waits"].items():
        shown = ", ".join(f"{w * ms:.0f}" for w in waits)
        out.append(f"  {name:<12} waits (ms): {shown}   worst {max(waits) * ms:.0f} ms")

    # Verdicts.
    out.append("")
    out.append("Targets")
    verdicts = []
    cr, cf = c["redis"], c["file"]
    verdicts.append(
        ("uncontended Redis >= 0.8x raw sync tooz", cr["aiotooz"] / cr["tooz"], 0.8, "x")
    )
    verdicts.append(
        (
            "uncontended Redis >= 0.8x redis-py asyncio Lock",
            cr["aiotooz"] / cr["redis-py"],
            0.8,
            "x",
        )
    )
    verdicts.append(
        ("uncontended file >= 0.5x raw sync tooz", cf["aiotooz"] / cf["tooz"], 0.5, "x")
    )
    worst_debug = max(r["debug_event_us"].values())
    verdicts.append(("a debug event nobody wants < 1 µs", worst_debug, 1.0, "µs<="))
    ai = con["redis/aiotooz"]
    verdicts.append(
        (
            f"{p['tasks']} tasks/1 ms total <= 2x sum of critical sections (redis)",
            ai.total / (ai.tasks * 0.001),
            2.0,
            "x<=",
        )
    )
    fi = con["file/aiotooz"]
    verdicts.append(
        (
            f"{p['tasks']} tasks/1 ms total <= 2x sum of critical sections (file)",
            fi.total / (fi.tasks * 0.001),
            2.0,
            "x<=",
        )
    )
    verdicts.append(
        (
            ">= 20x faster than redis-py asyncio Lock" + (" (extrapolated)" if rp.capped else ""),
            scaled / ai.total,
            20.0,
            "x",
        )
    )
    worst_lag = max(pct(ai.lags, 99), pct(fi.lags, 99))
    verdicts.append(("loop lag p99 <= 5 ms during contention", worst_lag * ms, 5.0, "ms<="))
    worst_rss = max(x["growth"] for x in r["memory"].values()) / 2**20
    verdicts.append((f"RSS growth <= 20 MB for {p['names']:,} names", worst_rss, 20.0, "MB<="))
    from aiotooz._connection import _LOCK_OBJECTS_KEPT

    # A connection keeps its most recently used lock objects (a bounded cache).
    left = sum(
        x["waited_for_left"] + x["holds_left"] + max(0, x["file_handles_left"] - _LOCK_OBJECTS_KEPT)
        for x in r["memory"].values()
    )
    for label, value, target, kind in verdicts:
        ok = value <= target if kind.endswith("<=") else value >= target
        unit = kind.rstrip("<=")
        out.append(f"  [{'MET ' if ok else 'MISS'}] {label}: {value:.2f}{unit}")
    out.append(
        f"  [{'MET ' if left == 0 else 'MISS'}] no per-name state after release: {left} left"
    )
    excl = all(x["exclusive"] for x in r["processes"].values())
    out.append(f"  [{'MET ' if excl else 'MISS'}] exclusion across processes (counter file)")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_contend":
        anyio.run(child_contend, sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_memory":
        anyio.run(child_memory, sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_grant":
        anyio.run(child_grant, sys.argv[2:])
    else:
        main()
