"""Read-write locks on Redis: scripts over a readers set, a writer key and writer intents.

One lock's keys share a hash tag, the family key in braces, so that they live in one
slot of a Redis Cluster and one script may touch them all:

* ``<ns>_{<family>}_rw_readers``: a sorted set, each reader's token scored by the
  server time (ms) it expires at; refreshed by every beat, as locks are.
* ``<ns>_{<family>}_rw_writer``: the writer's token, with the lock TTL (a plain lock
  key: the beat's refresh script keeps it, as it keeps every lock).
* ``<ns>_{<family>}_rw_intent``: a sorted set of the coordinators whose writer waits,
  each scored by when that mark lapses (``INTENT_MS``): every failed write try sets it
  again, a grant or the end of the writer's watch removes it, and a writer that went
  away without either holds readers back for at most that long.
* ``<ns>_{<family>}_rw_fence``: the writers' fencing counter.

A reader is let in only while there is no writer and no live intent (writer
preference); a writer only while there is no writer and no live reader. A release
publishes on ``<ns>_{<family>}_rw_released`` when it frees the lock for a waiter (the
last reader, or a writer), which wakes waiters as a lock's release does.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Final, final

__all__ = ["INTENT_MS", "READERS_REFRESH_SCRIPT", "RedisRWLock"]

#: How long a waiting writer's intent holds readers back after its last failed try. A
#: waiting writer tries at least every 50 ms (the poll cap), or at once when woken.
INTENT_MS: Final = 500

#: The server's clock in ms, as the scripts read it.
_NOW = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: readers, writer, intent. ARGV: token, ttl ms. 1 if granted.
_TRY_READ = (
    _NOW
    + """
if redis.call('exists', KEYS[2]) == 1 then return 0 end
redis.call('zremrangebyscore', KEYS[3], '-inf', now)
if redis.call('zcard', KEYS[3]) > 0 then return 0 end
redis.call('zadd', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[2])
return 1
"""
)

#: KEYS: readers, writer, intent. ARGV: token, ttl ms, member, intent ms. 1 if granted;
#: else the member's intent is set (again).
_TRY_WRITE = (
    _NOW
    + """
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
if redis.call('exists', KEYS[2]) == 0 and redis.call('zcard', KEYS[1]) == 0 then
  redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
  redis.call('zrem', KEYS[3], ARGV[3])
  return 1
end
redis.call('zadd', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
redis.call('pexpire', KEYS[3], ARGV[4])
return 0
"""
)

#: KEYS: readers, channel. ARGV: token. -1 if not ours, else how many were told.
_RELEASE_READ = (
    _NOW
    + """
if redis.call('zrem', KEYS[1], ARGV[1]) == 0 then return -1 end
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
if redis.call('zcard', KEYS[1]) > 0 then return 0 end
return redis.call('publish', KEYS[2], '')
"""
)

#: KEYS: writer, channel. ARGV: token. As tooz's release, telling waiters.
_RELEASE_WRITE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('del', KEYS[1])
return redis.call('publish', KEYS[2], '')
"""

#: One beat for the readers held: ARGV[1] the TTL in ms, ARGV[2] the readers' set keys
#: and ARGV[3] their tokens, joined by newlines. Each reader still in its set is scored
#: again; the answer is the (1-based) positions of those that are not (they expired).
#: Keys named in ARGV: fine on one Redis, not on Redis Cluster (as the locks' refresh).
READERS_REFRESH_SCRIPT: Final = (
    _NOW
    + """
local lost = {}
local tokens = {}
for token in string.gmatch(ARGV[3], '[^\\n]+') do tokens[#tokens + 1] = token end
local i = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  i = i + 1
  local score = redis.call('zscore', key, tokens[i])
  if score and tonumber(score) > now then
    redis.call('zadd', key, now + tonumber(ARGV[1]), tokens[i])
    redis.call('pexpire', key, ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""
)


@final
class RedisRWLock:
    """One reader's or writer's lock on a read-write lock's keys.

    Args:
        namespace: tooz's key namespace.
        family: the family key (``aiotooz._names.split_rw_key``).
        write: a writer or a reader.
        member: the coordinator's member id (a waiting writer's intent).
    """

    __slots__ = ("fence", "intent", "member", "name", "readers", "token", "write", "writer")

    def __init__(self, namespace: bytes, family: str, write: bool, member: bytes) -> None:
        base = b"%s_{%s}_rw" % (namespace, family.encode("ascii"))
        #: The base of the keys (the release channel is ``name + b"_released"``).
        self.name: bytes = base
        self.readers = base + b"_readers"
        self.writer = base + b"_writer"
        self.intent = base + b"_intent"
        self.fence = base + b"_fence"
        self.write = write
        self.member = member
        #: The token of this grant (set before a try is sent), or ``None``.
        self.token: bytes | None = None

    def new_token(self) -> bytes:
        self.token = uuid.uuid4().hex.encode()
        return self.token

    def try_call(self, ttl_ms: int) -> tuple[str, Sequence[bytes], Sequence[Any]]:
        """The script, keys and arguments of one try (sets a new token)."""
        token = self.new_token()
        keys = (self.readers, self.writer, self.intent)
        if self.write:
            return _TRY_WRITE, keys, (token, ttl_ms, self.member, INTENT_MS)
        return _TRY_READ, keys, (token, ttl_ms)

    def release_call(self, channel: bytes) -> tuple[str, Sequence[bytes], Sequence[Any]] | None:
        """The script, keys and arguments of the release (clears the token), or ``None``."""
        token, self.token = self.token, None
        if token is None:
            return None
        if self.write:
            return _RELEASE_WRITE, (self.writer, channel), (token,)
        return _RELEASE_READ, (self.readers, channel), (token,)
