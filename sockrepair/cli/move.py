"""CLI commands that move connections of running programs: dump, inspect, restore."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from sockrepair.cli.args import netns_arg, ttl_arg, uid_arg
from sockrepair.cli.output import print_json
from sockrepair.criu.show import load_states as load_criu_states
from sockrepair.errors import HandoffError
from sockrepair.image.directory import read_dir
from sockrepair.image.text import head_line, state_lines
from sockrepair.move.dump import After, dump, inspect
from sockrepair.move.handoff import (
    connect_receiver,
    exec_with_sockets,
    send_to_receiver,
)
from sockrepair.move.keep import netns_path, read_kept, send_kept
from sockrepair.move.land import restore_all, unlock_in


def _fds(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an fd number: {text!r}") from None


def add_move_commands(sub: Any) -> None:
    p = sub.add_parser("dump", help="checkpoint the TCP connections of a running process into image files")
    p.add_argument("--pid", type=int, required=True, help="the process holding the connections")
    p.add_argument("--fd", type=_fds, action="append",
                   help="only this fd (repeatable); default: every connection (established, connecting or half-closed)")
    p.add_argument("-D", "--dir", required=True, type=Path,
                   help="directory for the images: created 0700, or an empty one of yours that others cannot write")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--leave-running", action="store_true", help="the connections go on in the process")
    how.add_argument("--kill", action="store_true", help="silence the connections and kill the process (default)")
    p.add_argument("--no-lock", action="store_true", help="do not drop the peers' packets meanwhile (they get RST)")
    p.add_argument("--allow-loss", action="store_true",
                   help="with --kill: dump what can be moved even if the kill resets other connections (listed)")
    p.add_argument("--ttl", type=ttl_arg, default=60.0, help="seconds the lock holds without a restore (default 60)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("inspect", help="exact view of a process's TCP connections (non-destructive)")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("restore", help="restore dumped connections and hand them to a program")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-D", "--dir", type=Path, help="directory written by `sockrepair dump`")
    src.add_argument("--from-criu", type=Path, metavar="DIR",
                     help="criu image directory (or `sockrepair criu dump` directory): restore its TCP connections")
    p.add_argument("--netns", metavar="NAME", type=netns_arg,
                   help="restore inside this network namespace (ip netns name)")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--exec", nargs=argparse.REMAINDER, dest="exec_argv", metavar="CMD",
                    help="run CMD with the connections as inherited fds 3.. (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES)")
    to.add_argument("--unix", metavar="PATH", help="pass the connections over this UNIX socket (SCM_RIGHTS); its "
                    "directory must be yours or root's and not writable by others, its listener run as root or you")
    p.add_argument("--unix-uid", type=uid_arg, action="append", default=[], metavar="USER",
                   help="with --unix: the listener may also run as this user (name or uid; repeatable)")
    p.set_defaults(func=cmd_restore)


def cmd_dump(args: argparse.Namespace) -> int:
    report = dump(args.pid, args.dir, args.fd, After.LEAVE_RUNNING if args.leave_running else After.KILL,
                  lock=not args.no_lock, ttl=args.ttl, allow_loss=args.allow_loss)
    if args.json:
        print_json(report.to_dict())
        return 0
    print(f"dumped {len(report.connections)} connection(s) of {report.command} (pid {report.pid}) into "
          f"{report.directory}, process {'left running' if args.leave_running else 'killed'}")
    for c in report.connections:
        print(f"  fd {c['fd']:<4} {c['tuple']:<48} unread {c['recv_queue']} B, send queue {c['send_queue']} B "
              f"({c['unsent']} never sent)")
    if report.lost:
        print(f"  {len(report.lost)} connection(s) could not be moved; the kill closed them (reset, with unread data):")
        for u in report.lost:
            print(f"  fd {u['fd']:<4} {u['protocol']} {u['tuple']} {u['state']}: {u['reason']}")
    print("  " + ", ".join(f"{k} {v:.2f} ms" for k, v in report.phases_ms.items()))
    if not args.leave_running and not args.no_lock:
        print(f"  the connections stay locked for {args.ttl:g} s: restore them before then")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    rows = inspect(args.pid)
    if args.json:
        out = [{"fd": s.fd, "tuple": str(s.tuple), "state": name,
                **({"checkpoint": st.to_dict()} if st is not None else {})} for s, st, name in rows]
        print_json(out)
        return 0
    if not rows:
        print(f"process {args.pid} has no TCP sockets")
    for s, st, name in rows:
        head = f"fd {s.fd:<4} "
        print("\n".join(state_lines(st, head)) if st is not None else head_line(s.tuple, name, head))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    kept: list[bytes] = []
    if args.from_criu is not None:
        states = load_criu_states(args.from_criu)
    else:
        states = [state for _, state in read_dir(args.dir)]
        kept = read_kept(args.dir, [s.tuple for s in states])
    if args.unix_uid and not args.unix:
        raise HandoffError("--unix-uid goes with --unix")
    if args.exec_argv is not None:
        if not args.exec_argv or shutil.which(args.exec_argv[0]) is None:
            raise HandoffError(f"--exec: no such program {args.exec_argv[0] if args.exec_argv else '(none given)'}")
    # The receiver is checked (and connected to) before any connection is restored for it.
    receiver = connect_receiver(args.unix, args.unix_uid) if args.unix else None
    try:
        socks = restore_all(states, args.netns)
        delivered = send_kept(kept, netns_path(args.netns))
        unlock_in(args.netns, states)
        conns = [s.tuple for s in states]
        print(f"restored {len(socks)} connection(s) from {args.from_criu or args.dir}"
              + (f"; delivered {delivered} packet(s) their peers sent while locked" if delivered else ""),
              file=sys.stderr)
        if receiver is not None:
            send_to_receiver(receiver, socks, conns)
            return 0
    finally:
        if receiver is not None:
            receiver.close()
    exec_with_sockets(args.exec_argv, socks, conns)
    return 0  # not reached: exec replaced this process
