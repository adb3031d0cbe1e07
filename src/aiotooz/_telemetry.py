"""OpenTelemetry metrics and spans, through ``opentelemetry-api`` only (``aiotooz[otel]``).

A library instruments; the application decides. Without ``opentelemetry-api`` installed
every instrument here is a no-op of aiotooz's own; with it, the instruments come from the
global meter and tracer providers, which do nothing until the application installs the
SDK and an exporter (Prometheus, OTLP), as with httpx's or redis-py's instrumentation.

Metrics (attribute ``aiotooz.backend``, the URL scheme, on all of them; ``aiotooz.lock``,
the lock name, only with the ``metrics_lock_names`` setting, since names can be unbounded):

* ``aiotooz.lock.wait.duration`` (histogram, s): how long an acquire took, with
  ``aiotooz.outcome`` = ``acquired`` | ``timeout`` | ``cancelled`` | ``error``;
* ``aiotooz.lock.hold.duration`` (histogram, s): from grant to release;
* ``aiotooz.lock.lost`` (counter), with ``aiotooz.reason`` = ``expired`` |
  ``taken_over`` | ``connection`` | ``stopped`` | ``stalled``;
* ``aiotooz.locks.held`` and ``aiotooz.lock.waiters`` (up-down counters): held now, and
  tasks that had to wait and wait now;
* ``aiotooz.coordinator.reconnects`` (counter) and ``aiotooz.coordinator.connected``
  (observable gauge, 0 or 1 per started coordinator);
* ``aiotooz.lock.wakeups`` (counter): waiters woken by the backend (wake-ups), and
  ``aiotooz.lock.fencing_tokens`` (counter): tokens handed out (fencing).

Spans: ``aiotooz.lock.acquire`` for each acquire that had to wait (uncontended ones make
none), with the wait, the outcome and the backend; a lock loss is an event
``aiotooz.lock.lost`` on the span current in the holder's task when it learns of it.

Telemetry never changes locking: an instrument or span that raises (a buggy view,
exemplar filter or span processor of the application's SDK set-up) is logged as
``telemetry failed`` when it begins to fail, not at every call, and otherwise ignored.
The calls sit in the middle of acquiring, releasing and declaring a loss, where an
exception would leave a lock held or a holder untold.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from ._logging import get_logger

__all__ = [
    "LOSS_REASONS",
    "Instruments",
    "instruments",
    "lost_event",
    "record_waited_acquire",
    "register_coordinator",
    "unregister_coordinator",
]

#: The reasons a lock can be lost, as ``aiotooz.reason`` shows them.
LOSS_REASONS: Final = frozenset(
    {"expired", "taken_over", "connection", "stopped", "stalled", "broken"}
)


class _NoOp:
    """An instrument, span or tracer that does nothing (``opentelemetry-api`` missing)."""

    def add(self, amount: float, attributes: Any = None) -> None:
        pass

    def record(self, amount: float, attributes: Any = None) -> None:
        pass

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def add_event(self, name: str, attributes: Any = None) -> None:
        pass


_NOOP: Final = _NoOp()

_log = get_logger()
#: The instruments failing now: each failure is logged once, when its instrument begins
#: to fail (again, if it worked in between), not at every call.
_failing: set[str] = set()


def _failed(instrument: str, exc: Exception) -> None:
    if instrument in _failing:
        return
    _failing.add(instrument)
    _log.warning(
        "telemetry failed",
        instrument=instrument,
        error=f"{type(exc).__name__}: {exc}",
        effect="ignored, locking goes on; not logged again until the instrument works",
    )


def _worked(instrument: str) -> None:
    if _failing:  # nearly always empty: the usual cost is this test
        _failing.discard(instrument)


class _Guarded:
    """An SDK instrument whose failures are logged (see ``_failed``) instead of raised."""

    __slots__ = ("_instrument", "_name")

    def __init__(self, instrument: Any, name: str) -> None:
        self._instrument = instrument
        self._name = name

    def add(self, amount: float, attributes: Any = None) -> None:
        try:
            self._instrument.add(amount, attributes)
        except Exception as exc:
            _failed(self._name, exc)
        else:
            _worked(self._name)

    def record(self, amount: float, attributes: Any = None) -> None:
        try:
            self._instrument.record(amount, attributes)
        except Exception as exc:
            _failed(self._name, exc)
        else:
            _worked(self._name)


try:
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace

    _INSTALLED = True
except ImportError:  # the extra is not installed: instruments cost a no-op call
    _INSTALLED = False


#: Started coordinators, for the ``connected`` gauge: name -> (backend, is_connected).
_coordinators: weakref.WeakSet[Any] = weakref.WeakSet()


if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's started
    os.register_at_fork(after_in_child=_coordinators.clear)


def register_coordinator(coordinator: Any) -> None:
    """Report ``coordinator`` in ``aiotooz.coordinator.connected`` while it lives."""
    _coordinators.add(coordinator)


def unregister_coordinator(coordinator: Any) -> None:
    _coordinators.discard(coordinator)


def _observe_connected(_options: Any) -> Iterable[Any]:
    observation = _metrics.Observation
    for coordinator in list(_coordinators):
        yield observation(
            1 if coordinator.is_connected else 0,
            {"aiotooz.backend": coordinator.settings.scheme},
        )


class Instruments:
    """The instruments, made once per process from the global providers."""

    def __init__(self) -> None:
        if not _INSTALLED:
            self.wait_duration: Any = _NOOP
            self.hold_duration: Any = _NOOP
            self.lost: Any = _NOOP
            self.held: Any = _NOOP
            self.waiters: Any = _NOOP
            self.reconnects: Any = _NOOP
            self.wakeups: Any = _NOOP
            self.fencing_tokens: Any = _NOOP
            self.breaks: Any = _NOOP
            self.tracer: Any = None
            return
        meter = _metrics.get_meter("aiotooz")

        def guarded(create: Any, name: str, unit: str, description: str) -> _Guarded:
            return _Guarded(create(name, unit=unit, description=description), name)

        self.wait_duration = guarded(
            meter.create_histogram,
            "aiotooz.lock.wait.duration",
            "s",
            "How long an acquire took",
        )
        self.hold_duration = guarded(
            meter.create_histogram, "aiotooz.lock.hold.duration", "s", "How long a lock was held"
        )
        self.lost = guarded(
            meter.create_counter, "aiotooz.lock.lost", "{lock}", "Locks lost while held"
        )
        self.held = guarded(
            meter.create_up_down_counter, "aiotooz.locks.held", "{lock}", "Locks held now"
        )
        self.waiters = guarded(
            meter.create_up_down_counter,
            "aiotooz.lock.waiters",
            "{task}",
            "Tasks waiting for a lock now",
        )
        self.reconnects = guarded(
            meter.create_counter,
            "aiotooz.coordinator.reconnects",
            "{reconnect}",
            "Reconnects to the backend",
        )
        meter.create_observable_gauge(
            "aiotooz.coordinator.connected",
            callbacks=[_observe_connected],
            unit="1",
            description="1 while a started coordinator is connected to its backend, else 0",
        )
        self.wakeups = guarded(
            meter.create_counter,
            "aiotooz.lock.wakeups",
            "{wakeup}",
            "Waiters woken by the backend when a lock was released",
        )
        self.fencing_tokens = guarded(
            meter.create_counter,
            "aiotooz.lock.fencing_tokens",
            "{token}",
            "Fencing tokens handed out",
        )
        self.breaks = guarded(
            meter.create_counter,
            "aiotooz.lock.breaks",
            "{lock}",
            "Locks broken: freed by break_lock() while another process held them",
        )
        self.tracer = _trace.get_tracer("aiotooz")

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """No instrument records anything meanwhile (the benchmark's baseline)."""
        saved = dict(vars(self))
        for name in saved:
            setattr(self, name, None if name == "tracer" else _NOOP)
        try:
            yield
        finally:
            vars(self).update(saved)


#: The process's instruments (see :class:`Instruments`).
instruments = Instruments()


def record_waited_acquire(
    attributes: Mapping[str, Any], started_ns: int, ended_ns: int, outcome: str
) -> None:
    """The span of an acquire that had to wait, from its start to its outcome."""
    tracer = instruments.tracer
    if tracer is None:
        return
    try:
        span = tracer.start_span("aiotooz.lock.acquire", start_time=started_ns)
        for key, value in attributes.items():
            span.set_attribute(key, value)
        span.set_attribute("aiotooz.outcome", outcome)
        span.set_attribute("aiotooz.wait.duration", (ended_ns - started_ns) / 1e9)
        span.end(end_time=ended_ns)
    except Exception as exc:
        _failed("aiotooz.lock.acquire (span)", exc)
    else:
        _worked("aiotooz.lock.acquire (span)")


def lost_event(lock_name: str, reason: str) -> None:
    """Record a lock loss on the span current in the holder's task."""
    if not _INSTALLED:
        return
    try:
        _trace.get_current_span().add_event(
            "aiotooz.lock.lost", {"aiotooz.lock": lock_name, "aiotooz.reason": reason}
        )
    except Exception as exc:
        _failed("aiotooz.lock.lost (span event)", exc)
    else:
        _worked("aiotooz.lock.lost (span event)")
