"""OpenTelemetry: the metrics and spans appear, with the right attributes, once an SDK is in.

The SDK's in-memory reader and exporter are installed as the global providers once for
the test session (OpenTelemetry allows that once per process); aiotooz's instruments,
made at import from the API's proxies, then report to them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
import redis
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import (
    Counter,
    ExemplarFilter,
    Histogram,
    MeterProvider,
    TraceBasedExemplarFilter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.testing import capture_logs

from aiotooz import Lock, LockLost

from .support.helpers import make_coordinator
from .support.servers import PrivateRedis

# Delta temporality: each collection holds what happened since the one before.
_READER = InMemoryMetricReader(
    preferred_temporality={
        Counter: AggregationTemporality.DELTA,
        UpDownCounter: AggregationTemporality.DELTA,
        Histogram: AggregationTemporality.DELTA,
    }
)
_SPANS = InMemorySpanExporter()
_installed = False


class _Broken(Exception):
    """What the broken SDK set-up below raises."""


class _BreakableFilter(ExemplarFilter):
    """The SDK's default exemplar filter, made to raise on every measurement on demand
    (a buggy exemplar filter or view of an application's)."""

    def __init__(self) -> None:
        self.broken = False
        self._default = TraceBasedExemplarFilter()

    def should_sample(self, value: Any, time_unix_nano: int, attributes: Any, context: Any) -> bool:
        if self.broken:
            raise _Broken("exemplar filter")
        return self._default.should_sample(value, time_unix_nano, attributes, context)


class _BreakableSpans(SpanProcessor):
    """A span processor that raises as spans start and end, on demand."""

    def __init__(self) -> None:
        self.broken = False

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        if self.broken:
            raise _Broken("span processor on_start")

    def on_end(self, span: ReadableSpan) -> None:
        if self.broken:
            raise _Broken("span processor on_end")


_FILTER = _BreakableFilter()
_SPAN_HOOK = _BreakableSpans()


@contextmanager
def _broken_sdk() -> Iterator[None]:
    """Every instrument and span of the SDK raises meanwhile."""
    _FILTER.broken = _SPAN_HOOK.broken = True
    try:
        yield
    finally:
        _FILTER.broken = _SPAN_HOOK.broken = False


@pytest.fixture
def telemetry() -> Iterator[tuple[InMemoryMetricReader, InMemorySpanExporter]]:
    global _installed
    if not _installed:
        metrics.set_meter_provider(MeterProvider(metric_readers=[_READER], exemplar_filter=_FILTER))
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(_SPANS))
        tracer_provider.add_span_processor(_SPAN_HOOK)
        trace.set_tracer_provider(tracer_provider)
        _installed = True
    _collect(_READER)  # what happened before this test is not its own
    _SPANS.clear()
    yield _READER, _SPANS


def _collect(reader: InMemoryMetricReader) -> Any:
    """Everything recorded since the last collection."""
    return reader.get_metrics_data()


def _points(data: Any, name: str) -> list[Any]:
    found: list[Any] = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def _where(points: list[Any], **attributes: Any) -> list[Any]:
    return [p for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]


async def test_waits_holds_and_outcomes(
    telemetry: tuple[InMemoryMetricReader, InMemorySpanExporter], backend_url: str, prefix: str
) -> None:
    reader, spans = telemetry
    scheme = backend_url.partition("://")[0]
    async with make_coordinator(backend_url, prefix) as coordinator:
        for _ in range(3):
            async with Lock("measured", coordinator=coordinator):
                pass
        assert spans.get_finished_spans() == (), "uncontended acquires make no span"
        held = Lock("measured", coordinator=coordinator)
        await held.acquire()

        async def waiter() -> None:
            async with Lock("measured", coordinator=coordinator):
                pass

        async with anyio.create_task_group() as group:
            group.start_soon(waiter)
            await anyio.sleep(0.05)
            await held.release()
        other = make_coordinator(backend_url, prefix)
        async with other, Lock("measured", coordinator=coordinator):
            assert await Lock("measured", coordinator=other).acquire(blocking=0.05) is False

    attributes = {"aiotooz.backend": scheme}
    data = _collect(reader)
    waits = _points(data, "aiotooz.lock.wait.duration")
    acquired = _where(waits, **attributes, **{"aiotooz.outcome": "acquired"})
    assert sum(p.count for p in acquired) == 6
    timeouts = _where(waits, **attributes, **{"aiotooz.outcome": "timeout"})
    assert sum(p.count for p in timeouts) == 1
    assert min(p.min for p in timeouts) >= 0.04
    holds = _where(_points(data, "aiotooz.lock.hold.duration"), **attributes)
    assert sum(p.count for p in holds) == 6
    assert all("aiotooz.lock" not in p.attributes for p in waits + holds), "names are opt-in"
    assert sum(p.value for p in _points(data, "aiotooz.locks.held")) == 0
    assert sum(p.value for p in _points(data, "aiotooz.lock.waiters")) == 0
    waited = [
        dict(s.attributes or {})
        for s in spans.get_finished_spans()
        if s.name == "aiotooz.lock.acquire"
    ]
    outcomes = sorted(str(a["aiotooz.outcome"]) for a in waited)
    assert outcomes == ["acquired", "timeout"], outcomes
    assert all(a["aiotooz.backend"] == scheme for a in waited)
    assert all(float(str(a["aiotooz.wait.duration"])) > 0 for a in waited)


async def test_lock_names_on_metrics_when_asked(
    telemetry: tuple[InMemoryMetricReader, InMemorySpanExporter], file_url: str, prefix: str
) -> None:
    reader, _ = telemetry
    async with make_coordinator(file_url, prefix, metrics_lock_names=True) as coordinator:
        async with Lock("named", coordinator=coordinator):
            pass
    holds = _points(_collect(reader), "aiotooz.lock.hold.duration")
    assert _where(holds, **{"aiotooz.lock": "named"})


async def test_a_loss_is_counted_and_marked_on_the_holders_span(
    telemetry: tuple[InMemoryMetricReader, InMemorySpanExporter], redis_url: str, prefix: str
) -> None:
    reader, spans = telemetry
    client = redis.Redis.from_url(redis_url)
    try:
        async with make_coordinator(redis_url, prefix, heartbeat=0.1) as coordinator:
            with trace.get_tracer("test").start_as_current_span("work"):
                with pytest.raises(LockLost):
                    async with coordinator.get_lock("taken"):
                        client.set(f"_tooz_{prefix}taken_lock".encode(), b"else", px=30_000)
                        await anyio.sleep(10)
    finally:
        client.delete(f"_tooz_{prefix}taken_lock".encode())
        client.close()
    lost = _where(
        _points(_collect(reader), "aiotooz.lock.lost"),
        **{"aiotooz.backend": "redis", "aiotooz.reason": "taken_over"},
    )
    assert sum(p.value for p in lost) == 1
    [work] = [s for s in spans.get_finished_spans() if s.name == "work"]
    assert [e.name for e in work.events] == ["aiotooz.lock.lost"]


async def test_reconnects_and_the_connected_gauge(
    telemetry: tuple[InMemoryMetricReader, InMemorySpanExporter],
    private_redis: PrivateRedis,
    prefix: str,
) -> None:
    reader, _ = telemetry
    async with make_coordinator(
        private_redis.url,
        prefix,
        heartbeat=0.1,
        initial_reconnect_backoff=0.05,
        max_reconnect_backoff=0.2,
    ) as coordinator:
        gauge = _where(
            _points(_collect(reader), "aiotooz.coordinator.connected"),
            **{"aiotooz.backend": "redis"},
        )
        assert 1 in [p.value for p in gauge]
        private_redis.kill()
        with anyio.fail_after(30):
            while coordinator.is_connected:
                await anyio.sleep(0.05)
        gauge = _where(
            _points(_collect(reader), "aiotooz.coordinator.connected"),
            **{"aiotooz.backend": "redis"},
        )
        assert 0 in [p.value for p in gauge]
        private_redis.start()
        with anyio.fail_after(30):
            await coordinator.wait_connected()
    reconnects = _where(
        _points(_collect(reader), "aiotooz.coordinator.reconnects"), **{"aiotooz.backend": "redis"}
    )
    assert sum(p.value for p in reconnects) >= 1


async def test_a_raising_sdk_never_changes_locking(
    telemetry: tuple[InMemoryMetricReader, InMemorySpanExporter], redis_url: str, prefix: str
) -> None:
    """A raising exemplar filter left the lock held at the backend and in the table
    (the caller got the error); a raising one in the heartbeat left the holder untold of
    its loss. Telemetry errors are never raised, and logged once as they begin."""
    client = redis.Redis.from_url(redis_url)
    key = f"_tooz_{prefix}taken_lock".encode()
    try:
        async with (
            make_coordinator(redis_url, prefix, heartbeat=0.1) as coordinator,
            make_coordinator(redis_url, prefix) as other,
        ):
            async with coordinator.get_lock("cycled"):
                pass  # the instruments work (a failure is logged as one begins)
            with capture_logs() as logs, _broken_sdk():
                for _ in range(3):
                    async with coordinator.get_lock("cycled"):
                        assert coordinator.statistics().held_names == ("cycled",)
                assert coordinator.statistics().locks_held == 0
                elsewhere = Lock("cycled", coordinator=other)
                assert await elsewhere.acquire(blocking=False)
                # A wait (a span, the waiters count) that times out.
                assert not await coordinator.get_lock("cycled").acquire(blocking=0.05)
                await elsewhere.release()
                assert other.statistics().locks_held == 0
                with pytest.raises(LockLost):
                    async with coordinator.get_lock("taken"):
                        client.set(key, b"else", px=30_000)
                        await anyio.sleep(10)
                assert coordinator.statistics().locks_lost == 1
                assert coordinator.statistics().locks_held == 0
    finally:
        client.delete(key)
        client.close()
    failures = [entry for entry in logs if entry["event"] == "telemetry failed"]
    assert failures, [entry["event"] for entry in logs]
    instruments = [entry["instrument"] for entry in failures]
    assert len(instruments) == len(set(instruments)), "logged once per instrument"
    assert "aiotooz.locks.held" in instruments


async def test_a_raising_sdk_never_stops_a_reconnect(
    telemetry: tuple[InMemoryMetricReader, InMemorySpanExporter],
    private_redis: PrivateRedis,
    prefix: str,
) -> None:
    """The reconnects counter raised after the new connection was in place and before
    the state change was announced: wait_connected() never returned."""
    async with make_coordinator(
        private_redis.url,
        prefix,
        heartbeat=0.1,
        initial_reconnect_backoff=0.05,
        max_reconnect_backoff=0.2,
    ) as coordinator:
        with _broken_sdk():
            private_redis.kill()
            with anyio.fail_after(30):
                while coordinator.is_connected:
                    await anyio.sleep(0.05)
            private_redis.start()
            with anyio.fail_after(30):
                await coordinator.wait_connected()
            assert coordinator.statistics().reconnects == 1
            async with coordinator.get_lock("after"):
                pass
