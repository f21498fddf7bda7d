"""The `criu` command group: setup, dump, restore, show, compare, explain. Handlers return the exit status; a failed criu
run prints every known cause and fix from its logs to stderr, then the one-line error from the main CLI."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import Any

from sockrepair.cli.args import netns_arg, path_arg, ttl_arg
from sockrepair.cli.output import print_json
from sockrepair.criu import driver, setup, show
from sockrepair.criu.compare import DIFFERS, EXPLAINED, NOT_KEPT, compare
from sockrepair.criu.explain import CriuFailure, Report, explain_dir, explain_files
from sockrepair.criu.locate import DEFAULT_PREFIX, PREFIX_VAR
from sockrepair.criu.manifest import LOCK_SKIP
from sockrepair.criu.topology import PEER_EXTERNAL, PEER_TREE
from sockrepair.errors import CriuError
from sockrepair.lock.locker import MAX_TTL


def add_criu_commands(subparsers: Any) -> None:
    """Register `criu` with its subcommands on an argparse subparsers object; each sets `func(args) -> int`."""
    group = subparsers.add_parser("criu", help="dump and restore process trees with criu under sockrepair's lock; "
                                  "read, check and explain criu's images and logs")
    sub = group.add_subparsers(dest="criu_command", required=True, metavar="SUBCOMMAND")
    ttl_help = f"seconds the lock holds without sockrepair running (default {driver.DEFAULT_TTL:g}, max {MAX_TTL:g})"
    arg_help = "pass ARG to criu as is (repeatable), e.g. --criu-arg=--ext-unix-sk"

    p = sub.add_parser("setup", help=f"keep a criu that works on this kernel, or fetch Debian's criu >= 4.2 into "
                       f"{DEFAULT_PREFIX} (${PREFIX_VAR}); as root")
    p.add_argument("--force", action="store_true", help="fetch even when a working criu is found")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("dump", help="dump process trees (each with its children) with every connection locked")
    p.add_argument("--pid", type=int, action="append", required=True, help="root of a tree to dump (repeatable)")
    p.add_argument("-D", "--dir", required=True, type=path_arg,
                   help="directory for the images: created 0700, or an empty one of yours that others cannot write")
    p.add_argument("--allow-external-peers", action="store_true",
                   help="dump even when a loopback peer of the trees stays behind (its connection will break)")
    p.add_argument("--allow-lost-errors", action="store_true",
                   help="dump even when a connection in CLOSE holds an error its program has not read (criu's "
                        "images cannot keep it)")
    p.add_argument("--shell-job", action="store_true", help="pass --shell-job to criu (automatic when needed)")
    p.add_argument("--ttl", type=ttl_arg, default=driver.DEFAULT_TTL, help=ttl_help)
    p.add_argument("--criu-arg", action="append", default=[], metavar="ARG", help=arg_help)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=_explained(cmd_dump))

    p = sub.add_parser("restore", help="restore trees dumped by `sockrepair criu dump`, locked until all are back")
    p.add_argument("-D", "--dir", required=True, type=path_arg, help="directory written by `sockrepair criu dump`")
    p.add_argument("--pid", type=int, action="append",
                   help="restore only this tree, by its root pid (repeatable, in this order); default: all left")
    p.add_argument("--netns", metavar="NAME", type=netns_arg,
                   help="restore into this network namespace (ip netns name); default: the current one")
    p.add_argument("--ttl", type=ttl_arg, default=driver.DEFAULT_TTL, help=ttl_help)
    p.add_argument("--criu-arg", action="append", default=[], metavar="ARG", help=arg_help)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=_explained(cmd_restore))

    p = sub.add_parser("show", help="the TCP connections in criu images (criu's or `sockrepair criu dump`'s)")
    p.add_argument("dir", type=path_arg, help="criu image directory, or a `sockrepair criu dump` directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--payload", action="store_true", help="with --json: include the queue bytes (base64)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("compare", help="checkpoint a process's connections with sockrepair and with criu "
                       "(--leave-running) and compare them field by field; exit 1 on an unexplained difference")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list every field, not only those that differ")
    p.set_defaults(func=_explained(cmd_compare))

    p = sub.add_parser("explain", help="name the known errors in criu's logs, with cause and fix")
    p.add_argument("paths", nargs="+", type=path_arg, help="criu image directories (their *.log) or log files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_explain)


def _explained(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print the whole explanation of a failed criu run before the one-line error."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CriuFailure as exc:
            if exc.report.findings or exc.report.unexplained:
                print(exc.report.text(), file=sys.stderr)
            raise

    return run


def cmd_setup(args: argparse.Namespace) -> int:
    result = setup.setup(force=args.force, progress=lambda line: print(f"criu setup: {line}", flush=True))
    criu = result.criu
    if result.fetched:
        print(f"criu setup: installed criu {criu.version} at {criu.path}; `criu check` passed")
    else:
        print(f"criu setup: using criu {criu.version} from {criu.origin} ({criu.path}); `criu check` passed")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    report = driver.dump(args.pid, args.dir, allow_external_peers=args.allow_external_peers, ttl=args.ttl,
                         shell_job=args.shell_job, criu_args=args.criu_arg, allow_lost_errors=args.allow_lost_errors)
    if args.json:
        print_json(report.to_dict())
        return 0
    how = ("criu run with --network-lock skip, the lock is sockrepair's" if report.network_lock == LOCK_SKIP
           else "criu's own lock, sockrepair's held over it")
    print(f"dumped {len(report.trees)} tree(s) into {report.directory} with criu {report.criu_version} ({how})")
    topo = report.topology
    for tree in report.trees:
        print(f"  tree {tree.root} ({tree.command}): {len(tree.pids)} process(es), "
              f"{len(topo.of_tree(tree.root))} connection(s), images in {tree.dir}/"
              f"{', --shell-job' if tree.shell_job else ''}")
    print(f"  {len(topo.connections)} connection(s) locked, both directions, for {report.ttl:g} s:")
    for c in topo.connections:
        peer = (f"peer in tree {c.peer_root}" if c.peer == PEER_TREE else
                "peer left running (--allow-external-peers)" if c.peer == PEER_EXTERNAL else "remote peer")
        print(f"    {str(c.tuple):<48} tree {c.root}, {peer}")
    kept = report.kept
    print(f"  kept {kept.delivered} packet(s) their peers sent during the dump"
          + (f"; {kept.note}" if kept.note else ""))
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"restore with: sockrepair criu restore -D {shlex.quote(report.directory)} (the lock is taken again from "
          "the images, also after a reboot)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    report = driver.restore(args.dir, args.pid, netns=args.netns, ttl=args.ttl, criu_args=args.criu_arg)
    if args.json:
        print_json(report.to_dict())
        return 0
    print(f"restored tree(s) {', '.join(map(str, report.restored))} from {report.directory}")
    print(f"  released the lock of {len(report.released)} connection(s)")
    if report.still_locked:
        print(f"  {len(report.still_locked)} connection(s) stay locked for {report.ttl:g} s: their other end is in "
              "a tree not restored yet")
    kept = report.kept
    if kept.delivered or kept.fell_back or kept.note:
        print(f"  delivered {kept.delivered} packet(s) their peers sent while locked, {kept.fell_back} fell back to "
              "their retransmission" + (f" ({kept.note})" if kept.note else ""))
    logged = report.criu_notes.text()
    if logged:
        print("criu logged these errors and went on (sockrepair's lock covered the connections):\n" + logged,
              file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    if args.json:
        print_json(show.to_dict(args.dir, payload=args.payload))
    else:
        print(show.to_text(args.dir))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    result = compare(args.pid)
    if args.json:
        print_json(result.to_dict())
        return 0 if result.ok else 1
    print(f"pid {result.pid}: sockrepair vs criu {result.criu_version}, checkpoints at most "
          f"{result.apart_ms:.0f} ms apart")
    for conn in result.connections:
        counts = {v: sum(f.verdict == v for f in conn.fields) for v in ("same", EXPLAINED, NOT_KEPT, DIFFERS)}
        print(f"fd {conn.fd:<4} {str(conn.tuple):<48} " + ", ".join(f"{n} {v}" for v, n in counts.items()))
        for f in conn.fields:
            if f.verdict != "same" or args.all:
                why = f"  ({f.why})" if f.why else ""
                print(f"     {f.verdict.upper() if f.verdict == DIFFERS else f.verdict:<9} {f.name}: "
                      f"sockrepair {f.ours!r}, criu {f.criu!r}{why}")
    for line in result.missing:
        print(f"MISSING  {line}")
    print("criu agrees with sockrepair" if result.ok else "criu and sockrepair DISAGREE (see DIFFERS/MISSING above)")
    return 0 if result.ok else 1


def cmd_explain(args: argparse.Namespace) -> int:
    report = Report()
    for path in args.paths:
        report.extend(explain_dir(path) if path.is_dir() else explain_files([path]))
    if not report.findings and not report.unexplained and not report.log_lines:
        raise CriuError(f"found nothing criu writes in {', '.join(map(str, args.paths))}: no criu log line and no "
                        "error it knows (give dump.log, restore.log or criu's output, or their directory)")
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.text(harmless=True) or "no error lines in these logs")
    return 1 if report.problems or report.unexplained else 0
