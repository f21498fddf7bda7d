"""`sockrepair verify`: check one connection in a saved capture (no RST/SYN/FIN, every byte seen, wire gap)."""

from __future__ import annotations

import argparse
from typing import Any

from sockrepair.cli.args import tuple_arg
from sockrepair.cli.output import print_json
from sockrepair.lab.analysis import analyse, format_report
from sockrepair.lab.pcap import read_segments


def add_verify_command(sub: Any) -> None:
    p = sub.add_parser("verify", help="check one connection in a capture: no RST/SYN/FIN, every byte, the wire gap")
    p.add_argument("pcap", help="capture file (pcap or pcapng)")
    p.add_argument("--tuple", required=True, type=tuple_arg, metavar="ADDR:PORT->ADDR:PORT",
                   help="the connection, from either side (IPv6 in brackets)")
    p.add_argument("--freeze", type=float, metavar="T", help="time.time() when the socket was frozen")
    p.add_argument("--resume", type=float, metavar="T", help="time.time() when it went live again")
    p.add_argument("--allow-fin", action="store_true", help="a FIN is not a problem (the connection ended)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    report = analyse(read_segments(args.pcap), args.tuple, args.freeze, args.resume, allow_fin=args.allow_fin)
    if args.json:
        print_json(report.to_dict())
    else:
        print(format_report(report))
    return 0 if report.ok else 1
