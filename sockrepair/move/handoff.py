"""Handing restored connections to a program: inherited fds by the systemd socket-activation convention, or
SCM_RIGHTS over a UNIX socket to a process that waits for them."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from urllib.parse import quote

from sockrepair.errors import HandoffError
from sockrepair.state import ConnTuple

SD_LISTEN_FDS_START = 3
SCM_MAX_FD = 253


def fd_name(conn: ConnTuple) -> str:
    """LISTEN_FDNAMES separates names with ':', which addresses and ports contain: it is percent-encoded
    (urllib.parse.unquote gives back the `ADDR:PORT->ADDR:PORT` text)."""
    return quote(str(conn), safe="[]->.")


def activation_env(count: int, names: Sequence[str], pid: int) -> dict[str, str]:
    return {"LISTEN_FDS": str(count), "LISTEN_PID": str(pid), "LISTEN_FDNAMES": ":".join(names)}


def _place_fds(fds: Sequence[int]) -> None:
    """dup2 the fds to 3, 4, ... in order, without clobbering one that is still to be moved, and close the
    originals so the program sees each connection once."""
    targets = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(fds))
    floor = max([targets.stop, *fds]) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    for fd in fds:
        if fd not in targets:
            os.close(fd)
    for target, fd in zip(targets, high):
        os.dup2(fd, target, inheritable=True)
        os.close(fd)


def exec_with_sockets(argv: Sequence[str], socks: Sequence[socket.socket], conns: Sequence[ConnTuple]) -> None:
    """Replace this process with `argv`, which inherits the sockets as fds 3.. (LISTEN_PID is this very pid)."""
    _place_fds([s.fileno() for s in socks])
    env = dict(os.environ, **activation_env(len(socks), [fd_name(c) for c in conns], os.getpid()))
    try:
        os.execvpe(argv[0], list(argv), env)
    except OSError as exc:
        raise HandoffError(f"cannot run {argv[0]!r}: {exc.strerror}") from None


def spawn_with_sockets(argv: Sequence[str], socks: Sequence[socket.socket], conns: Sequence[ConnTuple],
                       **popen: object) -> subprocess.Popen[bytes]:
    """Start `argv` as a child that inherits the sockets by socket activation. LISTEN_PID must be the child's own
    pid, which only the child knows: a small trampoline (sockrepair.move.activate) sets it and execs the program."""
    fds = [s.fileno() for s in socks]
    env = dict(os.environ, SOCKREPAIR_ACTIVATE_FDS=",".join(map(str, fds)),
               SOCKREPAIR_ACTIVATE_NAMES=":".join(fd_name(c) for c in conns))
    try:
        return subprocess.Popen([sys.executable, "-m", "sockrepair.move.activate", "--", *argv], pass_fds=fds, env=env,
                                **popen)  # type: ignore[call-overload]
    except OSError as exc:
        raise HandoffError(f"cannot run {argv[0]!r}: {exc.strerror}") from None


def send_over_unix(path: str, socks: Sequence[socket.socket], conns: Sequence[ConnTuple]) -> None:
    """Pass the sockets to the process listening on the UNIX socket `path`: each message carries up to 253 fds
    (SCM_MAX_FD) and a JSON list of their tuples."""
    with connect_unix(path) as unix:
        pass_over(unix, path, socks, conns)


def connect_unix(path: str, timeout: float = 10.0) -> socket.socket:
    """A connection to the UNIX socket `path` that sockets will be passed over (made before restoring, so that a
    wrong path costs nothing); sends time out after `timeout` seconds. Raises HandoffError."""
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unix.settimeout(timeout)
        unix.connect(path)
    except OSError as exc:
        unix.close()
        raise HandoffError(f"cannot pass the connections over {path}: {exc.strerror or exc}") from None
    return unix


def pass_over(unix: socket.socket, path: str, socks: Sequence[socket.socket], conns: Sequence[ConnTuple]) -> None:
    """send_over_unix on a connection made by connect_unix. Raises HandoffError."""
    try:
        for start in range(0, len(socks), SCM_MAX_FD):
            part = socks[start : start + SCM_MAX_FD]
            names = json.dumps([str(c) for c in conns[start : start + SCM_MAX_FD]]).encode()
            socket.send_fds(unix, [len(names).to_bytes(4, "big") + names], [s.fileno() for s in part])
    except OSError as exc:
        raise HandoffError(f"cannot pass the connections over {path}: {exc.strerror or exc}") from None


def runnable(program: str) -> str:
    """The file `program` names (looked up in PATH as execvp does) when the kernel can run it: executable, and an
    ELF binary or a `#!` script. Raises HandoffError saying why not, before anything is restored for it."""
    path = shutil.which(program) if program else None
    if path is None:
        raise HandoffError(f"--exec: no such program {program or '(none given)'} (or not executable)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise HandoffError(f"--exec: cannot read {path}: {exc.strerror}") from None
    if head != b"\x7fELF" and not head.startswith(b"#!"):
        raise HandoffError(f"--exec: {path} is neither an ELF binary nor a #! script: the kernel cannot run it")
    return path
