"""Waiting across processes on every backend: hand-off, fairness, many processes.

Run by ``nox -s bench`` after ``bench.py`` (or ``python benchmarks/wakeups.py [--quick]``,
with the project's ``tests`` directory importable: the private servers are
``tests/support/servers.py``'s). Every server is private, on a free loopback port, and stopped
at the end. It prints a table with the issue's targets and writes its figures to
``benchmarks/results/wakeups.json``.

Sections, per backend:

* hand-off between processes: a process holds the lock, a waiter in another process is
  waiting; from the release (wall clock, just before the call) to the waiter's grant.
  Peers, the same way: redis-py's asyncio Lock, kazoo's Lock, ``pg_advisory_lock``,
  ``GET_LOCK`` (each peer a blocking call on a connection of its own, in a thread).
  The same for a semaphore slot (``aiotooz-semaphore``): a ``Semaphore(name, 2)`` whose
  two slots the first process holds; it releases one to the waiter.
* a foreign waiter: a waiter in another process against 20 tasks of this one looping on
  the lock with 1 ms holds; its worst wait (``bench.foreign_waits``).
* PostgreSQL and MySQL: the server sessions of one coordinator that holds 1,000 locks and
  has 10 tasks waiting for locks held elsewhere (``pg_stat_activity``, the process list).
* 4 processes x 25 tasks x 2 rounds x 1 ms holds on one name: wall time over the sum of
  the holds, and how often the lock passed from one process to another.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio

from aiotooz import CoordinationSettings, Coordinator, Lock, Semaphore

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "wakeups.json"
BACKENDS = ["file", "ipc", "redis", "memcached", "zookeeper", "etcd", "postgresql", "mysql"]
#: The issue's targets: hand-off median and max (not on memcached: "no worse").
HANDOFF_TARGET = (0.002, 0.010)
#: A semaphore slot's hand-off median, on these backends (asyncio).
SLOT_TARGET = 0.005
SLOT_BACKENDS = ("file", "redis")
#: A foreign waiter's worst wait, on every backend but memcached.
FOREIGN_TARGET = 0.100
#: 4 x 25 x 2 x 1 ms: wall time over the sum of holds, on these backends.
RATIO_TARGET = 1.3
RATIO_BACKENDS = ("redis", "zookeeper", "etcd", "postgresql", "file")
#: The peers measured the same way: backend -> implementation.
PEERS = {
    "redis": "redis-py",
    "zookeeper": "kazoo",
    "postgresql": "pg_advisory_lock",
    "mysql": "GET_LOCK",
}
#: One coordinator's sessions with 1,000 locks held and 10 waiters: at most 1 + 4.
SESSIONS_TARGET = 5


def coordinator(url: str, prefix: str) -> Coordinator:
    return Coordinator(prefix=prefix, settings=CoordinationSettings(backend_url=url))


@contextlib.contextmanager
def private_servers(workdir: Path, names: list[str]) -> Iterator[dict[str, str]]:
    """A URL per backend: private servers where one is needed."""
    sys.path.insert(0, str(HERE.parent))
    from tests.support.servers import SERVERS

    urls = {"file": (workdir / "locks").as_uri(), "ipc": "ipc://"}
    started = []
    try:
        for name in names:
            if name in urls:
                continue
            server = SERVERS[name](workdir / name)
            started.append(server)
            server.start()
            urls[name] = server.url
        yield urls
    finally:
        for server in started:
            server.close()


# -- one lock, by implementation ---------------------------------------------------------


class Holder:
    """One lock of one implementation, taken and given back from async code."""

    def __init__(self, impl: str, url: str, name: str) -> None:
        self.impl, self.url, self.name = impl, url, name
        self._stack = contextlib.AsyncExitStack()
        self._lock: Any = None

    async def __aenter__(self) -> Holder:
        if self.impl in ("aiotooz", "aiotooz-semaphore"):
            prefix, _, name = self.name.partition(":")
            coord = await self._stack.enter_async_context(coordinator(self.url, prefix))
            if self.impl == "aiotooz":
                self._lock = Lock(name, coordinator=coord)
            else:
                self._lock = Semaphore(name, 2, coordinator=coord)
        elif self.impl == "redis-py":
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(self.url)
            self._stack.push_async_callback(client.aclose)
            self._lock = client.lock(self.name, timeout=60)
        elif self.impl == "kazoo":
            from kazoo.client import KazooClient

            client = KazooClient(hosts=self.url.split("://", 1)[1].split("?")[0])
            await anyio.to_thread.run_sync(client.start)
            self._stack.callback(client.stop)
            self._lock = client.Lock(f"/bench/{self.name}")
        elif self.impl == "pg_advisory_lock":
            import psycopg

            connection = psycopg.connect(self.url, autocommit=True)
            self._stack.callback(connection.close)
            self._lock = connection.cursor()
        elif self.impl == "GET_LOCK":
            import pymysql

            parts = urlsplit(self.url)
            connection = pymysql.connect(host=parts.hostname, port=parts.port, user=parts.username)
            self._stack.callback(connection.close)
            self._lock = connection.cursor()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def acquire(self) -> None:
        if self.impl in ("aiotooz", "aiotooz-semaphore", "redis-py"):
            await self._lock.acquire()
        elif self.impl == "kazoo":
            await anyio.to_thread.run_sync(self._lock.acquire)
        elif self.impl == "GET_LOCK":
            await anyio.to_thread.run_sync(self._lock.execute, _MY_LOCK, (self.name,))
        else:
            await anyio.to_thread.run_sync(self._lock.execute, _PG_LOCK, (_pg_key(self.name),))

    async def release(self) -> None:
        if self.impl in ("aiotooz", "aiotooz-semaphore", "redis-py"):
            await self._lock.release()
        elif self.impl == "kazoo":
            await anyio.to_thread.run_sync(self._lock.release)
        elif self.impl == "GET_LOCK":
            await anyio.to_thread.run_sync(self._lock.execute, _MY_UNLOCK, (self.name,))
        else:
            await anyio.to_thread.run_sync(self._lock.execute, _PG_UNLOCK, (_pg_key(self.name),))


_PG_LOCK = "SELECT pg_advisory_lock(%s)"
_PG_UNLOCK = "SELECT pg_advisory_unlock(%s)"
_MY_LOCK = "SELECT GET_LOCK(%s, 3600)"  # MariaDB takes no -1 for "forever"
_MY_UNLOCK = "SELECT RELEASE_LOCK(%s)"


def _pg_key(name: str) -> int:
    return int(uuid.uuid5(uuid.NAMESPACE_URL, name).int % 2**62)


# -- server sessions of one coordinator ------------------------------------------------------


def _server_sessions(backend: str, url: str) -> set[int]:
    """The client sessions the server has now, but the one asking."""
    if backend == "postgresql":
        import psycopg

        with psycopg.connect(url.split("?")[0], autocommit=True) as connection:
            rows = connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND pid <> pg_backend_pid()"
            ).fetchall()
    else:
        import pymysql

        parts = urlsplit(url)
        with pymysql.connect(host=parts.hostname, port=parts.port, user=parts.username) as conn:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
                    " AND COMMAND <> 'Daemon' AND USER <> 'system user'"
                )
                rows = cursor.fetchall()
    return {int(row[0]) for row in rows}


async def sessions_per_coordinator(backend: str, url: str) -> dict[str, int]:
    """One coordinator's server sessions: at rest, and with 1,000 locks and 10 waiters."""
    if backend == "postgresql":
        url += "?keys=64"  # 1,010 names would collide in plain tooz's 65,536 keys
    prefix = f"s{uuid.uuid4().hex[:6]}-"
    async with coordinator(url, prefix) as other:
        busy = [Lock(f"busy-{number}", coordinator=other) for number in range(10)]
        for lock in busy:
            await lock.acquire()
        before = _server_sessions(backend, url)
        async with coordinator(url, prefix) as coord:
            at_rest = len(_server_sessions(backend, url) - before)
            held = [Lock(f"held-{number}", coordinator=coord) for number in range(1000)]
            for lock in held:
                await lock.acquire()
            waiters = [Lock(lock.name, coordinator=coord) for lock in busy]
            async with anyio.create_task_group() as group:
                for waiter in waiters:
                    group.start_soon(waiter.acquire)
                await anyio.sleep(1.0)
                loaded = len(_server_sessions(backend, url) - before)
                for lock in busy:
                    await lock.release()
            for lock in [*held, *waiters]:  # the waiters got their locks once busy let go
                await lock.release()
    return {"at_rest": at_rest, "held_1000_waiting_10": loaded}


# -- hand-off between processes ------------------------------------------------------------


async def child_serve(impl: str, url: str, name: str) -> None:
    """On each input line: take the lock (waiting), print the grant's wall clock, release."""
    async with Holder(impl, url, name) as lock:
        print("ready", flush=True)
        while await anyio.to_thread.run_sync(sys.stdin.readline):
            await lock.acquire()
            print(f"{time.time():.6f}", flush=True)
            await lock.release()


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


async def handoffs(impl: str, url: str, rounds: int, loop: str) -> list[float]:
    """Release to grant, the waiter in a process of its own running on ``loop``."""
    ours = impl.startswith("aiotooz")
    name = f"h{uuid.uuid4().hex[:8]}-:handed" if ours else uuid.uuid4().hex[:12]
    child = _spawn("_serve", loop, impl, url, name)
    assert child.stdin is not None and child.stdout is not None
    latencies = []
    try:
        async with Holder(impl, url, name) as lock:
            assert await anyio.to_thread.run_sync(child.stdout.readline) == "ready\n"
            if impl == "aiotooz-semaphore":
                await lock.acquire()  # one slot held throughout: the waiter watches two
            for number in range(rounds):
                await lock.acquire()
                child.stdin.write("go\n")
                child.stdin.flush()
                await anyio.sleep(0.03 + 0.003 * (number % 7))  # the child waits by now
                released = time.time()
                await lock.release()
                granted = float(await anyio.to_thread.run_sync(child.stdout.readline))
                latencies.append(granted - released)
                await anyio.sleep(0.005)  # the child releases
            if impl == "aiotooz-semaphore":
                await lock.release()
    finally:
        child.stdin.close()
        child.wait(30)
    return latencies


# -- 4 processes, 25 tasks each, 2 rounds, 1 ms holds ----------------------------------------


async def child_contend(url: str, prefix: str, tasks: str, rounds: str) -> None:
    holds: list[tuple[float, float]] = []
    async with coordinator(url, prefix) as coord:

        async def one() -> None:
            for _ in range(int(rounds)):
                async with Lock("shared", coordinator=coord):
                    began = time.time()
                    await anyio.sleep(0.001)
                    holds.append((began, time.time()))

        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # every process is ready
        async with anyio.create_task_group() as group:
            for _ in range(int(tasks)):
                group.start_soon(one)
    print(json.dumps(holds))


def contend(url: str, procs: int, tasks: int, rounds: int) -> dict[str, Any]:
    prefix = f"c{uuid.uuid4().hex[:8]}-"
    children = [_spawn("_contend", url, prefix, str(tasks), str(rounds)) for _ in range(procs)]
    for child in children:  # connected (a loaded machine may take seconds to start one)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = [child.communicate(timeout=600)[0] for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError(f"a contending process failed: {outputs}")
    holds = sorted(
        (began, ended, number)
        for number, out in enumerate(outputs)
        for began, ended in json.loads(out.strip().splitlines()[-1])
    )
    overlaps = sum(1 for a, b in itertools.pairwise(holds) if b[0] < a[1])
    switches = sum(1 for a, b in itertools.pairwise(holds) if a[2] != b[2])
    held = sum(ended - began for began, ended, _ in holds)
    wall = holds[-1][1] - holds[0][0]
    return {
        "holds": len(holds),
        "wall": wall,
        "sum_of_holds": held,
        "ratio": wall / held,
        "process_switches": switches,
        "overlaps": overlaps,
    }


# -- the run ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (small counts)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    options = parser.parse_args()
    rounds, foreign_rounds = (10, 2) if options.quick else (30, 5)
    names = options.backends.split(",")
    sys.path.insert(0, str(HERE))
    import bench

    results: dict[str, Any] = {"quick": options.quick, "rounds": rounds, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="aiotooz-wakeups-") as tmp:
        with private_servers(Path(tmp), names) as urls:
            for name in names:
                url = urls[name]
                row: dict[str, Any] = {}
                print(f"{name}: hand-off", file=sys.stderr, flush=True)
                impls = ["aiotooz", "aiotooz-semaphore"] + ([PEERS[name]] if name in PEERS else [])
                for impl in impls:
                    ours = impl.startswith("aiotooz")
                    for loop in ("asyncio", "trio") if ours else ("asyncio",):
                        label = impl if loop == "asyncio" else f"{impl} (trio)"
                        values = anyio.run(handoffs, impl, url, rounds, loop)
                        row[f"handoff/{label}"] = {
                            "median": statistics.median(values),
                            "max": max(values),
                        }
                print(f"{name}: foreign waiter", file=sys.stderr, flush=True)
                row["foreign_worst"] = max(anyio.run(bench.foreign_waits, url, foreign_rounds))
                print(f"{name}: 4 processes", file=sys.stderr, flush=True)
                row["contend"] = contend(url, 4, 25, 2)
                if name in ("postgresql", "mysql"):
                    print(f"{name}: sessions", file=sys.stderr, flush=True)
                    row["sessions"] = anyio.run(sessions_per_coordinator, name, url)
                results["backends"][name] = row
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(results, indent=2))
    print(render(results))
    print(f"\nJSON: {options.output}")


def render(results: dict[str, Any]) -> str:
    ms = 1e3
    out = [
        f"Waiting across processes ({results['rounds']} hand-offs per row"
        f"{'; QUICK' if results['quick'] else ''})",
        f"  {'backend':<11}{'implementation':<26}{'median ms':>10}{'max ms':>9}",
    ]
    verdicts = []
    for name, row in results["backends"].items():
        for key, value in row.items():
            if key.startswith("handoff/"):
                impl = key.split("/", 1)[1]
                out.append(
                    f"  {name:<11}{impl:<26}{value['median'] * ms:>10.2f}{value['max'] * ms:>9.2f}"
                )
                if impl.startswith("aiotooz-semaphore"):
                    if impl == "aiotooz-semaphore" and name in SLOT_BACKENDS:
                        verdicts.append(
                            (
                                f"{name} semaphore slot hand-off median <= 5 ms",
                                value["median"] <= SLOT_TARGET,
                                f"{value['median'] * ms:.2f} ms",
                            )
                        )
                elif impl.startswith("aiotooz") and name != "memcached":
                    verdicts.append(
                        (
                            f"{name} hand-off ({impl}) median <= 2 ms, max <= 10 ms",
                            value["median"] <= HANDOFF_TARGET[0]
                            and value["max"] <= HANDOFF_TARGET[1],
                            f"{value['median'] * ms:.2f} / {value['max'] * ms:.2f} ms",
                        )
                    )
    out.append("")
    out.append("A foreign waiter against 20 tasks looping with 1 ms holds: worst wait")
    out.append("4 processes x 25 tasks x 2 rounds x 1 ms on one name: wall / sum of holds")
    out.append(
        f"  {'backend':<11}{'worst wait ms':>14}{'ratio':>8}{'switches':>10}{'overlaps':>10}"
    )
    for name, row in results["backends"].items():
        c = row["contend"]
        out.append(
            f"  {name:<11}{row['foreign_worst'] * ms:>14.1f}{c['ratio']:>8.2f}"
            f"{c['process_switches']:>10}{c['overlaps']:>10}"
        )
        if name != "memcached":
            verdicts.append(
                (
                    f"{name} foreign waiter's worst wait <= 100 ms",
                    row["foreign_worst"] <= FOREIGN_TARGET,
                    f"{row['foreign_worst'] * ms:.1f} ms",
                )
            )
        if name in RATIO_BACKENDS:
            verdicts.append(
                (
                    f"{name} 4x25x2x1 ms <= 1.3x the holds",
                    c["ratio"] <= RATIO_TARGET,
                    f"{c['ratio']:.2f}x",
                )
            )
        verdicts.append(
            (f"{name} exclusion (no overlapping holds)", c["overlaps"] == 0, str(c["overlaps"]))
        )
    sessions = {
        name: row["sessions"] for name, row in results["backends"].items() if "sessions" in row
    }
    if sessions:
        out.append("")
        out.append("One coordinator's server sessions: at rest; 1,000 locks held and 10 waiters")
        for name, counts in sessions.items():
            out.append(f"  {name:<11}{counts['at_rest']:>6}{counts['held_1000_waiting_10']:>8}")
            verdicts.append(
                (
                    f"{name} 1,000 locks held and 10 waiters on <= {SESSIONS_TARGET} sessions",
                    counts["held_1000_waiting_10"] <= SESSIONS_TARGET,
                    str(counts["held_1000_waiting_10"]),
                )
            )
    out.append("")
    out.append("Targets")
    out.extend(f"  [{'MET ' if ok else 'MISS'}] {label}: {value}" for label, ok, value in verdicts)
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        anyio.run(child_serve, *sys.argv[3:], backend=sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_contend":
        anyio.run(child_contend, *sys.argv[2:])
    else:
        main()
