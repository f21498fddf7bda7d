"""Trampoline for spawn_with_sockets: moves the inherited sockets to fds 3.., sets LISTEN_PID to its own pid (which
the parent could not know before the fork) and execs the program. Run as `python -m sockrepair.move.activate -- ARGV`."""

from __future__ import annotations

import os
import sys

from sockrepair.move.handoff import _place_fds, activation_env


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    fds = [int(fd) for fd in os.environ.pop("SOCKREPAIR_ACTIVATE_FDS").split(",") if fd]
    names = os.environ.pop("SOCKREPAIR_ACTIVATE_NAMES").split(":")
    _place_fds(fds)
    os.environ.update(activation_env(len(fds), names, os.getpid()))
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
