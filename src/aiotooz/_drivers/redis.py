"""The Redis backend."""

from __future__ import annotations

import contextlib
import threading
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

import anyio

from .._names import split_rw_key
from .._tasks import BackgroundTask, spawn
from . import _options
from ._base import Capability, Driver, HolderRecord, ReleaseSignal, holder_stamp, read_stamp
from ._redisrw import READERS_REFRESH_SCRIPT, RedisRWLock

__all__ = ["RedisDriver"]

#: Connection options the asyncio client takes as the blocking client has them.
_ASYNC_OPTIONS = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "client_name",
        "encoding",
        "encoding_errors",
        "decode_responses",
    }
)


#: A fencing token for a lock we hold, in one atomic step: nothing if the lock's key does
#: not hold our token; else one more than the key's counter, or the server's clock in
#: microseconds if that is larger (a counter lost with a restart never goes back). With a
#: third key, the fence mark: ``<fencing token> <lock token>`` (the holder's token).
_FENCE_SCRIPT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return false end
local now = redis.call('time')
local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
local token = tonumber(redis.call('get', KEYS[2]) or '0') + 1
if token < floor then token = floor end
redis.call('set', KEYS[2], string.format('%.0f', token))
if KEYS[3] then redis.call('set', KEYS[3], string.format('%.0f', token) .. ' ' .. ARGV[1]) end
return string.format('%.0f', token)
"""


#: tooz's release (delete the key if it holds our token), which also tells waiters on the
#: key's channel; returns how many were told, or -1 if the key was not ours.
_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('del', KEYS[1])
return redis.call('publish', KEYS[2], '')
"""


#: One beat for many locks: each key that still holds our token has its TTL set again;
#: the answer is the (1-based) positions of those that do not (expired, released, or
#: overwritten by another holder). ``ARGV[1]`` is the TTL in milliseconds, ``ARGV[2]``
#: the keys and ``ARGV[3]`` their tokens, each joined by newlines: two arguments instead
#: of two per lock, as redis-py packs every argument in Python (most of a beat's time at
#: 10,000 locks). A script that names the keys it touches only in ``ARGV`` runs on one
#: server: a single Redis, Sentinel's primary, or one node of a Redis Cluster for the
#: keys that node serves (``redis_cluster`` runs it per node).
_REFRESH_SCRIPT = """
local lost = {}
local tokens = {}
for token in string.gmatch(ARGV[3], '[^\\n]+') do tokens[#tokens + 1] = token end
local i = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  i = i + 1
  if redis.call('get', key) == tokens[i] then
    redis.call('pexpire', key, ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

#: Keys refreshed by one run of the refresh script: a run blocks the server, so a beat
#: of many locks is several short runs (sent together, in one round trip).
_REFRESH_BATCH: Final = 1000


#: A leader record for a lock we hold: ``<lock token> <member id>`` in a key beside the
#: lock's, written only if the lock's key holds our token (Redis Cluster's; the single
#: server's leader is the holder record in the lock's value).
_LEADER_SCRIPT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[2], ARGV[1] .. ' ' .. ARGV[2])
return 1
"""


#: A record beside a lock we hold: ``<fencing token> <record>`` in a key beside the lock's,
#: written only if the lock's key holds our token and the stored token is not larger.
_RECORD_SCRIPT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local stored = redis.call('get', KEYS[2])
if stored then
  local token = tonumber(string.match(stored, '^(%d+) '))
  if token and token > tonumber(ARGV[2]) then return 0 end
end
redis.call('set', KEYS[2], ARGV[2] .. ' ' .. ARGV[3])
return 1
"""


#: Break a lock whatever token it holds: move the fencing counter past every token handed
#: out (as a fence would), leave the old token in a mark for its holder to find (for
#: ``ARGV[1]`` ms), delete the key and tell waiters. Returns the old token, or false.
_BREAK_SCRIPT = """
local old = redis.call('get', KEYS[1])
if not old then return false end
local now = redis.call('time')
local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
local token = tonumber(redis.call('get', KEYS[2]) or '0') + 1
if token < floor then token = floor end
redis.call('set', KEYS[2], string.format('%.0f', token))
redis.call('set', KEYS[3], old, 'PX', ARGV[1])
redis.call('del', KEYS[1])
redis.call('publish', KEYS[4], '')
return old
"""

#: How long a break's mark is kept (ms): far longer than any heartbeat.
_BROKEN_MARK_MS: Final = 600_000


def _base_key(lock: Any) -> bytes:
    """The tooz key of a lock without its ``_lock`` suffix: what the other keys extend."""
    return bytes(lock.name)[: -len(b"_lock")]


def _record_key(lock: Any) -> bytes:
    """The key of the record kept beside a lock (tooz's key with another suffix)."""
    return bytes(lock.name)[: -len(b"_lock")] + b"_record"


def _holder(key: str, value: bytes, fenced: bytes | None) -> HolderRecord:
    """The holder record in a lock key's value; its fencing token if the fence mark is its.

    The fence mark (``<fencing token> <lock token>``) outlives the grant that wrote it:
    it counts only while the key holds the token it names.
    """
    token = None
    if fenced is not None:
        fencing, _, lock_token = bytes(fenced).partition(b" ")
        token = int(fencing) if lock_token == value and fencing.isdigit() else None
    return read_stamp(key, value.partition(b" ")[2], fencing_token=token)


def _glob_escape(pattern: bytes) -> bytes:
    """``pattern`` matched literally by ``SCAN MATCH`` (a glob)."""
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        pattern = pattern.replace(special, b"\\" + special)
    return pattern


def _channel(lock: Any) -> bytes:
    """The pub/sub channel that tells a lock's releases (tooz's key, one suffix more)."""
    return bytes(lock.name) + b"_released"


def _still_ours(
    lock: Any, held: Mapping[bytes, bytes], readers: Mapping[bytes, bytes], lost: set[bytes]
) -> bool | None:
    """Whether ``lock`` is still ours after a beat (``None``: no lock, or not held)."""
    if lock is None:
        return None
    if isinstance(lock, RedisRWLock):
        if lock.token is None:
            return None
        if lock.write:
            return held.get(lock.writer) == lock.token
        return lock.token in readers and lock.token not in lost
    token = lock._lock.local.token
    return None if token is None else held.get(lock.name) == token


def _database(parts: urllib.parse.SplitResult) -> int | None:
    """The database a host URL's path selects (``/2``), or ``None`` (no path, or a socket).

    Raises:
        ValueError: the path is not a database number, or ``db=`` says another one.
    """
    if not parts.hostname or parts.path in ("", "/"):
        return None  # without a host, the path is a Unix socket's (tooz's rule)
    number = parts.path[1:]
    if not number.isdigit():
        raise ValueError(
            "the path of a redis://host URL selects the database, a number such as "
            "redis://host:6379/2 (a Unix socket is redis:///path/to/socket, without a host)"
        )
    given = urllib.parse.parse_qs(parts.query).get("db")
    if given is not None and any(value != number for value in given):
        raise ValueError("the redis:// URL selects two databases, by its path and by db=: give one")
    return int(number)


class _Channels:
    """One pub/sub connection of the asyncio client: release signals per channel.

    A reader task, owned by no task group (it ends with :meth:`close`), turns each
    message into a fire of the channel's signals. If the connection breaks, every
    signal fires (its waiter tries again, and polls from then on) and the next watch
    opens a new one.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._pubsub: Any = None
        self._reader: BackgroundTask | None = None
        self._signals: dict[bytes, set[ReleaseSignal]] = {}
        self._subscribed: dict[bytes, anyio.Event] = {}
        self._closed = False

    async def watch(self, channel: bytes) -> ReleaseSignal:
        if self._closed:
            raise RuntimeError("the release watches are closed")  # the waiter polls
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        pubsub = self._pubsub
        signal = ReleaseSignal()
        signals = self._signals.setdefault(channel, set())
        signals.add(signal)
        try:
            if len(signals) == 1:
                subscribed = self._subscribed[channel] = anyio.Event()
                await pubsub.subscribe(channel)
                if self._closed:
                    raise RuntimeError("the release watches were closed meanwhile")
                if self._reader is None:  # after the subscribe: the connection exists
                    self._reader = spawn(self._read, name="aiotooz redis release signals")
                await subscribed.wait()  # active at the server: a release from now fires
            else:
                await self._subscribed[channel].wait()
        except BaseException:
            # Failed or cancelled: forget it here (the connection may keep the
            # subscription until it closes; a message on it finds no signal).
            signals.discard(signal)
            if not signals:
                self._signals.pop(channel, None)
                self._subscribed.pop(channel, None)
            if self._closed:
                # close() ran while this subscribe was connecting: the connection it
                # made is this pub/sub's alone now, and nobody else will close it.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await pubsub.aclose()
            raise
        return signal

    async def unwatch(self, channel: bytes, signal: ReleaseSignal) -> None:
        signals = self._signals.get(channel)
        if signals is None:
            return
        signals.discard(signal)
        if not signals:
            del self._signals[channel]
            self._subscribed.pop(channel, None)
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        try:
            while True:
                # A bounded wait: the connection's socket timeout must not end the read.
                message = await self._pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                channel = message["channel"]
                if message["type"] == "subscribe":
                    subscribed = self._subscribed.get(channel)
                    if subscribed is not None:
                        subscribed.set()
                elif message["type"] == "message":
                    for signal in self._signals.get(channel, ()):
                        signal.fire()
        except Exception:  # the connection broke: everyone tries again, then polls
            pubsub, self._pubsub = self._pubsub, None
            self._reader = None
            for event in self._subscribed.values():
                event.set()
            for signals in self._signals.values():
                for signal in signals:
                    signal.fire()
            self._signals.clear()
            self._subscribed.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        self._closed = True  # no watch starts from now on (its connection would leak)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await reader.wait()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class RedisDriver(Driver):
    """Redis locks: a key with a TTL of ``lock_timeout`` seconds, refreshed each beat.

    The key, token and scripts are those of tooz's lock (redis-py's ``Lock``), so plain
    tooz processes and aiotooz exclude each other. On asyncio a try and a release are
    one command each on an asyncio client of the same server, run on the event loop:
    a lock cycle then costs its two round trips, not two thread hops as well. Locks
    taken that way are refreshed by this driver's heartbeat, not tooz's; releases never
    go through tooz's, which logs an error for a lock that is no longer ours.
    """

    extra = "redis"
    accepted_options = _options.REDIS
    capabilities = frozenset(
        {
            Capability.EXPIRES,
            Capability.KNOWS_OWNER,
            Capability.NATIVE_ASYNC,
            Capability.FENCES,
            Capability.WATCHES_ON_LOOP,
            Capability.NAMES_LEADER,
            Capability.KEEPS_RECORDS,
            Capability.NAMES_HOLDERS,
            Capability.LISTS_HOLDERS,
            Capability.BREAKS_LOCKS,
            Capability.SHARES_LOCKS,
        }
    )
    #: Bounded socket waits, so that a dead or hung server is noticed in seconds.
    default_options: ClassVar[Mapping[str, str]] = {
        "socket_timeout": "2",
        "socket_connect_timeout": "2",
    }

    @classmethod
    def check_url(cls, parts: urllib.parse.SplitResult) -> None:
        """The path of ``redis://host:6379/2`` selects the database, as in redis-py's URLs."""
        _database(parts)

    @classmethod
    def prepare_url(cls, url: str) -> str:
        """``redis://host/2`` as ``redis://host?db=2``, the only way tooz reads it.

        tooz ignores the path of a URL with a host: it used database 0.
        """
        parts = urllib.parse.urlsplit(url)
        database = _database(parts)
        if database is None:
            return url
        query = f"{parts.query}&db={database}" if parts.query else f"db={database}"
        if "db" in urllib.parse.parse_qs(parts.query):
            query = parts.query  # the same database: checked by _database
        return urllib.parse.urlunsplit(parts._replace(path="", query=query))

    def __init__(self, coordinator: Any, call_timeout: float) -> None:
        super().__init__(coordinator, call_timeout)
        #: The token of every lock this connection holds, by key: what a beat refreshes
        #: (joined as it is, with no work per lock in Python).
        self._held: dict[bytes, bytes] = {}
        #: The readers' set key of every read-write lock read here, by reader token.
        self._readers: dict[bytes, bytes] = {}
        self._held_guard = threading.Lock()  # never held across a network call
        self._async_client: Any = None
        self._async_release: Any = None
        self._channels: _Channels | None = None
        #: ``close_async`` ran: no watch opens a connection from now on.
        self._async_closed = False

    @property
    def lock_ttl(self) -> float:
        return float(self.tooz.lock_timeout)  # type: ignore[attr-defined]

    def configure(self) -> None:
        """Bound how long a dead Redis takes to notice; tooz has no option for it.

        redis-py retries a failed command 10 times with backoff, and tooz retries that
        15 times: a dead Redis surfaced only after about a minute, on heartbeats and on
        connects alike. tooz's own quick retries still ride over a stale pooled
        connection, so the client's retries are dropped, from the moment the driver
        makes its client.
        """
        import redis.backoff
        import redis.retry

        make_client = self.tooz._make_client  # type: ignore[attr-defined]

        def make_client_without_retries(*args: Any, **kwargs: Any) -> Any:
            client = make_client(*args, **kwargs)
            client.set_retry(redis.retry.Retry(redis.backoff.NoBackoff(), 0))
            return client

        self.tooz._make_client = make_client_without_retries  # type: ignore[attr-defined]

    def heartbeat(self) -> None:
        self.beat(())

    def beat(self, locks: Sequence[Any]) -> list[bool | None]:
        """Refresh every lock this connection holds, and check ``locks``, in one round trip.

        tooz's heartbeat refreshes one lock per command (a round trip each); here one
        pipeline writes tooz's membership key (as its heartbeat does) and runs the refresh
        script over every held key: a key that still holds our token gets its TTL again,
        one that does not (expired, released, or overwritten by another holder) is named
        back. Locks held that are not in ``locks`` (being handed from one task to the
        next, say) are refreshed too. tooz's own per-lock refresh is not used.
        """
        with self._held_guard:
            held = self._held.copy()
            readers = self._readers.copy()
        # A key or token with a newline (a URL's namespace could hold one) cannot be
        # joined: it reads as not ours, and its holder is told.
        if any(b"\n" in key for key in held):
            held = {key: token for key, token in held.items() if b"\n" not in key}
        keys, tokens = list(held), list(held.values())
        client = self.tooz._client  # type: ignore[attr-defined]
        pipeline = client.pipeline(transaction=False)
        member = self.tooz._encode_beat_id(self.tooz._member_id)  # type: ignore[attr-defined]
        membership_ms = max(0, int(self.tooz.membership_timeout * 1000))  # type: ignore[attr-defined]
        pipeline.psetex(member, membership_ms, self.tooz.STILL_ALIVE)  # type: ignore[attr-defined]
        ttl_ms = int(self.lock_ttl * 1000)
        starts = range(0, len(keys), _REFRESH_BATCH)
        for at in starts:
            joined_keys = b"\n".join(keys[at : at + _REFRESH_BATCH])
            joined_tokens = b"\n".join(tokens[at : at + _REFRESH_BATCH])
            pipeline.eval(_REFRESH_SCRIPT, 0, ttl_ms, joined_keys, joined_tokens)
        reader_tokens = [token for token in readers if b"\n" not in readers[token]]
        if reader_tokens:
            joined_keys = b"\n".join(readers[token] for token in reader_tokens)
            joined_tokens = b"\n".join(reader_tokens)
            pipeline.eval(READERS_REFRESH_SCRIPT, 0, ttl_ms, joined_keys, joined_tokens)
        answers = pipeline.execute()
        for at, positions in zip(starts, answers[1 : 1 + len(starts)], strict=True):
            for position in positions:
                del held[keys[at + int(position) - 1]]
        lost_readers = {reader_tokens[int(i) - 1] for i in answers[-1]} if reader_tokens else set()
        # ``held`` now has the keys still ours; a lock is ours if its key holds its token.
        return [_still_ours(lock, held, readers, lost_readers) for lock in locks]

    def get_lock(self, key: str) -> Any:
        rw = split_rw_key(key)
        if rw is None:
            return super().get_lock(key)
        namespace = self.tooz._namespace  # type: ignore[attr-defined]
        return RedisRWLock(namespace, rw[0], rw[1], self.tooz._member_id)

    def _token(self) -> bytes:
        """A grant's token: tooz's (a UUID), then the holder record (``NAMES_HOLDERS``).

        The record is the lock key's value itself: written in the grant's one command,
        gone with the key, and never naming a grant that has ended.
        """
        member = self.tooz._member_id.decode("utf-8", "replace")
        return uuid.uuid1().hex.encode() + b" " + holder_stamp(member)

    def try_acquire(self, lock: Any, key: str) -> bool:
        """redis-py's acquire with our token (tooz's, without its logging wrapper)."""
        if isinstance(lock, RedisRWLock):
            script, keys, args = lock.try_call(int(self.lock_ttl * 1000))
            client = self.tooz._client  # type: ignore[attr-defined]
            return self._rw_tried(lock, client.eval(script, len(keys), *keys, *args))
        granted = bool(lock._lock.acquire(blocking=False, token=self._token()))
        if granted:
            self.tooz._acquired_locks.add(lock)  # type: ignore[attr-defined]
            self._keep(lock)
        return granted

    def _rw_tried(self, lock: RedisRWLock, answer: Any) -> bool:
        if not answer:
            lock.token = None
            return False
        with self._held_guard:
            if lock.write:
                self._held[lock.writer] = lock.token  # type: ignore[assignment]
            else:
                self._readers[lock.token] = lock.readers  # type: ignore[index]
        return True

    def _rw_release_call(self, lock: RedisRWLock) -> Any:
        with self._held_guard:
            if lock.write:
                if lock.token is not None and self._held.get(lock.writer) == lock.token:
                    del self._held[lock.writer]
            else:
                self._readers.pop(lock.token, None)  # type: ignore[arg-type]
        return lock.release_call(_channel(lock))

    def release(self, lock: Any) -> bool:
        """Release with the lock's token (compare and delete), tooz's way but quiet."""
        if isinstance(lock, RedisRWLock):
            call = self._rw_release_call(lock)
            if call is None:
                return False
            script, keys, args = call
            client = self.tooz._client  # type: ignore[attr-defined]
            return int(client.eval(script, len(keys), *keys, *args)) >= 0
        sync_lock = lock._lock
        token = sync_lock.local.token
        self._forget(lock)
        if token is None:
            return False
        try:
            client = self.tooz._client  # type: ignore[attr-defined]
            told = client.eval(_RELEASE_SCRIPT, 2, lock.name, _channel(lock), token)
        finally:
            sync_lock.local.token = None
        return int(told) >= 0

    def fencing_token(self, lock: Any) -> int | None:
        """From a counter key beside the lock's, bumped by a script that checks the lock."""
        if isinstance(lock, RedisRWLock):  # a writer's: its key is a lock key
            if lock.token is None:
                return None
            client = self.tooz._client  # type: ignore[attr-defined]
            answer = client.eval(_FENCE_SCRIPT, 2, lock.writer, lock.fence, lock.token)
            return None if answer is None else int(answer)
        token = lock._lock.local.token
        if token is None:
            return None
        base = _base_key(lock)
        client = self.tooz._client  # type: ignore[attr-defined]
        keys = (lock.name, base + b"_fence", base + b"_fenced")
        answer = client.eval(_FENCE_SCRIPT, 3, *keys, token)
        return None if answer is None else int(answer)

    def read_holder(self, key: str) -> HolderRecord | None:
        """The lock key's value (its token, then the record) and the fence mark: one MGET."""
        lock = self.get_lock(key)
        client = self.tooz._client  # type: ignore[attr-defined]
        value, fenced = client.mget([lock.name, _base_key(lock) + b"_fenced"])
        return None if value is None else _holder(key, bytes(value), fenced)

    def list_holders(self, key_prefix: str) -> list[HolderRecord]:
        """``SCAN`` the lock keys under the prefix, then read them (a few round trips)."""
        probe = bytes(self.get_lock("K").name)
        start, end = probe[: probe.rindex(b"K_lock")], b"_lock"
        pattern = _glob_escape(start + key_prefix.encode("ascii")) + b"*" + end
        client = self.tooz._client  # type: ignore[attr-defined]
        names = [bytes(name) for name in client.scan_iter(match=pattern, count=1000)]
        holders = []
        for at in range(0, len(names), 500):
            batch = names[at : at + 500]
            fences = [name[: -len(end)] + b"_fenced" for name in batch]
            values = client.mget(batch + fences)
            for name, value, fenced in zip(batch, values, values[len(batch) :], strict=False):
                key = name[len(start) : -len(end)].decode("ascii", "replace")
                if value is not None and "~rw" not in key:  # read-write locks: not listed
                    holders.append(_holder(key, bytes(value), fenced))
        return holders

    def break_lock(self, key: str) -> HolderRecord | None:
        """One script: the fence counter moves past, a mark is left, the key goes."""
        lock = self.get_lock(key)
        base = _base_key(lock)
        keys = (lock.name, base + b"_fence", base + b"_broken", _channel(lock))
        client = self.tooz._client  # type: ignore[attr-defined]
        old = client.eval(_BREAK_SCRIPT, 4, *keys, _BROKEN_MARK_MS)
        return None if old is None else _holder(key, bytes(old), None)

    def was_broken(self, lock: Any) -> bool:
        token = lock._lock.local.token
        if token is None:
            return False
        client = self.tooz._client  # type: ignore[attr-defined]
        return bool(client.get(_base_key(lock) + b"_broken") == token)

    def read_record(self, lock: Any) -> bytes | None:
        client = self.tooz._client  # type: ignore[attr-defined]
        stored = client.get(_record_key(lock))
        return None if stored is None else bytes(stored).partition(b" ")[2]

    def write_record(self, lock: Any, record: bytes, token: int) -> bool:
        """One script: the lock's key must hold our token; no TTL (it outlives the lock)."""
        lock_token = lock._lock.local.token
        if lock_token is None:
            return False
        client = self.tooz._client  # type: ignore[attr-defined]
        keys = (lock.name, _record_key(lock))
        return bool(client.eval(_RECORD_SCRIPT, 2, *keys, lock_token, str(token), record))

    def _keep(self, lock: Any) -> None:
        """``lock`` was granted: its key is refreshed by every beat until released."""
        token = lock._lock.local.token
        if token is not None:
            with self._held_guard:
                self._held[bytes(lock.name)] = token

    def _forget(self, lock: Any) -> None:
        token = lock._lock.local.token
        with self._held_guard:
            if token is not None and self._held.get(bytes(lock.name)) == token:
                del self._held[bytes(lock.name)]
        self.tooz._acquired_locks.discard(lock)  # type: ignore[attr-defined]

    # -- on the event loop ---------------------------------------------------------------

    def native_async_ready(self) -> bool:
        """A plain TCP or Unix-socket pool (not Sentinel, not TLS) can be mirrored."""
        import redis

        pool = self.tooz._client.connection_pool  # type: ignore[attr-defined]
        return type(pool) is redis.ConnectionPool and pool.connection_class in (
            redis.Connection,
            redis.UnixDomainSocketConnection,
        )

    def _client(self) -> Any:
        if self._async_client is None:
            import redis
            import redis.asyncio
            import redis.lock

            if self._async_closed:
                # A call racing stop(): a client made now would never be closed.
                raise redis.exceptions.ConnectionError("the connection is closed")

            pool = self.tooz._client.connection_pool  # type: ignore[attr-defined]
            connection_class = (
                redis.asyncio.UnixDomainSocketConnection
                if pool.connection_class is redis.UnixDomainSocketConnection
                else redis.asyncio.Connection
            )
            options = {k: v for k, v in pool.connection_kwargs.items() if k in _ASYNC_OPTIONS}
            self._async_client = redis.asyncio.Redis(
                connection_pool=redis.asyncio.ConnectionPool(
                    connection_class=connection_class, **options
                )
            )
            self._async_release = self._async_client.register_script(_RELEASE_SCRIPT)
        return self._async_client

    async def try_acquire_async(self, lock: Any, key: str) -> bool:
        client = self._client()
        if isinstance(lock, RedisRWLock):
            # The token is set before the script is sent (see below).
            script, keys, args = lock.try_call(int(self.lock_ttl * 1000))
            return self._rw_tried(lock, await client.eval(script, len(keys), *keys, *args))
        sync_lock = lock._lock
        token = self._token()
        # Set before the command is sent: a try that fails or gets no answer may have
        # been applied, and has the blocking release run for it (compare and delete:
        # harmless if not granted).
        sync_lock.local.token = token
        granted = await client.set(lock.name, token, nx=True, px=int(sync_lock.timeout * 1000))
        if not granted:
            sync_lock.local.token = None
            return False
        self._keep(lock)
        return True

    async def release_async(self, lock: Any) -> int:
        """Release, telling waiters on the lock's channel.

        Returns how many were told, or -1 if the lock was not ours.
        """
        if isinstance(lock, RedisRWLock):
            call = self._rw_release_call(lock)
            if call is None:
                return -1
            script, keys, args = call
            return int(await self._client().eval(script, len(keys), *keys, *args))
        sync_lock = lock._lock
        token = sync_lock.local.token
        self._forget(lock)
        if token is None:
            return -1
        self._client()
        told = await self._async_release(keys=[lock.name, _channel(lock)], args=[token])
        sync_lock.local.token = None
        return int(told)

    async def watch_releases(self, lock: Any) -> ReleaseSignal | None:
        if self._async_closed:
            return None  # stopping: a new client now would never be closed
        if self._channels is None:
            self._channels = _Channels(self._client())
        return await self._channels.watch(_channel(lock))

    async def unwatch_releases(self, lock: Any, signal: ReleaseSignal) -> None:
        if self._channels is not None:
            await self._channels.unwatch(_channel(lock), signal)
        if isinstance(lock, RedisRWLock) and lock.write:
            # The writer stops waiting (granted, or gone): readers need not wait for it.
            with contextlib.suppress(Exception):
                await self._client().zrem(lock.intent, lock.member)

    async def close_async(self) -> None:
        self._async_closed = True
        channels, self._channels = self._channels, None
        if channels is not None:
            await channels.close()
        client, self._async_client = self._async_client, None
        if client is not None:
            await client.aclose()
            await client.connection_pool.disconnect()  # ours, so the client leaves it open
