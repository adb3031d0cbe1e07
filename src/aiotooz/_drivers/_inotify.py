"""Release signals from the kernel for lock files: inotify (Linux), through ctypes.

tooz's file lock (fasteners) releases by unlocking the file and then *closing* the
descriptor it opened for writing, so the kernel reports ``IN_CLOSE_WRITE`` on the lock
file right after every release, also a plain tooz process's. A failed try of a process
that closes its descriptor afterwards reports one too: a wake-up is a hint, the waiter
tries again. One inotify instance per coordinator, read by one task on the event loop
(``anyio.wait_readable`` serves asyncio and trio); a watch per lock file waited for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys
from typing import Any, final

import anyio

from .._tasks import BackgroundTask, spawn
from ._base import ReleaseSignal

__all__ = ["CloseWatches"]

_IN_CLOSE_WRITE = 0x00000008
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
#: struct inotify_event: wd, mask, cookie, len (then len bytes of name).
_EVENT = struct.Struct("iIII")


def _libc() -> Any:
    """The C library's inotify calls, or ``None`` where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


@final
class CloseWatches:
    """One inotify instance: a release signal per waiter, fired when its file is closed.

    Use :meth:`open`; :meth:`close` on the event loop when done.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._watches: dict[bytes, int] = {}  # path -> watch descriptor
        self._signals: dict[int, set[ReleaseSignal]] = {}
        self._reader: BackgroundTask | None = None

    @classmethod
    def open(cls) -> CloseWatches | None:
        """A new instance; ``None`` off Linux or past the user's inotify limits."""
        if _LIBC is None:
            return None
        fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        return None if fd < 0 else cls(fd)

    def watch(self, path: bytes) -> ReleaseSignal | None:
        """A signal fired when ``path`` is closed after writing, from now on.

        Must be called on the event loop. ``None`` if the kernel refuses the watch (no
        such file, or past ``max_user_watches``): the waiter polls.
        """
        wd = self._watches.get(path)
        if wd is None:
            wd = _LIBC.inotify_add_watch(self._fd, path, _IN_CLOSE_WRITE)
            if wd < 0:
                return None
            self._watches[path] = wd
        signal = ReleaseSignal()
        self._signals.setdefault(wd, set()).add(signal)
        if self._reader is None:
            self._reader = spawn(self._read, name="aiotooz file release signals")
        return signal

    def unwatch(self, path: bytes, signal: ReleaseSignal) -> None:
        wd = self._watches.get(path)
        signals = self._signals.get(wd, set()) if wd is not None else set()
        signals.discard(signal)
        if wd is not None and not signals:
            del self._watches[path]
            self._signals.pop(wd, None)
            _LIBC.inotify_rm_watch(self._fd, wd)

    async def _read(self) -> None:
        while True:
            await anyio.wait_readable(self._fd)
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # cannot happen on a live instance; never leave waiters hanging
                self._fire_all()
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    self._fire_all()  # events were lost: everyone tries again
                    continue
                for signal in self._signals.get(wd, ()):
                    signal.fire()
                if mask & _IN_IGNORED:  # the kernel dropped the watch (file deleted)
                    self._signals.pop(wd, None)
                    for path in [path for path, known in self._watches.items() if known == wd]:
                        del self._watches[path]

    def _fire_all(self) -> None:
        for signals in self._signals.values():
            for signal in signals:
                signal.fire()

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await reader.wait()
        self._fire_all()
        self._signals.clear()
        self._watches.clear()
        with contextlib.suppress(OSError):
            os.close(self._fd)
