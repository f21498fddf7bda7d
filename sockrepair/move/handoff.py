"""Handing restored connections to a program: inherited fds by the systemd socket-activation convention, or
SCM_RIGHTS over a UNIX socket to a process that waits for them; that process is checked first (who can listen at
the path, and as which uid: SO_PEERCRED), since whoever gets the fds owns the live connections."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Collection, Sequence
from urllib.parse import quote

from sockrepair.errors import HandoffError
from sockrepair.netns import named
from sockrepair.private import open_dir
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


def exec_with_sockets(argv: Sequence[str], socks: Sequence[socket.socket], conns: Sequence[ConnTuple],
                      netns: str | None = None) -> None:
    """Replace this process with `argv`, which inherits the sockets as fds 3.. (LISTEN_PID is this very pid), in
    the network namespace `netns` (`ip netns` name; None: this one), where the connections live: run anywhere
    else, the program's /proc/PID/net would not list them, and a later dump of it would find none. Raises
    HandoffError when `argv` cannot be run (this process is then back in its own namespace), NetnsError for a
    namespace that is gone."""
    _place_fds([s.fileno() for s in socks])
    env = dict(os.environ, **activation_env(len(socks), [fd_name(c) for c in conns], os.getpid()))
    try:
        with named(netns):
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
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            [sys.executable, "-m", "sockrepair.move.activate", "--", *argv], pass_fds=fds, env=env, **popen)
        return proc
    except OSError as exc:
        raise HandoffError(f"cannot run {argv[0]!r}: {exc.strerror}") from None


def _receiver_path(path: str) -> str:
    """`path` with its directory's symlinks resolved, after checking that directory is the caller's or root's and
    that nobody else can write it (who can write there could put their own listener at that name) and that `path`
    itself is a UNIX socket, not a symlink."""
    parent, name = os.path.split(os.path.abspath(path))
    real_parent = os.path.realpath(parent)
    try:
        os.close(open_dir(real_parent))
    except OSError as exc:
        raise HandoffError(f"refused to pass connections over {path}: its directory {real_parent}: "
                           f"{exc.strerror}") from None
    real = os.path.join(real_parent, name)
    try:
        st = os.lstat(real)
    except OSError as exc:
        raise HandoffError(f"cannot pass the connections over {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a UNIX socket"
        raise HandoffError(f"refused to pass connections over {path}: it is {what}")
    return real


_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid


def peer_credentials(unix: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of the connected UNIX socket `unix`, as they were when it
    connected or listened (SO_PEERCRED, struct ucred). Raises OSError."""
    pid, uid, gid = _UCRED.unpack(unix.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def connect_receiver(path: str, uids: Collection[int] = ()) -> socket.socket:
    """A UNIX stream socket connected to the process listening at `path`, checked before any connection is restored
    for it: `path`'s directory must be the caller's or root's and not writable by group or others, and the listener
    (SO_PEERCRED) must run as root, as the caller's effective uid, or as one of `uids`. Raises HandoffError naming
    what was refused."""
    real = _receiver_path(path)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        unix.connect(real)
        pid, uid, _gid = peer_credentials(unix)
        allowed = {0, os.geteuid(), *uids}
        if uid not in allowed:
            raise HandoffError(f"refused to pass connections over {path}: its listener (pid {pid}) runs as uid {uid}, "
                               f"not as one of {', '.join(map(str, sorted(allowed)))} (name its uid with --unix-uid)")
        return unix
    except OSError as exc:
        unix.close()
        raise HandoffError(f"cannot pass the connections over {path}: {exc.strerror or exc}") from None
    except BaseException:
        unix.close()
        raise


def send_to_receiver(unix: socket.socket, socks: Sequence[socket.socket], conns: Sequence[ConnTuple]) -> None:
    """Pass the sockets over connect_receiver's socket: each message carries up to 253 fds (SCM_MAX_FD) and a JSON
    list of their tuples, preceded by its length (4 bytes, big-endian). Raises HandoffError."""
    try:
        for start in range(0, len(socks), SCM_MAX_FD):
            part = socks[start : start + SCM_MAX_FD]
            names = json.dumps([str(c) for c in conns[start : start + SCM_MAX_FD]]).encode()
            socket.send_fds(unix, [len(names).to_bytes(4, "big") + names], [s.fileno() for s in part])
    except OSError as exc:
        raise HandoffError(f"cannot pass the connections: {exc.strerror or exc}") from None


def send_over_unix(path: str, socks: Sequence[socket.socket], conns: Sequence[ConnTuple],
                   uids: Collection[int] = ()) -> None:
    """connect_receiver(path, uids) then send_to_receiver. Raises HandoffError."""
    with connect_receiver(path, uids) as unix:
        send_to_receiver(unix, socks, conns)


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
