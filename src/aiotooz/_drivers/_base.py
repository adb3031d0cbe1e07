"""The driver interface: how aiotooz uses one tooz backend, with plain-tooz defaults.

A driver wraps one started tooz coordinator and says what aiotooz must do differently
on its backend: how to try a lock once without waiting, release it, beat, tell whether
a held lock is still ours, how long a lock outlives its last refresh. Every method has
a default that is the plain tooz call, so a tooz backend without a module here still
works as far as tooz goes. Driver methods run in worker threads (or, for drivers with
``Capability.LOCAL_CALLS``, on the event loop) and may raise anything: the connection translates
errors, once.

A driver also *declares* what it can do (:class:`Capability`), so that the layers above
ask the driver instead of comparing scheme strings. Adding a capability means adding it
here with a default that says "not here", and overriding it in the drivers that have it.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, final

import anyio
import tooz
import tooz.coordination

from .._exceptions import ConfigurationError
from ._options import Option, check_options

__all__ = [
    "Capability",
    "Driver",
    "HolderRecord",
    "LeaderRecords",
    "ReleaseSignal",
    "client_timeout_options",
    "clock_floor",
    "holder_stamp",
    "next_in_file",
    "read_leader_file",
    "read_record_file",
    "read_stamp",
    "write_leader_file",
    "write_record_file",
]

#: Exceptions that mean "not acquired within the time given" on some drivers
#: (tenacity's RetryError on memcached and etcd3gw, kazoo's LockTimeout on ZooKeeper).
_NOT_ACQUIRED_NAMES = frozenset({"RetryError", "LockTimeout"})


class Capability(enum.Enum):
    """Something a driver can do, declared in its ``capabilities``."""

    #: A held lock expires unless it is refreshed by heartbeats (see ``lock_ttl``); the
    #: lease rule applies to it.
    EXPIRES = "expires"
    #: The driver can tell whether a held lock is still ours (``still_owner``).
    KNOWS_OWNER = "knows owner"
    #: A try and a release are local system calls of microseconds: they may run on the
    #: event loop itself instead of a worker thread.
    LOCAL_CALLS = "local calls"
    #: On an asyncio event loop, a try and a release can run on the loop itself through
    #: an asyncio client of the backend (``try_acquire_async``, ``release_async``), with
    #: no thread hop; elsewhere (trio, or a set-up the asyncio client cannot serve) they
    #: go through worker threads as for any driver.
    NATIVE_ASYNC = "native async"
    #: The driver gives fencing tokens (``fencing_token``).
    FENCES = "fences"
    #: A waiter can be woken when a lock is released by a watch kept on the event loop
    #: (``watch_releases``; Redis pub/sub on asyncio, the file driver's inotify), where
    #: ``watches_on_loop`` says it serves the connection. Waiters of a driver with
    #: neither kind of watch poll.
    WATCHES_ON_LOOP = "watches on loop"
    #: A waiter can be woken when a lock is released by a one-shot watch armed in a
    #: worker thread after each failed try (``arm_release_watch``; ZooKeeper, etcd, the
    #: probes of the SQL and ipc drivers). A driver with both kinds uses this one where
    #: the watch on the loop does not serve the connection.
    ARMS_WATCHES = "arms watches"
    #: Waiters wait at the backend and are granted there; a grant is parked for the
    #: waiter's next try, which takes it on the event loop (``take_grant``).
    PARKS_GRANTS = "parks grants"
    #: The driver can say who holds a leadership lock: the holder publishes its member
    #: id (``publish_leader``), anyone reads it back (``read_leader``). A driver that
    #: also ``NAMES_HOLDERS`` answers ``read_leader`` from the holder record by default.
    NAMES_LEADER = "names leader"
    #: The driver can say who holds any lock (``read_holder``): a holder record written
    #: with the grant (or kept by the server), tied to the lock like the leader record.
    NAMES_HOLDERS = "names holders"
    #: The driver can list the locks held under a key prefix (``list_holders``).
    LISTS_HOLDERS = "lists holders"
    #: Another process can free a lock it does not hold (``break_lock``), moving the
    #: fencing counter past the holder's token, and the holder finds out (``was_broken``).
    BREAKS_LOCKS = "breaks locks"
    #: The driver keeps one small record beside a lock's key, written by the holder with
    #: its fencing token and kept after the lock is released (``read_record``,
    #: ``write_record``): what ``@once_per`` remembers of each window.
    KEEPS_RECORDS = "keeps records"
    #: Read-write locks: ``get_lock`` of a key made by ``aiotooz._names.rw_key`` gives a
    #: lock that any number of readers hold at once, or one writer alone, across
    #: processes, writer-preferring (a writer that waits at the backend holds back new
    #: readers); the other methods take it as they take any lock. Drivers without it
    #: never see such a key (the connection refuses it).
    SHARES_LOCKS = "shares locks"
    #: Every lock key lives on one lease of the coordinator's, which only the heartbeat
    #: refreshes: a key granted now expires with that lease, so its TTL counts from the
    #: last refresh, not from its try (etcd; a Redis or memcached key gets its own TTL
    #: at the grant).
    SHARED_LEASE = "shared lease"


@final
@dataclass(frozen=True)
class HolderRecord:
    """Who holds a lock's key, as a driver reads it; ``None``: the backend cannot tell."""

    key: str
    member_id: str | None = None
    pid: int | None = None
    host: str | None = None
    since: float | None = None
    fencing_token: int | None = None
    waiters: int | None = None
    #: The server's id of the holder's session (PostgreSQL's backend pid, MySQL's
    #: connection id), where a session holds it.
    session: int | None = None


#: This host's name, for holder records (asked once: it does not change under a process).
_HOST = socket.gethostname()


@functools.lru_cache(maxsize=64)
def _stamp_head(member_id: str, pid: int) -> bytes:
    """A stamp's fixed part, made once per member and process (grants are a hot path)."""
    return json.dumps({"m": member_id, "p": pid, "h": _HOST}, separators=(",", ":"))[:-1].encode()


def holder_stamp(member_id: str, fencing_token: int | None = None) -> bytes:
    """The holder record a grant writes: member id, pid, host and time, as compact JSON.

    ``fencing_token``: the holder's, once it took one. No newline (JSON escapes them):
    Redis joins held tokens with newlines.
    """
    stamp = b'%s,"t":%.3f' % (_stamp_head(member_id, os.getpid()), time.time())
    if fencing_token is not None:
        stamp += b',"f":%d' % fencing_token
    return stamp + b"}"


def read_stamp(key: str, data: bytes, **known: Any) -> HolderRecord:
    """The holder record in ``data`` (a :func:`holder_stamp`), or what ``known`` says.

    Data that is not a stamp (a plain tooz process's token or member id) names nobody:
    its fields are ``None``, except a plain member id (``known["member_id"]``).
    """
    try:
        stamp = json.loads(data)
    except ValueError:
        stamp = None
    if not isinstance(stamp, dict):
        return HolderRecord(key, **known)
    return HolderRecord(
        key,
        member_id=str(stamp["m"]) if "m" in stamp else known.get("member_id"),
        pid=int(stamp["p"]) if isinstance(stamp.get("p"), int) else known.get("pid"),
        host=str(stamp["h"]) if "h" in stamp else known.get("host"),
        since=float(stamp["t"]) if isinstance(stamp.get("t"), int | float) else None,
        fencing_token=(
            int(stamp["f"]) if isinstance(stamp.get("f"), int) else known.get("fencing_token")
        ),
        waiters=known.get("waiters"),
    )


@final
class ReleaseSignal:
    """Fired when a lock a waiter wants may have been released: a hint, never a grant.

    A fire that comes while nobody waits is kept for the next :meth:`wait`, so a release
    between a failed try and the wait is never missed.
    """

    __slots__ = ("_event", "_forward")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._forward: Callable[[], object] | None = None

    def fire(self) -> None:
        self._event.set()
        if self._forward is not None:
            self._forward()

    def forward_to(self, fire: Callable[[], object]) -> None:
        """Call ``fire`` too from now on: one waiter watching several keys waits on one."""
        self._forward = fire

    async def wait(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for a fire; whether one came."""
        with anyio.move_on_after(seconds):
            await self._event.wait()
        fired = self._event.is_set()
        if fired:
            self._event = anyio.Event()
        return fired


class Driver:
    """The plain-tooz behaviour; one subclass per backend overrides what differs.

    Args:
        coordinator: the tooz coordinator (created, not yet started).
        call_timeout: the longest a caller waits for one call (see the settings).
    """

    #: The ``pip install aiotooz[<extra>]`` that brings the client library, if any.
    extra: ClassVar[str | None] = None
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: Driver options aiotooz sets unless the URL's query sets them.
    default_options: ClassVar[Mapping[str, str]] = {}
    #: The options a URL may set, and what their values must be (``_options``);
    #: ``None``: not known (a tooz driver without a module here), so not checked.
    accepted_options: ClassVar[Mapping[str, Option] | None] = None
    #: Keys the driver keeps for itself; a lock name on one of them is mapped instead.
    reserved_keys: ClassVar[frozenset[str]] = frozenset()
    #: How many backend locks all keys share, where that is few enough that two keys in
    #: use fall on one (tooz's PostgreSQL driver: 65,536); ``None`` if each key is a lock
    #: of its own. Where they share, a key found held may be held under another key.
    key_space: ClassVar[int | None] = None
    #: Why a lock cannot be broken on this backend and what to do instead (drivers
    #: without ``BREAKS_LOCKS``); ``{pid}``, ``{host}`` and ``{session}`` name the holder.
    break_refusal: ClassVar[str] = (
        "this backend cannot free a lock held by another process: stop the holder "
        "(pid {pid} on {host}), or wait for it to release the lock"
    )

    def __init__(self, coordinator: tooz.coordination.CoordinationDriver, call_timeout: float):
        self.tooz = coordinator
        self.call_timeout = call_timeout

    @classmethod
    def load(
        cls, url: str, member_id: str, options: Mapping[str, Any], call_timeout: float
    ) -> Driver:
        """The driver for ``url``, not started: by default around tooz's coordinator.

        A driver that talks to its backend without tooz (its own client) overrides this.
        May raise ``ImportError`` (a missing client library) or ``ValueError`` (a bad URL).
        """
        coordinator = tooz.coordination.get_coordinator(url, member_id.encode(), **options)
        return cls(coordinator, call_timeout)

    # -- before connecting (class methods: no connection yet) --------------------------

    @classmethod
    def check_url(cls, parts: urllib.parse.SplitResult) -> None:
        """Refuse a URL that cannot work on this backend (``ValueError``, no URL echoed)."""

    @classmethod
    def check_query(cls, parts: urllib.parse.SplitResult) -> None:
        """Refuse an option this backend does not take, or a bad value (``ValueError``)."""
        if cls.accepted_options is not None:
            check_options(parts, cls.accepted_options)

    @classmethod
    def prepare_url(cls, url: str) -> str:
        """The URL as handed to tooz."""
        return url

    @classmethod
    def options(cls, query: Mapping[str, list[str]]) -> dict[str, str]:
        """The options aiotooz adds to a URL's own (which always win)."""
        return {name: value for name, value in cls.default_options.items() if name not in query}

    @classmethod
    def key_problem(cls, key: str) -> str | None:
        """Why ``key`` cannot be locked on this backend, or ``None`` if it can."""
        return None

    def configure(self) -> None:
        """Check and adjust the tooz coordinator before it starts (in a worker thread).

        Raises:
            ConfigurationError: an option the backend cannot honour.
        """

    # -- the connection ----------------------------------------------------------------

    def start(self) -> None:
        self.tooz.start(start_heart=False)

    def stop(self) -> None:
        if self.tooz.is_started:
            self.tooz.stop()

    @property
    def requires_beating(self) -> bool:
        """Whether the backend needs heartbeats to keep the connection or locks alive."""
        return bool(self.tooz.requires_beating)

    @property
    def lock_ttl(self) -> float | None:
        """Seconds a held lock is guaranteed to outlive its last refresh at the backend.

        ``None`` where locks live as long as the connection or process (no ``EXPIRES``).
        """
        return None

    def heartbeat(self) -> None:
        """One heartbeat: prove the connection is alive and refresh TTL locks."""
        self.tooz.heartbeat()

    def beat(self, locks: Sequence[Any]) -> list[bool | None]:
        """One heartbeat, then whether each of ``locks`` (held, or ``None``) is still ours.

        The default is :meth:`heartbeat` and then :meth:`still_owners` (where the driver
        ``KNOWS_OWNER``): a round trip per held lock unless the driver asks about them
        all at once. Drivers that can refresh and check every lock in a few round trips,
        whatever is held, override it.

        Returns:
            For each lock: ``True`` still ours, ``False`` no longer ours, ``None`` the
            driver cannot tell (and for a ``None`` lock).
        """
        self.heartbeat()
        if Capability.KNOWS_OWNER not in self.capabilities:
            return [None] * len(locks)
        answers = iter(self.still_owners([lock for lock in locks if lock is not None]))
        return [None if lock is None else next(answers) for lock in locks]

    # -- locks ---------------------------------------------------------------------------

    def get_lock(self, key: str) -> Any:
        """A tooz lock object for ``key`` (an ASCII key, see ``aiotooz._names``)."""
        return self.tooz.get_lock(key.encode("ascii"))

    def try_acquire(self, lock: Any, key: str) -> bool:
        """Try once to take ``lock``, never waiting; ``True`` if it is now held."""
        try:
            return bool(lock.acquire(blocking=False))
        except Exception as exc:
            if type(exc).__name__ in _NOT_ACQUIRED_NAMES:
                return False
            raise

    def release(self, lock: Any) -> bool:
        """Release ``lock``; ``False`` if the backend says it was no longer ours."""
        return bool(lock.release())

    def take_grant(self, lock: Any) -> bool:
        """Take a grant the backend already gave a waiter for ``lock`` (``PARKS_GRANTS``).

        Called on the event loop before a try, so it must not block (no I/O). ``False``
        if none is parked.
        """
        return False

    def waiters_elsewhere(self, lock: Any) -> int:
        """How many waiters of other coordinators are known to wait for ``lock`` (held).

        Asked just before a release: if any, the next waiter of this coordinator steps
        back so that they go first (fairness between processes). 0 if not known.
        """
        return 0

    # -- on the event loop (drivers with ``Capability.NATIVE_ASYNC``) ---------------------

    def native_async_ready(self) -> bool:
        """Whether this connection's set-up can be served by the asyncio client."""
        return False

    async def try_acquire_async(self, lock: Any, key: str) -> bool:
        """``try_acquire`` on the event loop.

        It is never cut short: a caller that gives up on it leaves, the call runs on to
        its answer, and a grant then is released with ``release`` (the blocking one, in a
        worker thread). A call that fails or gets no answer may still have been applied:
        ``release`` runs for it too, so the token must be set before the command is sent.
        """
        raise NotImplementedError

    async def release_async(self, lock: Any) -> int:
        """``release`` on the event loop.

        Returns -1 if the lock was not ours, else how many waiters the release woke (0
        if the driver cannot tell).
        """
        raise NotImplementedError

    async def close_async(self) -> None:
        """Close what was opened on the event loop: an asyncio client, watches."""

    @property
    def release_watchers(self) -> int:
        """Threads parked now for :meth:`arm_release_watch` (probes, watch streams)."""
        return 0

    def watches_on_loop(self, native: bool) -> bool:
        """Whether :meth:`watch_releases` serves this connection's waiters.

        ``native``: the asyncio client serves this connection (``NATIVE_ASYNC``).
        """
        return native

    async def watch_releases(self, lock: Any) -> ReleaseSignal | None:
        """Start watching for releases of ``lock``'s key (``WATCHES_ON_LOOP``).

        Returns once the watch is active, so that a release after this returns fires the
        signal; ``None`` if no watch can be had now (the waiter polls).
        """
        return None

    async def unwatch_releases(self, lock: Any, signal: ReleaseSignal) -> None:
        """Stop the watch :meth:`watch_releases` started."""

    def arm_release_watch(self, lock: Any, fire: Callable[..., object]) -> bool:
        """Have ``fire`` called, from any thread, when ``lock``'s holder lets go (``ARMS_WATCHES``).

        Called after a failed try, in a worker thread. ``True`` if the lock looks free
        already (then try again at once: nothing is armed).
        """
        raise tooz.NotImplemented("release watches")

    def disarm_release_watch(self, lock: Any) -> None:
        """Stop a watch :meth:`arm_release_watch` armed, if it holds anything.

        A thread or a stream, say. Called on the event loop, where it must not block,
        and again in a worker thread by an arm that ended after its waiter had left; a
        second call for the same lock finds nothing to stop.
        """

    def fencing_token(self, lock: Any) -> int | None:
        """A new fencing token for ``lock``, which we hold (``Capability.FENCES``).

        Larger than every token handed out for this lock's key before, by any process.
        ``None`` if the backend says the lock is no longer ours (then no token).
        """
        raise tooz.NotImplemented("fencing tokens")

    # -- leadership (``Capability.NAMES_LEADER``) -------------------------------------

    def publish_leader(self, lock: Any, member_id: str, token: int) -> None:
        """Record that ``member_id`` leads through ``lock``, which we hold, with ``token``.

        ``token`` is the fencing token of this grant. The record must be tied to the
        lock: :meth:`read_leader` never answers with it once the lock is not held by the
        grant that wrote it (it expired, was released, or its process or session died).
        A driver that ``NAMES_HOLDERS`` wrote its record with the grant: nothing to do.
        """
        if Capability.NAMES_HOLDERS not in self.capabilities:
            raise tooz.NotImplemented("leader records")

    def read_leader(self, key: str) -> str | None:
        """The member id that holds the leadership lock ``key`` now, or ``None``.

        ``None`` also while the holder has not published its record yet; never the
        member id of a grant that has ended. By default the holder record's member: a
        driver whose grant writes one (``NAMES_HOLDERS``) needs no leader record.
        """
        holder = self.read_holder(key)
        return None if holder is None else holder.member_id

    # -- holders (``NAMES_HOLDERS``, ``LISTS_HOLDERS``, ``BREAKS_LOCKS``) -------------

    def read_holder(self, key: str) -> HolderRecord | None:
        """Who holds the lock ``key`` now (``NAMES_HOLDERS``); ``None`` if nobody does.

        Never the holder of a grant that has ended; the record of a holder that wrote
        none (a plain tooz process) has ``None`` fields.
        """
        raise tooz.NotImplemented("holder records")

    def list_holders(self, key_prefix: str) -> list[HolderRecord]:
        """The holders of every lock held now whose key starts with ``key_prefix``."""
        raise tooz.NotImplemented("listing held locks")

    def break_lock(self, key: str) -> HolderRecord | None:
        """Free the lock ``key``, held by anyone (``BREAKS_LOCKS``); whom it was taken from.

        The fencing counter moves past the holder's token first, and a mark is left that
        :meth:`was_broken` reads for the holder. ``None`` if nobody held it.
        """
        raise tooz.NotImplemented("breaking locks")

    def was_broken(self, lock: Any) -> bool:
        """Whether ``lock`` (ours, found lost by a beat) was freed by :meth:`break_lock`."""
        return False

    # -- records beside a lock (``Capability.KEEPS_RECORDS``) -------------------------

    def read_record(self, lock: Any) -> bytes | None:
        """The record kept beside ``lock``'s key (we hold it), or ``None`` if there is none."""
        raise tooz.NotImplemented("records beside locks")

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        """Replace the record beside ``lock``'s key; ``lock`` is ours, fenced with ``token``.

        The record outlives the lock (it is read by later holders). Fenced: nothing is
        written, and ``False`` returned, if the stored record carries a larger token (a
        later holder wrote it: this writer is stale) or, where the backend can tell in
        the same step, if ``lock`` is no longer ours.
        """
        raise tooz.NotImplemented("records beside locks")

    def still_owner(self, lock: Any) -> bool | None:
        """Whether ``lock`` is still ours at the backend; ``None`` if it cannot tell."""
        try:
            return bool(lock.is_still_owner())
        except tooz.NotImplemented:
            return None

    def still_owners(self, locks: Sequence[Any]) -> list[bool | None]:
        """:meth:`still_owner` for each of ``locks`` (held): the heartbeat's check.

        One call per lock here; a driver that can ask about all of them at once (one
        round trip per beat, whatever is held) does so.
        """
        return [self.still_owner(lock) for lock in locks]


#: The TTL options tooz derives from ``timeout`` on the memcached and etcd drivers.
_TTL_OPTIONS = ("lock_timeout", "membership_timeout", "leader_timeout")


def client_timeout_options(query: Mapping[str, list[str]]) -> dict[str, str]:
    """A 2 s client ``timeout`` unless the URL sets one, keeping tooz's 30 s TTLs.

    memcached's and etcd's drivers take ``timeout`` for the client's socket waits *and*
    as the default of their TTLs: when aiotooz sets it, the TTLs the URL leaves unset
    keep tooz's default of 30 s; when the URL sets it, tooz's own rule applies.
    """
    if "timeout" in query:
        return {}
    options = {"timeout": "2"}
    options.update({name: "30" for name in _TTL_OPTIONS if name not in query})
    return options


def clock_floor() -> int:
    """The least token a counter that vanished may restart from: microseconds since 1970.

    Tokens handed out before were at most the clock of their grant (or a counter one
    past it), so a counter seeded from a later clock never goes back.
    """
    return time.time_ns() // 1000


#: The longest counter file read: far more digits than a counter bumped once per grant
#: can ever reach from the clock; a longer file is refused as corrupt, never cut short.
_COUNTER_MAX = 4096


def next_in_file(path: str) -> int:
    """Bump the counter in the file at ``path`` (made if missing); return its new value.

    Only ever called by the holder of the lock the counter belongs to, so no other
    writer races it; a file that is lost (or empty) restarts from :func:`clock_floor`.

    Raises:
        ConfigurationError: the file holds something other than a whole number (a token
            from it could go back, so none is given); it names the file and the fix.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        text = os.pread(fd, _COUNTER_MAX + 1, 0).strip()
        # ASCII digits only: int() would also take "1_000", "+5" or other scripts' digits.
        if len(text) > _COUNTER_MAX or (text and not text.isdigit()):
            shown = text[:40].decode("ascii", "backslashreplace")
            raise ConfigurationError(
                f"the fencing counter {path} is corrupt: it holds {shown!r}"
                f"{'...' if len(text) > 40 else ''}, not a whole number, so no token "
                "can be given that is surely larger than the last. Write the last token "
                "handed out for this lock (or a larger number) into it, or delete it "
                "(tokens then restart from the clock in microseconds, larger than any "
                "that aiotooz's own counters reach)"
            )
        token = max(int(text or 0) + 1, clock_floor())
        data = str(token).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return token


#: A leader record beside a fencing counter: the counter file's name and this suffix
#: (never a key: plain keys have no ``~``, mapped keys end in ``~`` and 32 hex digits).
_RECORD_SUFFIX = "~leader"


def write_leader_file(counter_path: str, member_id: str, token: int) -> None:
    """Write the leader record beside the fencing counter at ``counter_path``.

    It names the token, the holding process and the member. Written to a temporary file
    and renamed, so a reader sees the old record or the new one, never half of one.
    """
    path = counter_path + _RECORD_SUFFIX
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as record:
        record.write(f"{token} {os.getpid()} {member_id}")
    os.replace(temporary, path)


@final
class LeaderRecords:
    """The leader records one driver wrote (file, ipc), each removed before its lock goes.

    A reader believes a record while the process it names holds the lock, as the kernel
    tells; but two coordinators of one process are one process to the kernel, so the
    next holder in the same process would be taken for the last, from its grant until
    it fences and writes its own record. So a record is retracted as its lock is let
    go. A publish shares a mutex with the release, so one that comes late (its caller
    gave up on it and released the lock meanwhile) writes nothing.
    """

    __slots__ = ("_guard", "_written")

    def __init__(self) -> None:
        self._guard = threading.Lock()
        #: The counter paths whose records this driver wrote for locks it holds.
        self._written: set[str] = set()

    def publish(
        self, counter_path: str, member_id: str, token: int, held: Callable[[], bool]
    ) -> None:
        """Write the record (:func:`write_leader_file`) if ``held()``: the lock is ours."""
        with self._guard:
            if held():
                write_leader_file(counter_path, member_id, token)
                self._written.add(counter_path)

    def release(self, counter_path: str, release: Callable[[], bool]) -> bool:
        """Remove the record written beside ``counter_path``, if any; then ``release()``."""
        with self._guard:
            if counter_path in self._written:
                self._written.discard(counter_path)
                try:
                    os.remove(counter_path + _RECORD_SUFFIX)
                except FileNotFoundError:
                    pass
            return release()


def read_leader_file(counter_path: str, holder_pid: int | None) -> str | None:
    """The member id in the leader record beside ``counter_path``, if it is current.

    Current means its token is the counter's value (the last grant fenced on this key
    wrote it) and its process is ``holder_pid``, the process that holds the lock now as
    the kernel tells the caller (``None``: nobody). Both are needed: a holder that died
    leaves the files behind, and the next holder takes the lock before it fences and
    writes its own record. A holder that lets go removes its record first
    (:class:`LeaderRecords`): the next holder may be in the same process.
    """
    if holder_pid is None:
        return None
    try:
        with open(counter_path + _RECORD_SUFFIX, encoding="utf-8") as record:
            token, pid, member_id = record.read().split(" ", 2)
        with open(counter_path, encoding="utf-8") as counter:
            current = counter.read().strip()
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return member_id if token == current and pid == str(holder_pid) else None


#: The record beside a fencing counter (``Capability.KEEPS_RECORDS``): ``<token> <record>``.
_KEPT_SUFFIX = "~record"


def read_record_file(counter_path: str) -> bytes | None:
    """The record kept beside the fencing counter at ``counter_path``, if any."""
    try:
        with open(counter_path + _KEPT_SUFFIX, "rb") as kept:
            _, _, record = kept.read().partition(b" ")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return record


def write_record_file(counter_path: str, record: bytes, token: int) -> bool:
    """Replace the record beside the fencing counter at ``counter_path``, fenced by ``token``.

    Only the lock's holder writes it, and a file or ipc lock is held until its process
    dies, so a larger token stored means a later holder wrote it. Written to a temporary
    file and renamed: a reader (or a writer that dies half-way) leaves the old record or
    the new one, never half of one.
    """
    path = counter_path + _KEPT_SUFFIX
    try:
        with open(path, "rb") as kept:
            stored = kept.read().partition(b" ")[0]
    except (FileNotFoundError, NotADirectoryError):
        stored = b""
    if stored.isdigit() and int(stored) > token:
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "wb") as kept:
        kept.write(b"%d %s" % (token, record))
    os.replace(temporary, path)
    return True
