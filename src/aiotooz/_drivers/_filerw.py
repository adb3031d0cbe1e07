"""Read-write locks on the file backend: ``flock`` shared or exclusive, and a writer mark.

Each reader and each writer opens the family's lock file (``<directory>/<family>``) on
a descriptor of its own and takes ``flock`` on it: ``LOCK_SH`` for a reader,
``LOCK_EX`` for a writer. ``flock`` locks belong to the open file description, not to
the process (as ``fcntl``'s record locks do), so readers and writers of one process
exclude each other as those of two processes do, and one reader's close never drops
another's lock. A release closes the descriptor, which inotify reports to waiters.

Writer preference: a writer that waits holds ``LOCK_SH`` on the family's marker file
(``<directory>/waiting/<family>``); a reader first takes ``LOCK_EX | LOCK_NB`` on the
marker for an instant (and lets go): refused, a writer waits, and the reader does not
take the lock. Two readers checking in the same microsecond may refuse each other: a
reader so refused tries again after its poll, a few milliseconds later.
"""

from __future__ import annotations

import fcntl
import os
from typing import Final, final

__all__ = ["FileRWLock", "writer_waits"]

#: How often a writer tries to mark itself waiting while readers hold the marker for
#: their instant: each holds it for a few microseconds.
_MARK_TRIES: Final = 100


def _flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # the marker directory, on first use
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def writer_waits(marker: str) -> bool:
    """Whether a writer marks itself waiting on ``marker`` (see the module docstring)."""
    try:
        fd = os.open(marker, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no writer ever waited
    try:
        if not _flock(fd, fcntl.LOCK_EX):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@final
class FileRWLock:
    """One reader's or writer's lock on a read-write lock's file (one key of its family).

    Args:
        directory: the backend's directory.
        family: the family key (``aiotooz._names.split_rw_key``).
        key: the reader's or writer's own key.
        write: a writer (exclusive) or a reader (shared).
    """

    __slots__ = ("acquired", "fd", "key", "mark", "marker", "name", "write")

    def __init__(self, directory: str, family: str, key: str, write: bool) -> None:
        #: The lock file (its fencing counter is ``<directory>/fencing/<family>``).
        self.name: str = os.path.join(directory, family)
        self.marker: str = os.path.join(directory, "waiting", family)
        self.key = key
        self.write = write
        self.acquired = False
        #: The lock file, open while held (or kept open between tries while watched).
        self.fd: int | None = None
        #: A writer's waiting mark (held while it watches), or ``None``.
        self.mark: int | None = None

    def try_acquire(self, keep_open: bool) -> bool:
        """One try that never waits; ``keep_open``: leave the file open if refused.

        A waiter that watches the file for closes must not close it after each failed
        try: its own close would wake it again at once.
        """
        if self.fd is None:
            self.fd = _open(self.name)
        if self.write:
            granted = _flock(self.fd, fcntl.LOCK_EX)
        else:
            granted = not writer_waits(self.marker) and _flock(self.fd, fcntl.LOCK_SH)
        self.acquired = granted
        if not granted and not keep_open:
            self.close()
        return granted

    def release(self) -> bool:
        """Let go (the close tells waiters); ``False`` if it was not held."""
        held, self.acquired = self.acquired, False
        self.close()  # drops the flock: the description's only descriptor
        return held

    def close(self) -> None:
        """Close the lock file (which lets go if held)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def mark_waiting(self) -> None:
        """A writer starts to wait: readers that come from now on stay out.

        A hint that may be missing (the marker cannot be made, or readers kept it busy):
        the writer then waits as a reader would, without priority.
        """
        if not self.write or self.mark is not None:
            return
        try:
            fd = _open(self.marker)
        except OSError:
            return
        for _ in range(_MARK_TRIES):
            if _flock(fd, fcntl.LOCK_SH):
                self.mark = fd
                return
        os.close(fd)

    def unmark_waiting(self) -> None:
        """The writer stops waiting (granted, or gave up)."""
        mark, self.mark = self.mark, None
        if mark is not None:
            os.close(mark)
