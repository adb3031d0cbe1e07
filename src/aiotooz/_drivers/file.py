"""The file backend: ``fcntl`` locks on files in one directory (the embedded default)."""

from __future__ import annotations

import fcntl
import os
import struct
import urllib.parse
from typing import Any, ClassVar

from .._process import FILE_LOCKS, FILE_LOCKS_GUARD
from ._base import Capability, Driver, next_in_file, read_leader_file, write_leader_file

__all__ = ["FileDriver"]


class FileDriver(Driver):
    """tooz's file driver, with one lock object per lock file and its flaws mended.

    * The directory is resolved (symlinks, ``.``, ``..``) before tooz sees it: tooz
      refuses every lock of a directory spelled with ``.`` or ``..`` ("outside of
      parent directory").
    * The driver locks with ``fcntl.lockf``, and POSIX drops *all* of a process's locks
      on a file when *any* of its descriptors for that file is closed. Two tooz lock
      objects for one file (two coordinators on one directory, perhaps under two
      spellings: ``/var/lock`` and ``/run/lock``) would each open it, and closing the
      idle one would silently free the other's lock. So the process keeps one lock
      object per file, keyed by the directory's device and inode and the file's name
      (``aiotooz._process.FILE_LOCKS``), shared by every coordinator; creating it under
      one mutex also closes tooz's non-atomic barrier creation race.
    """

    capabilities = frozenset({Capability.LOCAL_CALLS, Capability.FENCES, Capability.NAMES_LEADER})
    #: The driver's own group and tmp directories, and aiotooz's fencing counters.
    reserved_keys: ClassVar[frozenset[str]] = frozenset({"groups", "tmp", "fencing"})

    @classmethod
    def check_url(cls, parts: urllib.parse.SplitResult) -> None:
        if not parts.path:
            raise ValueError("a file:// URL needs a directory path, e.g. 'file:///var/lock/app'")

    @classmethod
    def prepare_url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(path=os.path.realpath(parts.path)))

    def start(self) -> None:
        super().start()
        info = os.stat(self.tooz._dir)  # type: ignore[attr-defined]  # made by start()
        self._directory = (info.st_dev, info.st_ino)

    def get_lock(self, key: str) -> Any:
        identity = (*self._directory, key)
        with FILE_LOCKS_GUARD:
            lock = FILE_LOCKS.get(identity)
            if lock is None:
                # A new lock object has not opened its file yet: nothing to close.
                lock = FILE_LOCKS[identity] = super().get_lock(key)
            return lock

    def try_acquire(self, lock: Any, key: str) -> bool:
        """One try, holding the path's barrier throughout (tooz's acquire re-enters it).

        * A try that loses to another process still counts a reference in tooz
          (``ref``), so after the next acquire and release the lock object believes it
          is held and never closes its file: the count is put back.
        * fasteners keeps the lock file open after a failed try; closing it is safe
          because no thread of this process holds the file (see the class docstring).
        """
        barrier = lock._barrier
        with barrier.cond:
            if barrier.owner is not None:
                return False  # held in this process, by another coordinator
            references = lock.ref
            if lock.acquire(blocking=False):
                return True
            lock.ref = references
            lock._lock._do_close()
            return False

    def fencing_token(self, lock: Any) -> int:
        """A counter file per key in ``<directory>/fencing/``.

        A file lock is never lost while its process lives: the holder is the owner.
        """
        directory, key = os.path.split(lock.name)
        return next_in_file(os.path.join(directory, "fencing", key))

    def still_owner(self, lock: Any) -> bool | None:
        return None  # the file driver only echoes its own flag

    @staticmethod
    def _counter_path(lock: Any) -> str:
        directory, key = os.path.split(lock.name)
        return os.path.join(directory, "fencing", key)

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """A record file beside the key's fencing counter: the token and the member id."""
        write_leader_file(self._counter_path(lock), member_id, token)

    def read_leader(self, key: str) -> str | None:
        """The record, if its token is the counter's and the lock file is locked now.

        A holder that died leaves its record, but the kernel dropped its lock: the
        lock file is asked (``F_GETLK``), never locked, so a reader takes nothing from
        a contender.
        """
        lock = self.get_lock(key)
        barrier = lock._barrier
        with barrier.cond:  # no try of this process runs meanwhile (see try_acquire)
            if barrier.owner is not None:
                held = bool(lock.acquired)  # held here (if not, a try is half done)
            else:
                held = _locked_by_another_process(lock.name)
        return read_leader_file(self._counter_path(lock)) if held else None


#: ``struct flock`` on Linux: l_type, l_whence, l_start, l_len, l_pid (and padding).
_FLOCK = "hhqqi4x"


def _locked_by_another_process(path: str) -> bool:
    """Whether another process holds a ``lockf`` lock on the file at ``path``.

    Called only while this process holds no lock on the file (closing our descriptor
    would drop it: POSIX record locks belong to the process, not the descriptor).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    finally:
        os.close(fd)
    return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)
