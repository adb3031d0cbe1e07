"""The file backend: ``fcntl`` locks on files in one directory (the embedded default)."""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import struct
import sys
import urllib.parse
import weakref
from typing import Any, ClassVar

from .._names import split_rw_key
from .._process import file_lock_object
from . import _options
from ._base import (
    Capability,
    Driver,
    HolderRecord,
    LeaderRecords,
    ReleaseSignal,
    holder_stamp,
    next_in_file,
    read_leader_file,
    read_record_file,
    read_stamp,
    write_record_file,
)
from ._filerw import FileRWLock
from ._inotify import CloseWatches

__all__ = ["FileDriver"]

#: The attribute of a lock object that keeps the holder record this process wrote.
_RECORD_ATTRIBUTE = "_aiotooz_holder"
#: The extended attribute of a lock file that holds its holder record.
_XATTR = "user.aiotooz.holder"
#: The holder record beside a key's fencing counter: the counter's name and this suffix
#: (never a key: plain keys have no ``~``, mapped keys end in ``~`` and 32 hex digits).
_HOLDER_SUFFIX = "~holder"
#: This host: a file lock's holder is on it (a lock directory on NFS aside).
_HOST = socket.gethostname()

#: struct flock (Linux, 64-bit off_t): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")


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
      (``aiotooz._process.file_lock_object``), shared by every coordinator; creating
      it under one mutex also closes tooz's non-atomic barrier creation race.
    * A child made by ``os.fork()`` forgets the lock objects and tooz's barriers (the
      thread-level lock each lock file has in tooz): the parent's say "held" for locks
      the child does not hold (``fcntl`` locks are not inherited), and the child would
      wait forever for a release only the parent can make.

    Waiters are woken by the kernel (Linux): a release closes the lock file, which
    inotify reports (``_inotify``). A waiter keeps the lock file open between its tries
    while it watches, or its own failed try's close would wake it again at once.

    For fairness, a watching waiter also holds a shared lock on a marker file of its key
    (``<directory>/waiting/<key>``); before a release the holder asks the kernel whether
    another process holds one (``F_GETLK`` never reports the caller's own locks).

    Read-write locks are ``flock`` locks on a file per lock, with a waiting writer's
    mark beside it (``_filerw``).
    """

    capabilities = frozenset(
        {
            Capability.LOCAL_CALLS,
            Capability.FENCES,
            Capability.WATCHES_ON_LOOP,
            Capability.NAMES_LEADER,
            Capability.KEEPS_RECORDS,
            Capability.NAMES_HOLDERS,
            Capability.LISTS_HOLDERS,
            Capability.SHARES_LOCKS,
        }
    )
    accepted_options = _options.FILE
    break_refusal: ClassVar[str] = (
        "a file lock belongs to its process until it releases it or exits; stop that "
        "process (pid {pid} on {host}: kill {pid}), and the kernel frees the lock at once"
    )
    #: The driver's own group and tmp directories, and aiotooz's fencing counters.
    reserved_keys: ClassVar[frozenset[str]] = frozenset({"groups", "tmp", "fencing", "waiting"})

    @classmethod
    def check_url(cls, parts: urllib.parse.SplitResult) -> None:
        if not parts.path:
            raise ValueError("a file:// URL needs a directory path, e.g. 'file:///var/lock/app'")

    @classmethod
    def prepare_url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(path=os.path.realpath(parts.path)))

    def __init__(self, coordinator: Any, call_timeout: float) -> None:
        super().__init__(coordinator, call_timeout)
        self._close_watches: CloseWatches | None = None
        self._watches_failed = False
        #: Lock objects (by id) whose file stays open after a failed try: watched ones.
        self._kept_open: set[int] = set()
        #: Watched lock objects (by id) -> the marker file that says a waiter is here.
        self._markers: dict[int, int] = {}
        self._records = LeaderRecords()
        #: Whether the lock directory's file system keeps user extended attributes.
        self._xattrs = hasattr(os, "setxattr")
        #: Read-write keys watched now (by their waiters), and the lock objects left open
        #: after a failed try of a watched key (closed when the watch ends).
        self._rw_watched: dict[str, int] = {}
        self._rw_open: dict[str, FileRWLock] = {}

    def start(self) -> None:
        super().start()
        self._member = self.tooz._member_id.decode("utf-8", "replace")
        info = os.stat(self.tooz._dir)  # type: ignore[attr-defined]  # made by start()
        self._directory = (info.st_dev, info.st_ino)

    def get_lock(self, key: str) -> Any:
        rw = split_rw_key(key)
        if rw is not None:
            return FileRWLock(self.tooz._dir, rw[0], key, rw[1])  # type: ignore[attr-defined]
        identity = (*self._directory, key)
        return file_lock_object(identity, functools.partial(super().get_lock, key))

    def try_acquire(self, lock: Any, key: str) -> bool:
        """One try, holding the path's barrier throughout (tooz's acquire re-enters it).

        * A try that loses to another process still counts a reference in tooz
          (``ref``), so after the next acquire and release the lock object believes it
          is held and never closes its file: the count is put back.
        * fasteners keeps the lock file open after a failed try; closing it is safe
          because no thread of this process holds the file (see the class docstring).
        """
        if isinstance(lock, FileRWLock):
            keep_open = key in self._rw_watched
            granted = lock.try_acquire(keep_open)
            if keep_open and not granted:
                self._rw_open[key] = lock
            return granted
        barrier = lock._barrier
        with barrier.cond:
            if barrier.owner is not None:
                return False  # held in this process, by another coordinator
            references = lock.ref
            if lock.acquire(blocking=False):
                self._write_holder(lock, holder_stamp(self._member))
                return True
            lock.ref = references
            if id(lock) not in self._kept_open:
                lock._lock._do_close()
            return False

    # -- waking waiters: the kernel tells when a lock file is closed -----------------------

    def watches_on_loop(self, native: bool) -> bool:
        return not self._watches_failed

    async def watch_releases(self, lock: Any) -> ReleaseSignal | None:
        if self._close_watches is None:
            self._close_watches = CloseWatches.open()
            if self._close_watches is None:
                self._watches_failed = True  # not Linux, or past the inotify limits
                return None
        if isinstance(lock, FileRWLock):
            return self._watch_rw(lock, self._close_watches)
        signal = self._close_watches.watch(os.fsencode(lock._lock.path))
        if signal is not None:
            self._kept_open.add(id(lock))
            self._mark_waiting(lock)
        return signal

    def _watch_rw(self, lock: FileRWLock, watches: CloseWatches) -> ReleaseSignal | None:
        signal = watches.watch(os.fsencode(lock.name))
        if signal is not None:
            self._rw_watched[lock.key] = self._rw_watched.get(lock.key, 0) + 1
            lock.mark_waiting()
        return signal

    async def _unwatch_rw(self, lock: FileRWLock, signal: ReleaseSignal) -> None:
        if self._close_watches is not None:
            self._close_watches.unwatch(os.fsencode(lock.name), signal)
        lock.unmark_waiting()
        count = self._rw_watched.get(lock.key, 0) - 1
        if count > 0:
            self._rw_watched[lock.key] = count
            return
        self._rw_watched.pop(lock.key, None)
        tried = self._rw_open.pop(lock.key, None)
        if tried is not None and not tried.acquired:
            tried.close()

    def _mark_waiting(self, lock: Any) -> None:
        """A shared lock on the key's marker file while this coordinator waits for it."""
        if id(lock) in self._markers:
            return
        path = _marker(lock)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return  # a fairness hint only: without it, this waiter is not known
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        self._markers[id(lock)] = fd

    def waiters_elsewhere(self, lock: Any) -> int:
        """1 if another process marks itself waiting for ``lock``'s key, else 0.

        Asking closes a descriptor of the marker file, which drops this process's own
        markers on it: they are hints only.
        """
        if isinstance(lock, FileRWLock):
            return 0  # a writer's local successor takes it; others wait on the mark
        return int(_holder_elsewhere(_marker(lock)) is not None)

    async def unwatch_releases(self, lock: Any, signal: ReleaseSignal) -> None:
        if isinstance(lock, FileRWLock):
            await self._unwatch_rw(lock, signal)
            return
        if self._close_watches is not None:
            self._close_watches.unwatch(os.fsencode(lock._lock.path), signal)
        self._kept_open.discard(id(lock))
        marker = self._markers.pop(id(lock), None)
        if marker is not None:
            os.close(marker)
        barrier = lock._barrier
        with barrier.cond:
            # Closing while this process holds the file would drop its lock.
            if barrier.owner is None and not lock._lock.acquired:
                lock._lock._do_close()

    async def close_async(self) -> None:
        watches, self._close_watches = self._close_watches, None
        if watches is not None:
            await watches.close()
        markers, self._markers = self._markers, {}
        for marker in markers.values():
            os.close(marker)
        kept, self._rw_open = self._rw_open, {}
        for tried in kept.values():
            if not tried.acquired:
                tried.close()

    def fencing_token(self, lock: Any) -> int:
        """A counter file per key in ``<directory>/fencing/``.

        A file lock is never lost while its process lives: the holder is the owner.
        The holder record gets the token too.
        """
        directory, key = os.path.split(lock.name)
        token = next_in_file(os.path.join(directory, "fencing", key))
        barrier = getattr(lock, "_barrier", None)  # a read-write lock keeps no record
        if barrier is None:
            return token
        with barrier.cond:
            record = getattr(lock, _RECORD_ATTRIBUTE, None)
            if record is not None and lock.acquired:
                self._write_holder(lock, record[:-1] + b',"f":%d}' % token)
        return token

    # -- holders: a record on the lock file, written by the holder ---------------------

    def _write_holder(self, lock: Any, record: bytes) -> None:
        """Write the holder record on the lock file we hold (under its barrier).

        An extended attribute set through the descriptor that holds the lock: one
        system call, and no other descriptor opened and closed (which would drop the
        lock). Not in the file's data: it is opened for appending, and emptying a file
        that ext4 then closes forces its data to disk. Where the file system keeps no
        user attributes, a file beside the fencing counter (``fencing/<key>~holder``)
        instead. Kept on the lock object too, for readers in this process.
        """
        setattr(lock, _RECORD_ATTRIBUTE, record)
        if self._xattrs:
            try:
                os.setxattr(lock._lock.lockfile.fileno(), _XATTR, record)
                return
            except OSError:
                self._xattrs = False  # not supported here: the file beside, from now on
        path = self._counter_path(lock) + _HOLDER_SUFFIX
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, record + b"\n", 0)  # never truncated: readers take a line
        finally:
            os.close(fd)

    def _read_written(self, lock: Any) -> bytes:
        """The holder record another process wrote on ``lock``'s file (see above)."""
        try:
            return os.getxattr(lock.name, _XATTR)  # by path: no descriptor to close
        except OSError:
            pass
        try:
            with open(self._counter_path(lock) + _HOLDER_SUFFIX, "rb") as written:
                return written.readline().rstrip(b"\n")
        except OSError:
            return b""

    def read_holder(self, key: str) -> HolderRecord | None:
        """The kernel names the holding process; the lock file, the record it wrote.

        A record whose pid is not the holder's was left by an earlier holder (this one
        has not written its own yet): only the pid is known then.
        """
        lock = self.get_lock(key)
        barrier = lock._barrier
        with barrier.cond:  # no try of this process runs meanwhile (see try_acquire)
            if barrier.owner is not None:
                record = getattr(lock, _RECORD_ATTRIBUTE, None) if lock.acquired else None
                if record is None:
                    return None  # a try is half done
                return read_stamp(key, record)
            pid = _holder_elsewhere(lock.name)
        if pid is None:
            return None
        holder = read_stamp(key, self._read_written(lock), pid=pid)
        if holder.pid != pid:
            return HolderRecord(key, pid=pid, host=_HOST)
        return holder

    def list_holders(self, key_prefix: str) -> list[HolderRecord]:
        """Every lock file of the directory whose name starts with the prefix, if held."""
        holders = []
        for entry in os.scandir(self.tooz._dir):  # type: ignore[attr-defined]
            name = entry.name
            if (
                name.startswith(key_prefix)
                and name not in self.reserved_keys
                and split_rw_key(name) is None  # read-write locks: not listed
                and entry.is_file(follow_symlinks=False)
            ):
                holder = self.read_holder(name)
                if holder is not None:
                    holders.append(holder)
        return holders

    def still_owner(self, lock: Any) -> bool | None:
        return None  # the file driver only echoes its own flag

    @staticmethod
    def _counter_path(lock: Any) -> str:
        directory, key = os.path.split(lock.name)
        return os.path.join(directory, "fencing", key)

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """A record file beside the key's fencing counter: the token and the member id."""
        self._records.publish(self._counter_path(lock), member_id, token, lambda: lock.acquired)

    def release(self, lock: Any) -> bool:
        """Release ``lock`` (tooz), after removing the leader record written for it, if any."""
        if isinstance(lock, FileRWLock):
            self._rw_open.pop(lock.key, None)
            return lock.release()
        return self._records.release(self._counter_path(lock), lambda: bool(lock.release()))

    def read_record(self, lock: Any) -> bytes | None:
        """A file beside the key's fencing counter."""
        return read_record_file(self._counter_path(lock))

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        return write_record_file(self._counter_path(lock), record, token)

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
                # Held here (if not acquired, a try is half done).
                holder = os.getpid() if lock.acquired else None
            else:
                holder = _holder_elsewhere(lock.name)
        return read_leader_file(self._counter_path(lock), holder)


def _forget_barriers_in_child() -> None:
    """A forked child starts with no tooz barriers (see the class docstring)."""
    tooz_file = sys.modules.get("tooz.drivers.file")
    if tooz_file is not None:
        tooz_file.FileDriver._barriers = weakref.WeakValueDictionary()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_barriers_in_child)


def _holder_elsewhere(path: str | bytes) -> int | None:
    """The process id of another process that holds a ``lockf`` lock on ``path``.

    ``F_GETLK`` never reports the caller's own locks. Closing the descriptor it asks
    through drops every lock this process holds on the file (POSIX record locks belong
    to the process): callers ask about files this process holds no lock on that matters.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # never created: nobody ever locked it
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError:
        return None
    finally:
        os.close(fd)
    kind, _, _, _, pid = _FLOCK.unpack(answer)
    return None if kind == fcntl.F_UNLCK else int(pid)


def _marker(lock: Any) -> bytes:
    """The file whose shared locks say who waits for ``lock``'s key."""
    directory, key = os.path.split(os.fsencode(lock._lock.path))
    return os.path.join(directory, b"waiting", key)
