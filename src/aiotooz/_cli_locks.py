"""``aiotooz locks``: who holds which lock, and breaking one, from a shell.

``list`` and ``show`` print :meth:`Coordinator.holders` and :meth:`Coordinator.holder`
as a table (or JSON); ``break`` is :meth:`Coordinator.break_lock`, after a confirmation
when it runs at a terminal. They take the same settings as ``aiotooz run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Final

import anyio

from ._coordinator import Coordinator
from ._exceptions import ConfigurationError, CoordinationError
from ._holders import Holder
from ._names import check_name
from ._settings import CoordinationSettings

__all__ = ["EXIT_NOT_HELD", "EXIT_REFUSED", "add_locks_parser", "locks_main"]

#: ``break``: the backend refused (it cannot break locks) or failed; the reason is printed.
#: As sysexits' EX_UNAVAILABLE, the status ``run`` gives an unreachable backend.
EXIT_REFUSED: Final = 69
#: ``break``: nobody held the lock, so nothing was broken (``show``: not held).
EXIT_NOT_HELD: Final = 1
#: Bad settings or backend URL (sysexits' EX_CONFIG), as for ``run``.
_EXIT_CONFIG: Final = 78

_EPILOG: Final = f"""\
exit status:
  0    listed, shown, or broken
  {EXIT_NOT_HELD}    show, break: nobody holds the lock
  2    bad usage; break: not confirmed (no terminal, and no --yes)
  {EXIT_REFUSED}   the backend refused (it cannot list or break locks: the reason is
       printed) or could not be reached
  {_EXIT_CONFIG}   bad settings or backend URL, or a missing client library

Fields a backend cannot know are shown as "-" (null in JSON); see the operations docs.
"""

_COLUMNS: Final = ("NAME", "MEMBER", "PID", "HOST", "HELD FOR", "TOKEN", "WAITERS")


def add_locks_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """The ``locks`` command and its ``list``, ``show`` and ``break`` subcommands."""
    locks = sub.add_parser(
        "locks",
        help="list who holds locks, show one, or break one",
        description="See who holds which lock, and break a lock another process holds.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = locks.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="the locks held now, under --prefix",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument(
        "starting", nargs="?", default="", metavar="NAME_PREFIX", help="only names starting so"
    )
    listing.add_argument("--json", action="store_true", help="print JSON, one list")
    show = actions.add_parser(
        "show",
        parents=[common],
        help="who holds one lock",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print JSON (null: not held)")
    breaking = actions.add_parser(
        "break",
        parents=[common],
        help="free a lock another process holds (it is told, and fenced out)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    breaking.add_argument("name", metavar="NAME")
    breaking.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def locks_main(args: argparse.Namespace, settings: CoordinationSettings) -> int:
    """Run ``aiotooz locks ACTION``; the exit status."""
    try:
        if args.action != "list":
            check_name(args.name)
        return anyio.run(_locks, args, settings)
    except ConfigurationError as exc:
        _say(args.action, f"{type(exc).__name__}: {exc}")
        return _EXIT_CONFIG
    except CoordinationError as exc:
        _say(args.action, f"{type(exc).__name__}: {exc}")
        return EXIT_REFUSED


async def _locks(args: argparse.Namespace, settings: CoordinationSettings) -> int:
    async with Coordinator(prefix=args.prefix, settings=settings) as coordinator:
        if args.action == "list":
            holders = [holder async for holder in coordinator.holders(args.starting)]
            if args.json:
                print(json.dumps([dataclasses.asdict(holder) for holder in holders], indent=2))
            else:
                _table(holders)
            return 0
        holder = await coordinator.holder(args.name)
        if args.action == "show":
            if args.json:
                print(json.dumps(None if holder is None else dataclasses.asdict(holder), indent=2))
            elif holder is not None:
                _table([holder])
            else:
                print(f"{args.name}: not held")
            return 0 if holder is not None else EXIT_NOT_HELD
        if holder is not None:
            _table([holder])
        if not args.yes:
            if not sys.stdin.isatty():
                _say("break", "not a terminal to confirm at: pass --yes to break without asking")
                return 2
            answer = await anyio.to_thread.run_sync(input, f"break {args.name!r}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                _say("break", "not confirmed: nothing done")
                return 2
        if not await coordinator.break_lock(args.name):
            print(f"{args.name}: not held: nothing to break")
            return EXIT_NOT_HELD
        print(f"{args.name}: broken; its holder is told at its next heartbeat")
        return 0


def _table(holders: list[Holder]) -> None:
    """Print ``holders`` as a table with a header (unknown fields as "-")."""
    now = time.time()
    rows: list[tuple[str, ...]] = [_COLUMNS]
    for holder in holders:
        held = "-" if holder.since is None else f"{max(0.0, now - holder.since):.1f}s"
        cells = (holder.name, holder.member_id, holder.pid, holder.host)
        rows.append(
            (
                *("-" if cell is None else str(cell) for cell in cells),
                held,
                "-" if holder.fencing_token is None else str(holder.fencing_token),
                "-" if holder.waiters is None else str(holder.waiters),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _say(action: str, message: str) -> None:
    print(f"aiotooz locks {action}: {message}", file=sys.stderr)
