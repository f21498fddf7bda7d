"""The `locks`, `lock` and `unlock` subcommands; each handler returns the exit status and raises SockrepairError
subclasses for the main CLI to print."""

from __future__ import annotations

import argparse
from typing import Any

from sockrepair.cli.args import netns_arg, ttl_arg, tuple_arg
from sockrepair.cli.output import print_json
from sockrepair.errors import LockError
from sockrepair.lock.locker import DEFAULT_TTL, Locker, LockRecord
from sockrepair.lock.owner import DEFAULT_LABEL


def add_lock_commands(subparsers: Any) -> None:
    """Register `locks`, `lock` and `unlock` on an argparse subparsers object; each sets `func(args) -> int`."""
    netns_help = "act in this network namespace (a name from `ip netns list`)"
    tuple_help = "connection as LOCAL->REMOTE, e.g. 127.0.0.1:5000->127.0.0.1:6000 or [::1]:5000->[::1]:6000"

    p = subparsers.add_parser("locks", help="list locked connections with time left, recording group and owner")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--netns", metavar="NAME", type=netns_arg, help=netns_help)
    p.set_defaults(func=cmd_locks)

    p = subparsers.add_parser("lock", help="drop a connection's packets (both ways) until unlocked or expired")
    p.add_argument("tuples", nargs="+", type=tuple_arg, metavar="TUPLE", help=tuple_help)
    p.add_argument("--ttl", type=ttl_arg, default=DEFAULT_TTL, metavar="S", help=f"seconds (default {DEFAULT_TTL:g})")
    p.add_argument("--label", help=f"who is locking, stored with the lock before pid and host (default: "
                   f"{DEFAULT_LABEL})")
    p.add_argument("--netns", metavar="NAME", type=netns_arg, help=netns_help)
    p.set_defaults(func=cmd_lock)

    p = subparsers.add_parser("unlock", help="release locked connections (not locked: nothing to do)")
    p.add_argument("tuples", nargs="*", type=tuple_arg, metavar="TUPLE", help=tuple_help)
    p.add_argument("--all", action="store_true",
                   help=f"release every lock of one owner (--owner; default {DEFAULT_LABEL!r}, the label of "
                   "`sockrepair lock` and `sockrepair dump`), listing each; other owners' locks stay")
    p.add_argument("--owner", metavar="LABEL", help="with --all: the owner's label, as `sockrepair locks` shows it "
                   "before pid=... (e.g. sockrepair-criu)")
    p.add_argument("--everything", action="store_true",
                   help="remove every owner's locks and sockrepair's nftables table, listing each lock removed")
    p.add_argument("--netns", metavar="NAME", type=netns_arg, help=netns_help)
    p.set_defaults(func=cmd_unlock)


def _format(records: list[LockRecord]) -> str:
    if not records:
        return "no locked connections"
    # KEPT: the nfnetlink_log group the peer's packets are copied to before they are dropped ("-": only dropped)
    rows = [(str(r.tuple), f"{r.seconds_left:.1f}s", f"{r.ttl:g}s", "-" if r.group is None else str(r.group), r.owner)
            for r in records]
    head = ("CONNECTION", "LEFT", "TTL", "KEPT", "OWNER")
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


def _removed(records: list[LockRecord]) -> None:
    for r in records:
        print(f"  {r.tuple}  owner {r.owner or '(none)'}")


def cmd_unlock(args: argparse.Namespace) -> int:
    if sum((bool(args.tuples), args.all, args.everything)) != 1:
        raise LockError("unlock: give TUPLE... or --all [--owner LABEL] or --everything (exactly one)")
    if args.owner is not None and not args.all:
        raise LockError("unlock: --owner goes with --all")
    with Locker(args.netns) as locker:
        if args.tuples:
            # counted from the listing: a tuple that is not locked is skipped silently by the kernel, and the other
            # direction of a locked one (as the peer's side writes it) is another key that locks nothing here
            locked = {r.tuple.wire() for r in locker.list_locks()}
            given = list(dict.fromkeys(t.wire() for t in args.tuples))
            locker.unlock(args.tuples)
            print(f"unlocked {sum(t in locked for t in given)} connection(s)")
            for t in given:
                if t not in locked:
                    back = t.reversed()
                    hint = f": its other direction is, `sockrepair unlock {back}`" if back in locked else ""
                    print(f"  {t}  was not locked{hint}")
        elif args.all:
            label = DEFAULT_LABEL if args.owner is None else args.owner
            removed = locker.unlock_owned(label)
            others = len(locker.list_locks())
            print(f"unlocked {len(removed)} connection(s) of owner {label!r}; {others} lock(s) of other owners kept")
            _removed(removed)
        else:
            removed = locker.list_locks()
            locker.unlock_all()
            print(f"removed every lock ({len(removed)}, of any owner) and the sockrepair table")
            _removed(removed)
    return 0
