"""CLI commands that move connections of running programs: dump, inspect, restore."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from sockrepair.cli.args import netns_arg, ttl_arg, uid_arg
from sockrepair.cli.output import print_json
from sockrepair.criu.show import load_states as load_criu_states
from sockrepair.errors import HandoffError, ImageError
from sockrepair.image.text import head_line, state_lines
from sockrepair.move.dump import After, dump, inspect
from sockrepair.move.handoff import (
    SD_LISTEN_FDS_START,
    connect_receiver,
    exec_with_sockets,
    runnable,
    send_to_receiver,
)
from sockrepair.move.journal import (
    load_states,
    mark_completed,
    note_relock,
    read_source,
    stale_reason,
    wait_free,
)
from sockrepair.move.keep import Keeper, Kept, netns_path, resume_keeping
from sockrepair.move.land import put_back, restore_all, unlock_in
from sockrepair.move.procfs import stat
from sockrepair.move.quiesce import DEFAULT_TIMEOUT, OnBusy, Quiescence
from sockrepair.move.take import deferred_signals
from sockrepair.state import ConnectionState

RELOCK_TTL = 60.0


def _fds(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an fd number: {text!r}") from None


def _quiesce_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 600:
        raise argparse.ArgumentTypeError(f"quiesce timeout must be in [0, 600] seconds, not {text}")
    return value


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
    p.add_argument("--busy", choices=[b.value for b in OnBusy], default=OnBusy.REFUSE.value,
                   help="a program still busy (not waiting in poll/select/accept/read...) when --quiesce-timeout "
                   "ends: refuse (default: nothing is moved, it goes on) or move it anyway (a request it has read and "
                   "not answered is lost)")
    p.add_argument("--quiesce-timeout", type=_quiesce_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to try freezing the program while every thread waits (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("inspect", help="exact view of a process's TCP connections (non-destructive)")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("restore", help="restore dumped connections and hand them to a program")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-D", "--dir", type=Path,
                     help="directory written by `sockrepair dump`, or the journal of a move that stopped half-way")
    src.add_argument("--from-criu", type=Path, metavar="DIR",
                     help="criu image directory (or `sockrepair criu dump` directory): restore its TCP connections")
    p.add_argument("--netns", metavar="NAME", type=netns_arg,
                   help="restore inside this network namespace (ip netns name); default: the one the images were "
                   "taken in, as their index records it")
    p.add_argument("--force", action="store_true",
                   help="restore images that look stale (the source went on, the lock expired, already restored)")
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
                  lock=not args.no_lock, ttl=args.ttl, allow_loss=args.allow_loss,
                  quiescence=Quiescence(args.quiesce_timeout, OnBusy(args.busy)))
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
    if report.left_behind:
        fds = ", ".join(map(str, report.left_behind))
        print(f"  fd(s) {fds} were already in repair mode in the stopped process (an interrupted move): "
              + ("resumed, and the process continued" if args.leave_running else "moved with the others"))
    if report.quiescent:
        print(f"  frozen while every thread waited ({report.freeze_method}, {report.freeze_attempts} attempt(s))")
    else:
        print(f"  warning: moved while busy after {report.freeze_attempts} attempt(s) ({'; '.join(report.busy)}): "
              "a request the program had read and not answered is lost")
    print("  " + ", ".join(f"{k} {v:.2f} ms" for k, v in report.phases_ms.items()))
    if not args.leave_running and not args.no_lock:
        print(f"  the connections stay locked for {args.ttl:g} s: restore them before then")
        print(f"  kept {report.kept.delivered} packet(s) their peers sent during the dump"
              + (f"; {report.kept.note}" if report.kept.note else ""))
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
    proc = stat(args.pid)
    stuck = [s.fd for s, _, name in rows if name.endswith("(in repair mode)")]
    if proc is not None and proc.state == "T" and stuck:
        print(f"note: process {args.pid} is stopped with fd(s) {', '.join(map(str, stuck))} in repair mode, as a "
              f"move killed half-way leaves it: `sockrepair dump --pid {args.pid} -D DIR --leave-running` takes them "
              f"out of repair mode and continues it (or --kill, then `sockrepair restore -D DIR`, finishes the move)",
              file=sys.stderr)
    for s, st, name in rows:
        head = f"fd {s.fd:<4} "
        print("\n".join(state_lines(st, head)) if st is not None else head_line(s.tuple, name, head))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:
        return _restore(args, held)


def _restore(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    kept: list[bytes] = []
    keeper = Keeper([])
    if args.from_criu is not None:
        states = load_criu_states(args.from_criu)
    else:
        # a move killed a moment ago may have left its guard still saving the connections here: wait for it; the
        # lock, kept until this process exits, also keeps a second restore of DIR out
        # held until the restore ended
        held.callback(os.close, wait_free(args.dir))
        why = None if args.force else stale_reason(args.dir)
        if why is not None:
            raise ImageError(f"{args.dir}: not restoring stale images: {why} (--force restores them anyway)",
                             path=str(args.dir))
        states = load_states(args.dir)
        if args.netns is None:
            # where the connections were: their local addresses are configured there, and their peers locked out
            args.netns = read_source(args.dir).netns
    conns = [s.tuple for s in states]
    source = args.from_criu or args.dir
    if args.unix_uid and not args.unix:
        raise HandoffError("--unix-uid goes with --unix")
    # the handoff's target is checked before anything is restored: a wrong path must not cost the connections
    if args.exec_argv is not None:
        runnable(args.exec_argv[0] if args.exec_argv else "")
        unix = None
    else:
        unix = connect_receiver(args.unix, args.unix_uid)
    if args.dir is not None:
        # after the handoff's checks, so that a wrong target leaves the dump's keeper keeping; before the restore,
        # so that a damaged kept.img stops it while the connections are safe in their images
        kept, keeper = resume_keeping(args.dir, conns)
        held.callback(keeper.close)
    with contextlib.ExitStack() as stack:
        if unix is not None:
            stack.enter_context(unix)
        with deferred_signals():
            socks = restore_all(states, args.netns)
            report = keeper.deliver(conns, netns_path(args.netns), before=kept)
            if unix is not None:
                try:
                    # passed before the unlock: if that fails, the connections are still locked and can be put back
                    send_to_receiver(unix, socks, conns)
                except HandoffError as exc:
                    _put_back([s.detach() for s in socks], states, args, exc)
                    raise
            unlock_in(args.netns, states)
            report = keeper.deliver(conns, netns_path(args.netns))  # what the lock stopped meanwhile
            if args.dir is not None:
                mark_completed(args.dir, created=False)
        print(f"restored {len(socks)} connection(s) from {source}{_kept_text(report)}", file=sys.stderr)
        if unix is not None:
            return 0
    # marked completed above, so a second restore refuses DIR anyway; and exec_with_sockets places the sockets at
    # fds 3.., where the held lock's fd may be
    held.close()
    try:
        exec_with_sockets(args.exec_argv, socks, conns)
    except HandoffError as exc:
        # exec_with_sockets moved the sockets to fds 3.. before the exec failed
        for s in socks:
            s.detach()
        _put_back(list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(socks))), states, args, exc)
        raise
    return 0  # not reached: exec replaced this process


def _kept_text(kept: Kept) -> str:
    text = f"; delivered {kept.delivered} packet(s) their peers sent while locked" if kept.delivered else ""
    if kept.fell_back:
        text += f"; {kept.fell_back} packet(s) fell back to the peers' retransmission"
    return text + (f" ({kept.note})" if kept.note else "")


def _put_back(fds: list[int], states: list[ConnectionState], args: argparse.Namespace, exc: BaseException) -> None:
    """Lock the connections again and close their restored sockets silently; `exc` says how to retry."""
    put_back(fds, states, args.netns, RELOCK_TTL)
    retry = ""
    if args.dir is not None:
        retry = f" `sockrepair restore -D {args.dir}{' --netns ' + args.netns if args.netns else ''} ...`"
        note_relock(args.dir, time.time() + RELOCK_TTL)
    exc.add_note(f"the connections were locked again for {RELOCK_TTL:g} s and their restored sockets closed "
                 f"silently: fix the handoff's target and restore again{retry} before then")
