"""The `locks`, `lock` and `unlock` subcommands; each handler returns the exit status and raises SockrepairError
subclasses for the main CLI to print."""

from __future__ import annotations

import argparse
from typing import Any

from sockrepair.cli.args import ttl_arg, tuple_arg
from sockrepair.cli.output import print_json
from sockrepair.errors import LockError
from sockrepair.lock.locker import DEFAULT_TTL, Locker, LockRecord


def add_lock_commands(subparsers: Any) -> None:
    """Register `locks`, `lock` and `unlock` on an argparse subparsers object; each sets `func(args) -> int`."""
    netns_help = "act in this network namespace (a name from `ip netns list`)"
    tuple_help = "connection as LOCAL->REMOTE, e.g. 127.0.0.1:5000->127.0.0.1:6000 or [::1]:5000->[::1]:6000"

    p = subparsers.add_parser("locks", help="list locked connections with time left and owner")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--netns", metavar="NAME", help=netns_help)
    p.set_defaults(func=cmd_locks)

    p = subparsers.add_parser("lock", help="drop a connection's packets (both ways) until unlocked or expired")
    p.add_argument("tuples", nargs="+", type=tuple_arg, metavar="TUPLE", help=tuple_help)
    p.add_argument("--ttl", type=ttl_arg, default=DEFAULT_TTL, metavar="S", help=f"seconds (default {DEFAULT_TTL:g})")
    p.add_argument("--label", help="who is locking, stored with the lock before pid and host (default: sockrepair)")
    p.add_argument("--netns", metavar="NAME", help=netns_help)
    p.set_defaults(func=cmd_lock)

    p = subparsers.add_parser("unlock", help="release locked connections (not locked: nothing to do)")
    p.add_argument("tuples", nargs="*", type=tuple_arg, metavar="TUPLE", help=tuple_help)
    p.add_argument("--all", action="store_true", help="remove every lock and sockrepair's nftables table")
    p.add_argument("--netns", metavar="NAME", help=netns_help)
    p.set_defaults(func=cmd_unlock)


def _format(records: list[LockRecord]) -> str:
    if not records:
        return "no locked connections"
    rows = [(str(r.tuple), f"{r.seconds_left:.1f}s", f"{r.ttl:g}s", r.owner) for r in records]
    head = ("CONNECTION", "LEFT", "TTL", "OWNER")
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in (head, *rows))


def cmd_locks(args: argparse.Namespace) -> int:
    with Locker(args.netns) as locker:
        records = locker.list_locks()
    if args.json:
        print_json([r.to_dict() for r in records])
    else:
        print(_format(records))
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    with Locker(args.netns, args.label) as locker:
        count = locker.lock(args.tuples, args.ttl)
    print(f"locked {count} connection(s) for {args.ttl:g}s")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    if args.all == bool(args.tuples):
        raise LockError("unlock: give TUPLE... or --all (not both)")
    with Locker(args.netns) as locker:
        if args.all:
            locker.unlock_all()
        else:
            locker.unlock(args.tuples)
    print("removed every lock and the sockrepair table" if args.all else f"unlocked {len(args.tuples)} connection(s)")
    return 0
