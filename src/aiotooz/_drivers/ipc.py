"""The ipc backend: System V semaphores, one per lock, on this machine."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ._base import Capability, Driver, next_in_file, read_leader_file, write_leader_file

#: Where the ipc backend's fencing counters live: one machine, like its semaphores.
_FENCING_DIR = os.path.join(tempfile.gettempdir(), f"aiotooz-ipc-fencing-{os.getuid()}")

__all__ = ["IpcDriver"]


class IpcDriver(Driver):
    """tooz's ipc driver, with a non-blocking try it cannot do itself here."""

    extra = "ipc"
    capabilities = frozenset({Capability.FENCES, Capability.NAMES_LEADER})

    def fencing_token(self, lock: Any) -> int:
        """A counter file per semaphore key.

        A semaphore is never lost while its process lives: the holder is the owner.
        """
        return next_in_file(os.path.join(_FENCING_DIR, str(lock.key)))

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """A record file beside the semaphore's fencing counter."""
        write_leader_file(os.path.join(_FENCING_DIR, str(lock.key)), member_id, token)

    def read_leader(self, key: str) -> str | None:
        """The record, if its token is the counter's and the semaphore is taken now.

        The kernel gives a semaphore back when its holder dies (``SEM_UNDO``), so a
        record left by a dead holder is never read: its semaphore is free.
        """
        import sysv_ipc

        lock = self.get_lock(key)
        try:
            taken = sysv_ipc.Semaphore(lock.key).value == 0
        except sysv_ipc.ExistentialError:
            return None  # released (tooz removes the semaphore) or never taken
        if not taken:
            return None
        return read_leader_file(os.path.join(_FENCING_DIR, str(lock.key)))

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
