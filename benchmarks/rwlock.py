"""Read-write locks across processes: reader throughput and writer waits under a reader stream.

Run by ``nox -s bench`` (or ``python benchmarks/rwlock.py [--quick]``, with the project's
``tests`` directory importable: the private servers are ``tests/support/servers.py``'s and the
processes ``tests/support/worker.py rwlock``). Per backend with read-write locks, three
processes each run three reader tasks in a dense stream (10-40 ms holds, 0-5 ms apart)
and one fenced writer (a write every 50-150 ms, 10 ms holds) for 8 s (3 s with
``--quick``), logging every entry and exit to one file (``tests/support/rwmix.py``). From the
log: reads per second, the most readers at once, the writers' waits (median, p99,
max), and the checks of the issue (no writer beside anyone, tokens growing). It prints
a table and writes ``benchmarks/results/rwlock.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = ["file", "redis", "postgresql", "zookeeper", "etcd3+http"]
PROCESSES = 3
#: The issue's bound on a writer's wait behind the reader stream.
WAIT_TARGET = 2.0


@contextlib.contextmanager
def private_servers(workdir: Path, names: list[str]) -> Iterator[dict[str, str]]:
    """A URL per backend: private servers where one is needed."""
    from tests.support.servers import SERVERS

    urls = {"file": (workdir / "locks").as_uri()}
    started = []
    try:
        for name in names:
            if name in urls:
                continue
            server = SERVERS["etcd" if name == "etcd3+http" else name](workdir / name)
            started.append(server)
            server.start()
            urls[name] = server.url
        yield urls
    finally:
        for server in started:
            server.close()


def run(url: str, seconds: float, workdir: Path) -> dict[str, object]:
    from tests.support.rwmix import check_log

    log = workdir / f"log-{uuid.uuid4().hex[:6]}"
    log.write_text("")
    prefix = f"b{uuid.uuid4().hex[:6]}-"
    command = [sys.executable, str(HERE.parent / "tests" / "support" / "worker.py"), "rwlock"]
    args = [url, prefix, "config", str(seconds), str(log)]
    started = time.monotonic()
    processes = [subprocess.Popen([*command, *args]) for _ in range(PROCESSES)]
    for process in processes:
        assert process.wait(timeout=seconds + 120) == 0
    elapsed = time.monotonic() - started
    report = check_log(log.read_text())
    waits = sorted(report.waits)
    return {
        "seconds": seconds,
        "reads": report.reads,
        "reads_per_s": round(report.reads / seconds, 1),
        "writes": report.writes,
        "peak_readers": report.peak_readers,
        "writer_wait_median_ms": round(statistics.median(waits) * 1000, 1),
        "writer_wait_p99_ms": round(waits[int(len(waits) * 0.99)] * 1000, 1),
        "writer_wait_max_ms": round(waits[-1] * 1000, 1),
        "overlaps": len(report.overlaps),
        "tokens_out_of_order": report.tokens_out_of_order,
        "wall_s": round(elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per backend instead of 8")
    parser.add_argument("--backends", nargs="*", default=BACKENDS)
    options = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    seconds = 3.0 if options.quick else 8.0
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        with private_servers(workdir, options.backends) as urls:
            for backend in options.backends:
                results[backend] = run(urls[backend], seconds, workdir)
    header = (
        f"{'backend':<11} {'reads/s':>8} {'peak':>5} {'writes':>7} {'wait p50':>9} "
        f"{'p99':>7} {'max':>7} {'overlaps':>9}"
    )
    print(f"\nRWLock, {PROCESSES} processes x (3 readers + 1 writer), {seconds:g} s")
    print(header)
    for backend, row in results.items():
        print(
            f"{backend:<11} {row['reads_per_s']:>8} {row['peak_readers']:>5} {row['writes']:>7} "
            f"{row['writer_wait_median_ms']:>7}ms {row['writer_wait_p99_ms']:>5}ms "
            f"{row['writer_wait_max_ms']:>5}ms {row['overlaps']:>9}"
        )
    failed = [
        backend
        for backend, row in results.items()
        if row["overlaps"]
        or row["tokens_out_of_order"]
        or float(row["writer_wait_max_ms"]) >= WAIT_TARGET * 1000  # type: ignore[arg-type]
    ]
    out = HERE / "results" / "rwlock.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    print(f"written to {out}")
    if failed:
        raise SystemExit(f"read-write lock checks failed on: {', '.join(failed)}")


if __name__ == "__main__":
    main()
