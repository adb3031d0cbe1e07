"""The ipc backend: System V semaphores, one per lock, on this machine."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
import tempfile
from typing import Any, ClassVar

from . import _options
from ._base import (
    Capability,
    HolderRecord,
    LeaderRecords,
    next_in_file,
    read_leader_file,
    read_record_file,
    write_record_file,
)
from ._probes import ProbingDriver

#: Where the ipc backend's fencing counters live: one machine, like its semaphores.
_FENCING_DIR = os.path.join(tempfile.gettempdir(), f"aiotooz-ipc-fencing-{os.getuid()}")

__all__ = ["IpcDriver"]

_SEM_UNDO = 0x1000


class _SemBuf(ctypes.Structure):
    _fields_ = [
        ("sem_num", ctypes.c_ushort),
        ("sem_op", ctypes.c_short),
        ("sem_flg", ctypes.c_short),
    ]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _semtimedop() -> Any:
    """The C library's ``semtimedop`` (sysv_ipc is built without timeouts on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).semtimedop
    except (OSError, AttributeError):
        return None
    call.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_SemBuf),
        ctypes.c_size_t,
        ctypes.POINTER(_TimeSpec),
    ]
    return call


_SEMTIMEDOP = _semtimedop()


class IpcDriver(ProbingDriver):
    """tooz's ipc driver, with a non-blocking try it cannot do itself here.

    Waiters are woken by probes (Linux): tooz releases a lock by *removing* its
    semaphore, which ends a wait on it at once (``EIDRM``). A probe is a thread that
    waits on the semaphore with ``semtimedop`` in slices; if it gets the semaphore (its
    holder died, and the kernel undid its hold), it gives it back at once. No connection.
    """

    extra = "ipc"
    accepted_options = _options.IPC
    capabilities = frozenset(
        {
            Capability.FENCES,
            Capability.NAMES_LEADER,
            Capability.KEEPS_RECORDS,
            Capability.NAMES_HOLDERS,
            *([Capability.ARMS_WATCHES] if _SEMTIMEDOP is not None else []),
        }
    )
    #: A probe costs no connection and its waits are system calls: short slices.
    probe_limit = 16
    probe_slice = 0.25
    break_refusal: ClassVar[str] = (
        "an ipc lock belongs to its process until it releases it or exits; stop that "
        "process (pid {pid} on {host}: kill {pid}), and the kernel frees the lock at once"
    )

    def __init__(self, coordinator: Any, call_timeout: float) -> None:
        super().__init__(coordinator, call_timeout)
        self._records = LeaderRecords()

    def taken(self, lock: Any) -> bool:
        import sysv_ipc

        try:
            return bool(sysv_ipc.Semaphore(lock.key).value == 0)
        except sysv_ipc.ExistentialError:
            return False

    def waiters_elsewhere(self, lock: Any) -> int:
        """Threads blocked taking the semaphore (``GETNCNT``): other coordinators' probes."""
        semaphore = lock._lock
        try:
            return int(semaphore.waiting_for_nonzero) if semaphore is not None else 0
        except Exception:
            return 0

    def _probe_connection(self) -> None:
        return None

    def _close_probe(self, connection: Any) -> None:
        pass

    def _wait_free(self, connection: Any, lock: Any) -> bool:
        import sysv_ipc

        try:
            semid = sysv_ipc.Semaphore(lock.key).id
        except sysv_ipc.ExistentialError:
            return True  # removed: released
        take = _SemBuf(0, -1, _SEM_UNDO)
        whole = int(self.probe_slice)
        slice_ = _TimeSpec(whole, int((self.probe_slice - whole) * 1e9))
        if _SEMTIMEDOP(semid, ctypes.byref(take), 1, ctypes.byref(slice_)) == 0:
            give_back = _SemBuf(0, 1, _SEM_UNDO)  # the two undo adjustments cancel out
            _SEMTIMEDOP(semid, ctypes.byref(give_back), 1, None)
            return True
        code = ctypes.get_errno()
        if code in (errno.EAGAIN, errno.EINTR):
            return False  # the slice ended (or a signal came): wait again
        return True  # EIDRM, EINVAL: removed by its holder's release

    def fencing_token(self, lock: Any) -> int:
        """A counter file per semaphore key.

        A semaphore is never lost while its process lives: the holder is the owner.
        """
        return next_in_file(os.path.join(_FENCING_DIR, str(lock.key)))

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """A record file beside the semaphore's fencing counter."""
        path = os.path.join(_FENCING_DIR, str(lock.key))
        self._records.publish(path, member_id, token, lambda: lock._lock is not None)

    def release(self, lock: Any) -> bool:
        """Release ``lock`` (tooz), after removing the leader record written for it, if any."""
        path = os.path.join(_FENCING_DIR, str(lock.key))
        return self._records.release(path, lambda: bool(lock.release()))

    def read_record(self, lock: Any) -> bytes | None:
        """A file beside the semaphore's fencing counter."""
        return read_record_file(os.path.join(_FENCING_DIR, str(lock.key)))

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        return write_record_file(os.path.join(_FENCING_DIR, str(lock.key)), record, token)

    def read_holder(self, key: str) -> HolderRecord | None:
        """The process that holds the semaphore (the kernel's last changer while taken).

        Its member id is known for a leadership lock only (the leader record).
        """
        import sysv_ipc

        lock = self.get_lock(key)
        try:
            semaphore = sysv_ipc.Semaphore(lock.key)
            holder = int(semaphore.last_pid) if semaphore.value == 0 else None
        except sysv_ipc.ExistentialError:
            return None
        if holder is None:
            return None
        member = read_leader_file(os.path.join(_FENCING_DIR, str(lock.key)), holder)
        return HolderRecord(key, member_id=member, pid=holder, host=socket.gethostname())

    def read_leader(self, key: str) -> str | None:
        """The record, if its token is the counter's and its writer holds the semaphore now.

        The kernel gives a semaphore back when its holder dies (``SEM_UNDO``), so a
        record left by a dead holder is never read: its semaphore is free.
        """
        import sysv_ipc

        lock = self.get_lock(key)
        try:
            semaphore = sysv_ipc.Semaphore(lock.key)
            # While it is taken, the last process to change it is the one that took it
            # (waits and failed tries change nothing). A probe that takes and gives back
            # a free semaphore is last without holding it: it matches no record.
            holder = semaphore.last_pid if semaphore.value == 0 else None
        except sysv_ipc.ExistentialError:
            return None  # released (tooz removes the semaphore) or never taken
        return read_leader_file(os.path.join(_FENCING_DIR, str(lock.key)), holder)

    def try_acquire(self, lock: Any, key: str) -> bool:
        """One non-blocking try, with tooz's own algorithm on the same semaphore key.

        tooz's ipc driver refuses anything but a wait forever when ``sysv_ipc`` lacks
        semaphore timeouts (it does on Linux builds). This uses ``IPC_NOWAIT`` instead of
        a timeout, so plain tooz ipc users and aiotooz exclude each other; tooz's
        ``release()`` then works unchanged.
        """
        import sysv_ipc

        while True:
            try:
                semaphore = sysv_ipc.Semaphore(lock.key, flags=sysv_ipc.IPC_CREX, initial_value=1)
            except sysv_ipc.ExistentialError:
                try:
                    semaphore = sysv_ipc.Semaphore(lock.key)
                except sysv_ipc.ExistentialError:
                    continue  # removed by its holder's release in between: start over
            semaphore.undo = True  # the kernel gives it back if this process dies
            semaphore.block = False  # IPC_NOWAIT: BusyError instead of a wait
            try:
                semaphore.acquire()
            except sysv_ipc.BusyError:
                return False
            except sysv_ipc.ExistentialError:
                continue
            lock._lock = semaphore
            return True
