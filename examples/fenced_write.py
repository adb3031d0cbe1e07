"""Fencing tokens: a resource that refuses a stale lock holder's write.

A lock with a TTL (or a session) can be lost while its holder is paused — a blocked event
loop, a GC pause, SIGSTOP — and granted to someone else; when the first holder wakes up,
a write it already meant to send still lands. Unless the resource checks a fencing token:
every grant of a name gets a larger one, each write carries its writer's token, and the
resource refuses a write whose token is smaller than one it has seen.

The resource here is a row in a SQLite database (any database does it the same way: a
conditional UPDATE). Run it on Redis to see a real stale holder:

    AIOTOOZ_BACKEND_URL='redis://127.0.0.1:6379?lock_timeout=1' python examples/fenced_write.py

On a backend whose locks never expire (the default file backend), the stale write is
played by a write sent late with an old token.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

import anyio

from aiotooz import CoordinationSettings, Coordinator, Lock


class Account:
    """The protected resource: a balance, and the largest fencing token seen so far."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE account (balance INTEGER, fence INTEGER)")
        self.db.execute("INSERT INTO account VALUES (100, 0)")
        self.db.commit()

    def write(self, balance: int, token: int) -> bool:
        """Store ``balance`` unless a writer with a larger token came first."""
        done = self.db.execute(
            "UPDATE account SET balance = ?, fence = ? WHERE fence <= ?", (balance, token, token)
        )
        self.db.commit()
        return done.rowcount == 1

    def balance(self) -> int:
        """The balance stored now."""
        return int(self.db.execute("SELECT balance FROM account").fetchone()[0])


async def main() -> None:
    settings = CoordinationSettings(heartbeat=0.2)
    print(f"backend: {settings.redacted_backend_url}")
    with tempfile.TemporaryDirectory() as tmp:
        account = Account(Path(tmp) / "bank.sqlite")
        # Two coordinators: two processes, as far as the backend can tell.
        async with (
            Coordinator(prefix="fenced-", settings=settings) as coordinator,
            Coordinator(prefix="fenced-", settings=settings) as other,
        ):
            first = Lock("account", coordinator=coordinator, fencing=True, cancel_on_loss=False)
            async with first:
                stale_token = first.fencing_token
                print(f"worker 1 holds the lock with token {stale_token}")
                if settings.scheme != "file":
                    # The event loop is blocked past the lock's TTL: the lock expires.
                    time.sleep(1.5)  # noqa: ASYNC251 - the point: a blocked loop
                    print(f"worker 1 woke up; lock lost: {first.lost}")
                    await take_turn(other, account, "worker 2", balance=50)
            if settings.scheme == "file":
                await take_turn(other, account, "worker 2", balance=50)
            # Worker 1's write, sent late with its old token, is refused.
            accepted = account.write(balance=0, token=stale_token)
            print(f"worker 1 writes balance 0 with token {stale_token}: accepted={accepted}")
            assert not accepted
            assert account.balance() == 50
            print(f"balance: {account.balance()} (the stale write never landed)")


async def take_turn(coordinator: Coordinator, account: Account, who: str, balance: int) -> None:
    async with Lock("account", coordinator=coordinator, fencing=True) as lock:
        accepted = account.write(balance, lock.fencing_token)
        print(f"{who} writes balance {balance} with token {lock.fencing_token}: {accepted=}")


if __name__ == "__main__":
    anyio.run(main)
