"""Keeping between two commands: `sockrepair dump` hands its recorders to a detached keeper (sockrepair.move.keepd)
that goes on recording into the image directory until `sockrepair restore -D` takes them back (take_over), so a
peer that sends between the two commands does not wait for its retransmission timeout.

The image directory then holds, besides packets.img (what was kept during the dump):

- kept.img (sockrepair.image.keptlog): what the keeper kept since, record by record;
- keeper.sock: the UNIX socket the keeper listens on for the restore;
- keeper.json: the keeper's pid, start time (clock ticks since boot, as /proc/PID/stat field 22), the lock's expiry,
  the network namespaces (inode numbers) it records in, in the order of its sockets, and the name of its log.

A restore that took the keeper over and is then put back (sockrepair.move.keep.Keeper.hand_back) hands its recorders
to a new keeper in turn, which logs into LATER (same format) and replaces keeper.json; the next restore folds what it
kept into redeliver.img and removes both (sockrepair.move.keep.resume_keeping).

take_over() connects to keeper.sock; the keeper reads what is left, ends kept.img and passes its bound
nfnetlink_log sockets (SCM_RIGHTS), which the restore goes on recording with: there is no instant when nobody
records. A keeper that is gone (killed, or it stopped at the lock's expiry) leaves kept.img as far as it got."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sockrepair.errors import ImageError, LockError
from sockrepair.lock.record import Recorder, wire_key
from sockrepair.move.handoff import peer_credentials
from sockrepair.move.procfs import stat
from sockrepair.packet import packet_tuple
from sockrepair.private import create_private, read_regular, replace_private
from sockrepair.state import ConnTuple

if TYPE_CHECKING:
    from sockrepair.image.keptlog import KeptLog

SOCKET = "keeper.sock"
RECORD = "keeper.json"
# the log of a keeper started by a restore that was put back (kept.img stays the dump's keeper's, for `show`)
LATER = "kept-later.img"
# a keeper that neither answers nor leaves within this is stopped with SIGKILL (it only ever appends to kept.img)
ANSWER_TIMEOUT = 10.0
_START_TIMEOUT = 30.0
_MAX_RECORD = 1 << 16


def _in_dir(dir_fd: int, name: str) -> str:
    # through the directory's fd: the directory's own path may be longer than a UNIX socket address allows
    return f"/proc/self/fd/{dir_fd}/{name}"


def spawn_keeper(dir_fd: int, recorders: Sequence[tuple[int, Recorder]], tuples: Sequence[ConnTuple],
                 expires: float, log: str | None = None) -> int:
    """Start a keeper for `tuples` with `recorders` ((namespace inode, recorder) each; the caller closes its own
    copies afterwards), appending to a new `log` (kept.img, or LATER) in the directory `dir_fd` until `expires`
    (wall-clock seconds). Returns its pid, also written to keeper.json (replaced, for LATER). Raises OSError when the
    files cannot be created (FileExistsError for a directory that already has them) or LockError when the keeper
    does not start."""
    from sockrepair.image.keptlog import NAME, header

    if not recorders:
        raise LockError("no recorder to hand to a keeper")
    log = log or NAME
    with contextlib.ExitStack() as stack:
        journal = stack.enter_context(create_private(dir_fd, log))
        journal.write(header())
        journal.flush()
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC))
        listener.bind(_in_dir(dir_fd, SOCKET))
        listener.listen(4)
        spec = {"journal": journal.fileno(), "listen": listener.fileno(),
                "recorders": [[r.socket.fileno(), r.next_seq] for _, r in recorders],
                "tuples": [str(wire_key(t)) for t in tuples], "expires": expires}
        from sockrepair.move import keepd

        try:
            done = subprocess.run([sys.executable, "-P", keepd.__file__, json.dumps(spec)],
                                  pass_fds=[journal.fileno(), listener.fileno(),
                                            *(r.socket.fileno() for _, r in recorders)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True, cwd="/", timeout=_START_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise LockError(f"the keeper did not start within {_START_TIMEOUT:g} s") from None
        line = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0 or not line.isdigit():
            raise LockError(f"the keeper did not start (exit status {done.returncode}): "
                            f"{done.stderr.decode(errors='replace').strip()[-300:]}")
        pid = int(line)
    proc = stat(pid)
    start_time = proc.starttime if proc is not None else None
    record = json.dumps({"pid": pid, "start_time": start_time, "expires": expires,
                         "netns": [ino for ino, _ in recorders], "log": log}).encode()
    try:
        if log == NAME:
            with create_private(dir_fd, RECORD) as f:
                f.write(record)
        else:
            # in place of the record of the keeper that a restore took over (gone since); only once LATER was made
            # (O_EXCL), so that the record of a keeper still logging there is never lost
            replace_private(_in_dir(dir_fd, ""), RECORD, record)
    except BaseException:
        _kill(pid, start_time)  # a keeper no restore can find would hold the log group for nothing
        raise
    return pid


@dataclass
class TakenOver:
    """What take_over() found: `packets` of the keeper's log (checked, in order), `recorders` ((namespace inode,
    recorder) taken from a keeper that answered, still recording), `fell_back` (packets the keeper could not keep),
    `note` (what became of the keeper, when it did not answer), `log` (the name of that log: kept.img, LATER; None
    without keeper.json)."""

    packets: list[bytes] = field(default_factory=list)
    recorders: list[tuple[int, Recorder]] = field(default_factory=list)
    fell_back: int = 0
    note: str = ""
    log: str | None = None


def take_over(directory: Path, tuples: Sequence[ConnTuple]) -> TakenOver:
    """Stop the keeper of `directory` (if it runs), taking its recorders, then read its log (kept.img, or LATER as
    keeper.json says). Every packet must be from the peer of one of `tuples` (the connections of the directory).
    Without keeper.json, nothing was handed to a keeper: an empty TakenOver. Raises ImageError for a damaged
    keeper.json or log (a CRC mismatch, a record cut short by anything but the death of the keeper, a packet for
    another connection)."""
    from sockrepair.image.keptlog import NAME

    try:
        raw = read_regular(directory / RECORD, _MAX_RECORD)
    except FileNotFoundError:
        return TakenOver()
    except OSError as exc:
        raise ImageError(f"{directory / RECORD}: {exc.strerror}", path=str(directory / RECORD)) from None
    try:
        info = json.loads(raw)
        pid, inodes = int(info["pid"]), [int(i) for i in info["netns"]]
        start_time = info.get("start_time")
        name = info.get("log", NAME)
        if name not in (NAME, LATER):
            raise ValueError(name)
    except (ValueError, KeyError, TypeError):
        raise ImageError(f"{directory / RECORD}: not a keeper record", path=str(directory / RECORD)) from None
    taken = TakenOver(log=name)
    handed = _ask(directory, len(inodes))
    if handed is None:
        taken.note = _gone(pid, start_time)
        # one that hangs, or lost its socket, must not go on recording (and holding the group) behind the restore
        _kill(pid, start_time)
    else:
        next_seqs, fds = handed
        taken.recorders = [(ino, Recorder(bound=socket.socket(fileno=fd), next_seq=seq))
                           for ino, fd, seq in zip(inodes, fds, next_seqs, strict=True)]
    path = directory / name
    try:
        log = read_log(path, tuples)
        if log is None:
            # removed as the note below advises after it was found damaged: the restore goes on without its packets
            taken.note = (f"{taken.note}; " if taken.note else "") + (f"{path} was removed: what it kept comes by "
                                                                     "the peers' retransmission")
            return taken
        if handed is not None and (log.end is None or log.torn):
            raise ImageError(f"{path}: the keeper handed over without ending it: damaged", path=str(path))
    except ImageError as exc:
        for _, recorder in taken.recorders:
            recorder.close()
        exc.add_note(f"nothing was restored: the connections wait, locked; remove {path} to restore them without "
                     "those packets (their peers send them again)")
        raise
    if log.end is not None and handed is None:
        taken.note = f"the keeper had stopped ({log.end})"
    if log.torn:
        taken.note += f"; its last record was cut short ({log.torn} bytes, not delivered)"
    taken.packets = log.packets
    taken.fell_back = log.fell_back + (1 if log.torn else 0)
    return taken


def read_log(path: Path, tuples: Sequence[ConnTuple]) -> KeptLog | None:
    """The keeper's log at `path`, checked: every packet from the peer of one of `tuples`; None when there is no
    such file. Raises ImageError as decode_keptlog does, and for a packet of another connection."""
    from sockrepair.image.keptlog import MAX_FILE, decode_keptlog

    try:
        log = decode_keptlog(read_regular(path, MAX_FILE), str(path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}", path=str(path)) from None
    _check(log.packets, tuples, str(path))
    return log


def _check(packets: list[bytes], tuples: Sequence[ConnTuple], path: str) -> None:
    ours = {wire_key(conn) for conn in tuples}
    for n, packet in enumerate(packets):
        if packet_tuple(packet) not in ours:
            raise ImageError(f"{path}: packet {n} is for {packet_tuple(packet)}, not a connection of this directory",
                             path=path, field=f"packets[{n}]")


def _ask(directory: Path, count: int) -> tuple[list[int | None], list[int]] | None:
    """The keeper's next sequence numbers and its `count` recorder sockets (fds now ours), or None when no keeper
    answered as it should."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
            conn.settimeout(ANSWER_TIMEOUT)
            try:
                conn.connect(_in_dir(dir_fd, SOCKET))
            except (FileNotFoundError, ConnectionRefusedError):
                return None
            # the directory is the caller's and 0700, so only its owner or root can have made the socket
            uid = peer_credentials(conn)[1]
            if uid not in (os.geteuid(), 0):
                raise ImageError(f"{directory / SOCKET} is held by uid {uid}", path=str(directory / SOCKET))
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, 4096, 16)
            except TimeoutError:
                data, fds = b"", []
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SOCKET, dir_fd=dir_fd)
            try:
                next_seqs = [None if seq is None else int(seq) for seq in json.loads(data)["next_seq"]]
            except (ValueError, KeyError, TypeError):
                next_seqs = []  # no answer (timed out), or not the keeper's
            if not fds or len(fds) != len(next_seqs) or len(fds) != count:
                for fd in fds:
                    os.close(fd)
                return None
            return next_seqs, fds
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return None
        raise
    finally:
        os.close(dir_fd)


def _kill(pid: int, start_time: object) -> None:
    """SIGKILL the keeper `pid` if it is still the process keeper.json names (through a pidfd: no pid reuse)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        proc = stat(pid)
        if proc is not None and proc.starttime == start_time:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _gone(pid: int, start_time: object) -> str:
    proc = stat(pid)
    alive = proc is not None and proc.starttime == start_time and not proc.zombie
    return (f"the keeper (pid {pid}) {'did not answer: killed' if alive else 'was gone (killed?)'}; what the peers "
            "sent after its last record came by their retransmission, uncounted")
