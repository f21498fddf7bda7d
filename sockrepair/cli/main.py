"""The `sockrepair` command: argument parsing and error reporting; each subcommand's work lives in its own module."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from sockrepair.cli.args import Parser, path_arg, seconds_arg
from sockrepair.cli.bench import add_bench_command
from sockrepair.cli.criu import add_criu_commands
from sockrepair.cli.lock import add_lock_commands
from sockrepair.cli.move import add_move_commands
from sockrepair.cli.output import print_error, print_json
from sockrepair.cli.verify import add_verify_command
from sockrepair.errors import ImageError, SockrepairError
from sockrepair.move.stages import InjectedFault
from sockrepair.private import open_regular, read_regular

# packets.img (sockrepair.image.packets.MAGIC), named here so that `show` of an image does not load construct
PACKETS_MAGIC = b"SKPK"


def cmd_check(args: argparse.Namespace) -> int:
    from sockrepair.check import probe

    report = probe()
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"kernel {report.kernel}")
        width = max(len(f.name) for f in report.features)
        for f in report.features:
            mark = "ok  " if f.ok else ("FAIL" if f.required else "no  ")
            print(f"  {mark} {f.name:<{width}}  {f.detail}")
        print("TCP repair works here." if report.repair_works else "TCP repair cannot work here (see FAIL above).")
    return 0 if report.repair_works else 1


def cmd_show(args: argparse.Namespace) -> int:
    from sockrepair.image import keptlog, layout
    from sockrepair.image.directory import read_image
    from sockrepair.image.text import state_lines

    magic = _magic(args.image)
    if magic == PACKETS_MAGIC:
        return _show_packets(args)
    if magic == keptlog.MAGIC:
        return _show_keptlog(args)
    state = read_image(args.image)
    if args.json:
        print_json(state.to_dict(payload=args.payload))
    else:
        print(f"{args.image}: sockrepair connection image, format version {layout.VERSION}")
        print("\n".join(state_lines(state)))
    return 0


def _magic(path: Path) -> bytes:
    """The first 4 bytes of `path` (the magic of every sockrepair file), b"" when it cannot be read."""
    try:
        with open_regular(path) as f:  # never blocks on a FIFO, never follows a symlink
            return f.read(len(PACKETS_MAGIC))
    except OSError:
        return b""  # read_image says why


def _show_packets(args: argparse.Namespace) -> int:
    from sockrepair.image.packets import MAX_FILE, decode_packets, describe

    try:
        data = read_regular(args.image, MAX_FILE)
    except OSError as exc:
        raise ImageError(f"cannot read {args.image}: {exc.strerror}", path=str(args.image)) from None
    packets = [describe(p) for p in decode_packets(data, str(args.image))]
    if args.json:
        print_json({"packets": packets})
        return 0
    print(f"{args.image}: {len(packets)} packet(s) the lock kept for the restore to deliver")
    for n, p in enumerate(packets):
        print(f"  {n:4} {p['tuple']}  seq {p['seq']} ack {p['ack']} [{p['flags']}] {p['payload']} bytes")
    return 0


def _show_keptlog(args: argparse.Namespace) -> int:
    from sockrepair.image.keptlog import MAX_FILE, decode_keptlog
    from sockrepair.image.packets import describe

    try:
        data = read_regular(args.image, MAX_FILE)
    except OSError as exc:
        raise ImageError(f"cannot read {args.image}: {exc.strerror}", path=str(args.image)) from None
    log = decode_keptlog(data, str(args.image))
    packets = [describe(p) for p in log.packets]
    if args.json:
        print_json({"packets": packets, "over_cap": log.over_cap, "lost": log.lost, "truncated": log.truncated,
                    "end": log.end, "torn": log.torn})
        return 0
    end = f"ended: {log.end}" if log.end is not None else "not ended (the keeper runs, or was killed)"
    print(f"{args.image}: {len(packets)} packet(s) a keeper kept after the dump, {log.fell_back} not kept; {end}")
    for n, p in enumerate(packets):
        print(f"  {n:4} {p['tuple']}  seq {p['seq']} ack {p['ack']} [{p['flags']}] {p['payload']} bytes")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sockrepair.demo import run_demo

    return run_demo(json_output=args.json, seconds=args.seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sockrepair", description="Move live TCP connections between sockets, processes and hosts with TCP_REPAIR."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="what this kernel and host support for TCP repair")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("show", help="print a connection image")
    p.add_argument("image", type=path_arg, help="image file written by sockrepair")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--payload", action="store_true", help="with --json: include the queue bytes (base64)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("demo", help="move a live connection while its client keeps talking, and verify every byte")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--seconds", type=seconds_arg, default=3.0, help="how long the client talks (default 3)")
    p.set_defaults(func=cmd_demo)

    add_move_commands(sub)
    add_verify_command(sub)
    add_criu_commands(sub)
    add_bench_command(sub)
    add_lock_commands(sub)
    return parser


_SIGNALLED = {sig.name: int(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: its exit status; a SockrepairError or OSError is one line on stderr and exit 1 (with
    `--json`, also a JSON error object on stdout); a usage error exits 2 from argparse; Ctrl-C, SIGTERM and SIGHUP
    one line and 128 + the signal's number."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so that every cleanup a command holds runs (a frozen process thawed,
    # its sockets out of repair mode, or a move finished); steps that must not be cut hold them back meanwhile
    before = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return int(args.func(args))
    except KeyboardInterrupt as exc:
        print(f"sockrepair: interrupted{' by ' + str(exc) if exc.args else ''}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"sockrepair: {note}", file=sys.stderr)
        # 128 + the signal, as a shell reports a command the signal ended: 130 for Ctrl-C, 143 for SIGTERM
        return 128 + _SIGNALLED.get(str(exc.args[0]) if exc.args else "", signal.SIGINT)
    except BrokenPipeError:
        # the reader of our output went away (`sockrepair show X | head -1`): nothing left to say to it; stdout is
        # pointed at /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (SockrepairError, OSError, InjectedFault) as exc:
        print_error(exc, as_json=getattr(args, "json", False), inputs=argv)
        return 1
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
