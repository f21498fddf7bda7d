"""CLI commands that move connections of running programs: dump, inspect, restore."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sockrepair.cli.args import netns_arg, path_arg, socket_path_arg, ttl_arg, uid_arg
from sockrepair.cli.output import print_json
from sockrepair.criu.manifest import is_dump_dir
from sockrepair.criu.manifest import load as load_manifest
from sockrepair.criu.show import load_states as load_criu_states
from sockrepair.errors import HandoffError, ImageError
from sockrepair.image.directory import NO_FD
from sockrepair.image.text import head_line, state_lines
from sockrepair.lock import Locker
from sockrepair.move.ask import ask_peers
from sockrepair.move.dump import IN_REPAIR, After, dump, inspect
from sockrepair.move.handoff import (
    SD_LISTEN_FDS_START,
    connect_receiver,
    exec_with_sockets,
    runnable,
    send_to_receiver,
)
from sockrepair.move.journal import (
    COMPLETED,
    Source,
    load_states,
    mark_completed,
    mark_handed,
    note_relock,
    pending_journals,
    read_handed,
    read_source,
    stale_reason,
    wait_free,
)
from sockrepair.move.keep import Keeper, Kept, netns_path, resume_keeping, saved_to
from sockrepair.move.land import (
    give_saved_marks,
    mark_passing,
    put_back,
    restore_all,
    unlock_in,
)
from sockrepair.move.procfs import stat
from sockrepair.move.quiesce import DEFAULT_TIMEOUT, OnBusy, Quiescence
from sockrepair.move.restoreguard import RestoreGuard
from sockrepair.move.stages import Stage, Timings
from sockrepair.netns import named
from sockrepair.sigmask import deferred_signals
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
                   help="only this fd (repeatable); default: every connection (established, connecting, half-closed, or "
                        "closed while the process held it)")
    p.add_argument("-D", "--dir", required=True, type=path_arg,
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
    src.add_argument("-D", "--dir", type=path_arg,
                     help="directory written by `sockrepair dump`, or the journal of a move that stopped half-way")
    src.add_argument("--from-criu", type=path_arg, metavar="DIR",
                     help="criu image directory (or `sockrepair criu dump` directory): restore its TCP connections")
    src.add_argument("--pending", action="store_true",
                     help="list the journals of moves that stopped half-way (a migrate() killed after it ended its "
                     "program) in /run/sockrepair and the temporary directory, and whether -D restores each")
    p.add_argument("--netns", metavar="NAME", type=netns_arg,
                   help="restore inside this network namespace (ip netns name); default: the one the images were "
                   "taken in, as their index records it")
    p.add_argument("--force", action="store_true",
                   help="restore images that look stale (the source went on, the lock expired, already restored)")
    to = p.add_mutually_exclusive_group()
    to.add_argument("--exec", nargs=argparse.REMAINDER, dest="exec_argv", metavar="CMD",
                    help="run CMD with the connections as inherited fds 3.. (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES)")
    to.add_argument("--unix", metavar="PATH", type=socket_path_arg, help="pass the connections over this UNIX socket (SCM_RIGHTS); its "
                    "directory must be yours or root's and not writable by others, its listener run as root or you")
    p.add_argument("--unix-uid", type=uid_arg, action="append", default=[], metavar="USER",
                   help="with --unix: the listener may also run as this user (name or uid; repeatable)")
    p.add_argument("--json", action="store_true", help="with --pending: machine-readable list")
    p.set_defaults(func=cmd_restore, usage_error=p.error)


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
        # NO_FD: one that waited in an accept queue, never the program's
        where = f"fd {c['fd']:<5}" if c["fd"] != NO_FD else "accepted"
        print(f"  {where} {c['tuple']:<48} unread {c['recv_queue']} B, send queue {c['send_queue']} B "
              f"({c['unsent']} never sent)")
    if report.lost:
        print(f"  {len(report.lost)} connection(s) could not be moved; the kill closed them (reset, with unread data):")
        for u in report.lost:
            print(f"  fd {u['fd']:<5} {u['protocol']} {u['tuple']} {u['state']}: {u['reason']}")
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
    stuck = [s.fd for s, _, name in rows if name.startswith(s.state_name + IN_REPAIR)]
    if proc is not None and proc.state == "T" and stuck:
        print(f"note: process {args.pid} is stopped with fd(s) {', '.join(map(str, stuck))} in repair mode, as a "
              f"move killed half-way leaves it: `sockrepair dump --pid {args.pid} -D DIR --leave-running` takes them "
              f"out of repair mode and continues it (or --kill, then `sockrepair restore -D DIR`, finishes the move)",
              file=sys.stderr)
    for s, st, name in rows:
        head = f"fd {s.fd:<4} "
        print("\n".join(state_lines(st, head, name)) if st is not None else head_line(s.tuple, name, head))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    handing = args.exec_argv is not None or args.unix is not None
    if args.pending:
        given = [flag for flag, on in (("--exec", args.exec_argv is not None), ("--unix", args.unix is not None),
                                       ("--unix-uid", bool(args.unix_uid)), ("--netns", args.netns is not None),
                                       ("--force", args.force)) if on]
        if given:
            args.usage_error(f"--pending lists journals: it takes no {', '.join(given)} (options of a restore)")
        return _list_pending(args.json)
    if not handing:
        args.usage_error("one of the arguments --exec --unix is required")
    if args.exec_argv == []:
        # argparse's REMAINDER accepts nothing at all: without this, an empty program name reached the check of the
        # program as if one had been given, "no such program (none given)", exit 1
        args.usage_error("argument --exec: expected CMD [ARGS...] after it")
    _check_arguments(args)
    with contextlib.ExitStack() as held:
        return _restore(args, held)


def _check_arguments(args: argparse.Namespace) -> None:
    """What the command line alone decides, checked before the images are waited for or read: a typo (a namespace
    that does not exist, a program that cannot run) is reported as itself, not hidden behind the state of the
    directory (a move completed already, stale images)."""
    if args.unix_uid and not args.unix:
        raise HandoffError("--unix-uid goes with --unix")
    with named(args.netns):
        pass
    if args.exec_argv is not None:
        runnable(args.exec_argv[0])


def _restore(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    stages = Timings("restore")
    kept: list[bytes] = []
    keeper = Keeper([])
    inherit: list[int] = []
    with stages.timed(Stage.LOAD):
        if args.from_criu is not None:
            states = load_criu_states(args.from_criu)
            why = None if args.force else _criu_stale(args.from_criu, args.netns, states)
            if why is not None:
                raise ImageError(f"{args.from_criu}: not restoring stale images: {why} (--force restores them "
                                 "anyway)", path=str(args.from_criu))
        else:
            # a move killed a moment ago may have left its guard still saving the connections here: wait for it; the
            # lock, kept until this process and the restore's guard are gone, also keeps a second restore of DIR out
            inherit.append(wait_free(args.dir))
            held.callback(os.close, inherit[0])
            states = load_states(args.dir)
            if args.netns is None:
                # where the connections were: their local addresses are configured there, and their peers locked out
                src = read_source(args.dir)
                args.netns = src.netns
                if not args.force:
                    _refuse_another_namespace(args.dir, src)
            states = _unlock_handed(args.dir, args.netns, states)
            if not states:
                return 0
            why = None if args.force else stale_reason(args.dir)
            if why is not None:
                # no --force hint for a completed move: restored again, its connections would exist twice
                hint = "" if (args.dir / COMPLETED).exists() else " (--force restores them anyway)"
                raise ImageError(f"{args.dir}: not restoring stale images: {why}{hint}",
                                 path=str(args.dir))
        conns = [s.tuple for s in states]
        with named(args.netns):  # the one the index names may be gone: that must not cost the keeper either
            pass
        # the handoff's target is checked before anything is restored: a wrong path must not cost the connections
        if args.exec_argv is not None:
            unix = None
        else:
            unix = connect_receiver(args.unix, args.unix_uid)
            held.enter_context(unix)
        if args.dir is not None:
            # after the handoff's checks, so that a wrong target leaves the dump's keeper keeping; before the
            # restore, so that a damaged kept.img stops it while the connections are safe in their images
            kept, keeper = resume_keeping(args.dir, conns)
            held.callback(keeper.close)
    source = args.from_criu or args.dir
    guard = RestoreGuard(conns, args.netns, args.dir, inherit, keeper.sockets(), [s.sockopts.mark for s in states])
    socks: list[socket.socket] = []
    # SOCCR_MARK from the delivery until the unlock, not only during the delivery: the program holds the sockets
    # before the unlock (--unix passes them first; with --exec the guard unlocks after the exec), and an answer it
    # sent meanwhile was dropped by the lock's output chain: the kernel counts such a segment sent, and with nothing
    # in flight the socket waited for its zero-window probe timer (its RTO: 3 s without an RTT sample)
    marked = contextlib.ExitStack()
    handed = completed = False
    try:
        with deferred_signals():
            with stages.timed(Stage.RESTORE):
                asked = ask_peers(keeper, states, netns_path(args.netns))
                socks = restore_all(asked.states, args.netns, on_restored=guard.hold, answered=asked.answered)
            marked.callback(give_saved_marks, socks, states)
            mark_passing(socks)
            with stages.timed(Stage.DELIVER):
                report = keeper.deliver(conns, netns_path(args.netns), before=kept,
                                        save=saved_to(args.dir, keeper) if args.dir is not None else None)
            if unix is not None:
                with stages.timed(Stage.HANDOFF):
                    guard.handing()
                    # passed before the unlock: if that fails, the connections are still locked and can be put back
                    send_to_receiver(unix, socks, conns)
                    handed = True
                    if args.dir is not None:
                        mark_handed(args.dir, conns)
                with stages.timed(Stage.UNLOCK):
                    unlock_in(args.netns, states)
                    marked.close()  # their saved marks back
                    if args.dir is not None:
                        mark_completed(args.dir, created=False)
                    completed = True
                report = keeper.deliver(conns, netns_path(args.netns))  # what the lock stopped meanwhile
                guard.close()
                print(f"restored {len(socks)} connection(s) from {source}{_kept_text(report)}"
                      + " (" + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.ms.items()) + ")", file=sys.stderr)
                return 0
        # the exec's program is given the connections still locked; the guard unlocks them once it holds them (and
        # marks the move completed), or puts them back if this process dies before the exec
        print(f"restored {len(socks)} connection(s) from {source}{_kept_text(report)}; handing them to "
              f"{args.exec_argv[0]} (the guard unlocks them once it runs) ("
              + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.ms.items()) + ")", file=sys.stderr, flush=True)
        held.close()  # exec_with_sockets places the sockets at fds 3.., where the held lock's fd may be
        with stages.timed(Stage.HANDOFF):
            guard.keep_above(SD_LISTEN_FDS_START + len(socks))
            guard.handing()
            # the program runs marked until the guard's unlock, which gives the saved marks back; if the exec fails,
            # the sockets (moved to fds 3.. already: `socks` are stale) are put back in repair mode, which sends
            # nothing whatever the mark
            marked.pop_all()
            exec_with_sockets(args.exec_argv, socks, conns, args.netns)
    except HandoffError as exc:
        marked.close()
        if socks and not handed:
            if args.exec_argv is not None:
                # exec_with_sockets moved the sockets to fds 3.. before the exec failed
                for s in socks:
                    s.detach()
                _put_back(list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(socks))), states, args, exc,
                          keeper)
            else:
                _put_back([s.detach() for s in socks], states, args, exc, keeper)
        guard.close()
        raise
    except BaseException as exc:
        marked.close()  # a program that has them must not keep passing a lock: its packets would pass every later one
        if socks and not handed:
            _put_back([s.detach() for s in socks], states, args, exc, keeper)
        elif not socks and args.dir is not None:
            # nothing was restored (restore_all is all or none): the connections wait, locked as they were
            try:
                expires = read_source(args.dir).lock_expires
            except ImageError:
                expires = None
            if expires is not None and (kept_on := keeper.hand_back(args.dir, conns, expires)):
                exc.add_note(kept_on)
        elif handed and not completed and args.dir is not None:
            exc.add_note(f"the connections were handed off, perhaps still locked: `sockrepair restore -D {args.dir} "
                         "...` again unlocks them")
        guard.close()
        raise
    return 0  # not reached: exec replaced this process


def _list_pending(as_json: bool) -> int:
    found = pending_journals()
    if as_json:
        print_json([p.to_dict() for p in found])
        return 0
    if not found:
        print("no move stopped half-way: no pending journal in /run/sockrepair or the temporary directory")
    now = time.time()
    for p in found:
        src = p.source
        what = (f"{p.connections} connection(s)" + (f" of process {src.pid}" if src.pid is not None else "")
                + (f" (netns {src.netns})" if src.netns else ""))
        if p.in_progress:
            print(f"{p.directory}: {what}: a move in progress (its mover or guard holds it)")
        elif p.stale is None:
            left = f", locked for {src.lock_expires - now:.0f} s more" if src.lock_expires is not None else ""
            print(f"{p.directory}: {what}{left}: `sockrepair restore -D {p.directory} --unix PATH` (or --exec CMD)")
        else:
            print(f"{p.directory}: {what}: not restorable: {p.stale}")
    return 0


def _refuse_another_namespace(directory: Path, src: Source) -> None:
    """Raise ImageError when the namespace a restore of `directory` would go into (the one its index names, else
    this thread's) is not the one its connections were taken in (`src.netns_inode`): rebuilt there, they are
    unreachable from their peers, whose packets (the lock gone where they were) meet no socket and get resets. A
    mover run inside a namespace without a name to the restore (`ip netns exec`'s, in its own mount namespace)
    recorded "here", which the restore took for its own namespace. Nothing is checked for images without the inode
    (older ones) or whose named namespace is gone (entering it fails with its own error)."""
    if src.netns_inode is None:
        return
    try:
        here = os.stat(netns_path(src.netns)).st_ino
    except OSError:
        return
    if here == src.netns_inode:
        return
    where = (f"the namespace named {src.netns!r} is another one now (made again since?)" if src.netns else
             "it has no `ip netns` name and is not this process's")
    raise ImageError(f"{directory}: its connections were taken in network namespace {src.netns_inode} (its inode), "
                     f"and {where}: restored here, their peers would never reach them (they would be reset); run "
                     "the restore inside that namespace (`nsenter --net=/proc/PID/ns/net` with PID a process in it, "
                     "or `ip netns attach NAME PID` and --netns NAME); --force restores here anyway",
                     path=str(directory))


def _criu_stale(directory: Path, netns: str | None, states: list[ConnectionState]) -> str | None:
    """Why the connections of a `sockrepair criu dump` directory would not be restored as they are now (None: they
    would, as far as it can tell; plain criu images record nothing to tell by): a tree was restored already; a
    dumped process still runs (its connections went on); or a connection is no longer locked in `netns` (the lock
    expired or was released: what its peer sent since met a reset)."""
    if not is_dump_dir(directory):
        return None
    manifest = load_manifest(directory)
    for tree in manifest.trees:
        if tree.restored:
            return f"tree {tree.root} was restored already (`sockrepair criu restore`): its connections live there"
        for pid, start in zip(tree.pids, tree.starttimes):
            st = stat(pid)
            if st is not None and st.starttime == start and not st.zombie:
                return (f"process {pid} of tree {tree.root} is still running, so its connections went on after these "
                        "images were written")
    with named(netns), Locker() as locker:
        locked = {r.tuple for r in locker.list_locks()}
    loose = [s.tuple for s in states if s.tuple.wire() not in locked and s.tuple.wire().reversed() not in locked]
    if loose:
        return (f"{len(loose)} of its {len(states)} connection(s) ({loose[0]}{', ...' if len(loose) > 1 else ''}) "
                "are not locked here: the lock expired or was released, and what their peers sent since met a reset")
    return None


def _unlock_handed(directory: Path, netns: str | None, states: list[ConnectionState]) -> list[ConnectionState]:
    """The states of `directory` that no earlier restore handed off: those it did (sockrepair.move.journal.HANDED)
    are in a program now, perhaps still locked (that restore was interrupted before its unlock): unlocked here,
    never restored twice."""
    handed = read_handed(directory)
    if not handed or (directory / COMPLETED).exists():
        return states
    done = [s for s in states if str(s.tuple) in handed]
    unlock_in(netns, done)
    rest = [s for s in states if str(s.tuple) not in handed]
    if not rest:
        mark_completed(directory, created=False)
    print(f"{len(done)} connection(s) of {directory} were handed off by an earlier restore: unlocked them"
          + (f"; restoring the {len(rest)} other(s)" if rest else ""), file=sys.stderr)
    return rest


def _kept_text(kept: Kept) -> str:
    text = f"; delivered {kept.delivered} packet(s) their peers sent while locked" if kept.delivered else ""
    if kept.fell_back:
        text += f"; {kept.fell_back} packet(s) fell back to the peers' retransmission"
    return text + (f" ({kept.note})" if kept.note else "")


def _put_back(fds: list[int], states: list[ConnectionState], args: argparse.Namespace, exc: BaseException,
              keeper: Keeper) -> None:
    """Lock the connections again and close their restored sockets silently, and hand `keeper`'s recorders to a new
    keeper (Keeper.hand_back); `exc` says how to retry."""
    put_back(fds, states, args.netns, RELOCK_TTL)
    retry = kept = ""
    if args.dir is not None:
        retry = f" `sockrepair restore -D {args.dir}{' --netns ' + args.netns if args.netns else ''} ...`"
        expires = time.time() + RELOCK_TTL
        note_relock(args.dir, expires)
        kept = keeper.hand_back(args.dir, [s.tuple for s in states], expires)
    fix = "fix the handoff's target and " if isinstance(exc, HandoffError) else ""
    exc.add_note(f"the connections were locked again for {RELOCK_TTL:g} s and their restored sockets closed "
                 f"silently: {fix}restore again{retry} before then" + (f"; {kept}" if kept else ""))
