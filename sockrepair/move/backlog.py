"""The listen backlog of a program a move ends: connections the kernel completed for one of its listeners (the
three-way handshake done, the peer free to send) that the program had not accepted yet. Ending the program closes
the listener, and the kernel resets every connection still in its accept queue (inet_csk_listen_stop,
net/ipv4/inet_connection_sock.c): a peer that connected during the move, while the program was frozen, would see
its connection reset after it was established, its request lost.

So migrate() takes a duplicate of each listener the program alone holds (pidfd_getfd) right before it kills the
program (take_listeners); right after the kill, what waits in their accept queues is accepted and the duplicates
are closed (drain), so that the listener ends with the program's exit, as it did: what connects until then is
reset, what connects later refused, and the port is free once the program has exited. The connections accepted are
live sockets (no repair needed), handed off after the moved ones. Where they cannot go as they are, they go as the
moved ones go (carry): into another namespace, migrate() locks them in both, checkpoints them, adds them to the
journal, closes them silently and restores them there with the others; `sockrepair dump` that kills the program adds
them to its image directory for the restore."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sockrepair.engine import checkpoint, discard, resume
from sockrepair.engine._addr import read_tuple
from sockrepair.engine._repair import in_repair
from sockrepair.engine._session import session_of
from sockrepair.errors import ProcessError, SockrepairError
from sockrepair.lock import Locker
from sockrepair.lock.ruleset import SOCCR_MARK
from sockrepair.move.freeze import Freezer
from sockrepair.move.pidfd import PidFd, shared_socket
from sockrepair.move.procfs import ProcSocket
from sockrepair.state import ConnectionState, ConnTuple

log = logging.getLogger(__name__)

# The accepts run inside the downtime (about 12 us each here: a full queue of 4,097 added 50 ms): beyond this many
# in all, the rest are reset with the listener, as before. One listener's queue holds net.core.somaxconn (4,096 by
# default) + 1.
MAX_ACCEPTED = 4097
# fds left free for the rest of the move and the caller's handoff (a subprocess, socket activation...): the
# connections accepted never take the last ones
RESERVE_FDS = 64


def take_listeners(pidfd: PidFd, listeners: Sequence[ProcSocket]) -> list[socket.socket]:
    """Duplicates of the process's `listeners` (from the look) that still hold the socket they held then (inode),
    as socket objects of this process. A listener closed since, or one that cannot be taken, is left out: it dies
    with the program as it would have. Never raises for one listener (it runs past the point of no return)."""
    taken: list[socket.socket] = []
    for s in listeners:
        try:
            fd = pidfd.getfd_if_same(s.fd, s.inode)
        except (ProcessError, OSError):  # past the point of no return: a listener not taken dies with the program
            continue
        if fd is None:
            continue
        try:
            # drain() sets O_NONBLOCK on the listener's open file, for a moment
            taken.append(shared_socket(fd))
        except OSError:
            with contextlib.suppress(OSError):
                os.close(fd)
    return taken


@dataclass
class Backlog:
    """The connections drain() accepted: `socks` (blocking sockets, as restored ones are) and their `tuples`."""

    socks: list[socket.socket] = field(default_factory=list)
    tuples: list[ConnTuple] = field(default_factory=list)


def _fd_room(reserve: int) -> int:
    """How many more fds this process may open, keeping `reserve` and RESERVE_FDS free (negative: already fewer
    free). Raises OSError."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_ACCEPTED
    return soft - len(os.listdir("/proc/self/fd")) - RESERVE_FDS - reserve


def drain(listeners: list[socket.socket], reserve: int = 0) -> Backlog:
    """Accept every connection waiting in the accept queues of `listeners`, without waiting for more, then close
    them (the program's exit then closes the listener: what arrives until then is reset, later refused, as before).
    Connections come listener by listener, in queue order; one its peer reset meanwhile is left out. Beyond
    MAX_ACCEPTED, or beyond this process's fd limit less `reserve` (what the caller still has to open) and
    RESERVE_FDS, the rest stay queued, and are reset with the listener. The O_NONBLOCK the accepts need is set on
    the listener's open file (shared by every holder of it) only for as long as they run. Never raises OSError."""
    backlog = Backlog()
    room: int | None = None  # counted once one is accepted: an empty queue, the usual case, costs one accept()
    try:
        for listener in listeners:
            try:
                flags = fcntl.fcntl(listener.fileno(), fcntl.F_GETFL)
                fcntl.fcntl(listener.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                while room is None or len(backlog.socks) < room:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.ECONNABORTED:  # reset in the queue: the kernel skips it
                            continue
                        break
                    if room is None:
                        try:
                            left = _fd_room(reserve)
                        except OSError:
                            left = -1
                        if left < 0:  # no room even for this one: it ends with the listener's queue, as before
                            conn.close()
                            room = 0
                            break
                        room = min(1 + left, MAX_ACCEPTED)
                    try:
                        conn.setblocking(True)
                        backlog.tuples.append(read_tuple(session_of(conn)))
                    except (OSError, ValueError):  # reset by its peer since: no address any more
                        conn.close()
                        continue
                    backlog.socks.append(conn)
            finally:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(listener.fileno(), fcntl.F_SETFL, flags)
    finally:
        close_all(listeners)
    return backlog


def close_all(listeners: list[socket.socket]) -> None:
    """Close the duplicates."""
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.close()
    listeners.clear()


def checkpoint_accepted(backlog: Backlog) -> tuple[list[ConnectionState], Backlog]:
    """Checkpoint the accepted connections of `backlog`, for a move into another namespace (their tuples locked by
    the caller: in repair mode a socket still takes in what arrives). Returns their states, and the connections
    that could not be checkpointed (refused: urgent data, TCP-MD5 keys inherited from the listener...; or failing),
    taken out of `backlog` and left open: the caller unlocks them, then reset() them. Never raises for one
    connection (it runs past the point of no return)."""
    states: list[ConnectionState] = []
    kept, failed = Backlog(), Backlog()
    for sock, conn in zip(backlog.socks, backlog.tuples, strict=True):
        try:
            states.append(checkpoint(sock))
            into = kept
        except (SockrepairError, OSError):
            into = failed
        into.socks.append(sock)
        into.tuples.append(conn)
    backlog.socks, backlog.tuples = kept.socks, kept.tuples
    return states, failed


_LINGER_NOW = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}: close(2) sends a RST


def reset(backlog: Backlog) -> None:
    """End the connections of `backlog` as the listener's close ends those still queued (inet_csk_listen_stop): a
    RST, sent now (SO_LINGER 0; one in repair mode is taken out of it first, or its close would be silent), marked
    SOCCR_MARK: the lock lets it pass even when its 4-tuple is still locked for another socket (a moved one the
    peer reset before it connected again from the same port), and a peer that only waits learns. Never raises."""
    for sock in backlog.socks:
        with contextlib.suppress(OSError, SockrepairError):
            if in_repair(sock.fileno()):
                resume(sock)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCCR_MARK)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NOW)
        sock.close()
    backlog.socks, backlog.tuples = [], []


def reset_taken(backlog: Backlog, moved: Sequence[ConnTuple]) -> None:
    """reset() the connections of `backlog` whose 4-tuple is one of `moved`'s, and take them out of it: the program
    holds the moved one in CLOSE (its peer reset it during the freeze and connected again from the same port), and
    two sockets of one 4-tuple cannot be restored (in one namespace the accepted socket holds the tuple and the
    moved one's repair-mode connect fails, EADDRINUSE; an image directory naming a tuple twice is refused whole).
    Never raises."""
    taken = {t.wire() for t in moved}
    _keep_only(backlog, lambda wire: wire not in taken)


def _keep_only(backlog: Backlog, keeps: Callable[[ConnTuple], bool]) -> None:
    """Leave in `backlog` the connections whose wire() tuple `keeps`, in their order, and reset() the others."""
    kept, dropped = Backlog(), Backlog()
    for sock, conn in zip(backlog.socks, backlog.tuples, strict=True):
        into = kept if keeps(conn.wire()) else dropped
        into.socks.append(sock)
        into.tuples.append(conn)
    backlog.socks, backlog.tuples = kept.socks, kept.tuples
    reset(dropped)


def carry(backlog: Backlog, moved: Sequence[ConnTuple], locks: Sequence[tuple[Locker, int | None]], ttl: float,
          save: Callable[[list[ConnectionState], list[ConnTuple]], None], guard: Freezer, index: Path,
          timed: Callable[[str], contextlib.AbstractContextManager[object]] = lambda _step: contextlib.nullcontext()
          ) -> list[ConnectionState]:
    """The connections drain() accepted, for a restore elsewhere (another namespace, or a later `sockrepair restore`),
    where the sockets cannot go as they are: locked with each of `locks` (a Locker and its recorder's group: what
    their peers send is kept), checkpointed, `save`d with their tuples (into the journal or the image directory),
    closed silently; their states are returned, in the order of the tuples left in `backlog` (its sockets gone), for
    the restore with the `moved` connections. Only those on a local address of a moved connection go: another one (a
    listener on 0.0.0.0 reached through an address that stays) could not be restored there, and would fail the
    restore of all; nor may one whose 4-tuple is a moved connection's (the caller resets those first: reset_taken).
    Those that stay, one that cannot be checkpointed, or all of them when a step up to `save` fails, are unlocked
    and reset(): they end as the listener's close ended them before. `timed(step)` times the steps "lock",
    "checkpoint" and "close" (`save` times its own). `guard`: the move's Freezer, whose guard holds duplicates of
    the connections from before their lock until they are saved (Freezer.guard_accepted): if this process is killed
    meanwhile, the guard resets those that `index` (the file `save` writes last: journal.json, index.json) does not
    list yet (a peer would otherwise wait for an answer nobody gives: locked, then in nobody's hands once the lock
    expired).
    Never raises but for an interrupt (the caller holds signals off until this returns) or a failure of the last,
    silent closes."""
    going = {(t.wire().family, t.wire().local_addr) for t in moved}
    _keep_only(backlog, lambda wire: (wire.family, wire.local_addr) in going)
    if not backlog.socks:
        return []
    try:
        guard.guard_accepted(backlog.socks, backlog.tuples, index)
        with timed("lock"):
            for locker, group in locks:
                locker.lock(backlog.tuples, ttl=ttl, group=group)
        with timed("checkpoint"):
            states, failed = checkpoint_accepted(backlog)
        if failed.socks:
            for locker, _ in locks:
                locker.unlock(failed.tuples)
            reset(failed)
        if states:
            save(states, backlog.tuples)
    except Exception as exc:  # the moved connections go on: these end as they would have before
        log.warning("the %d connection(s) accepted from the program's listeners are reset: %s", len(backlog.socks),
                    exc)
        for locker, _ in locks:
            with contextlib.suppress(Exception):
                locker.unlock(backlog.tuples)
        reset(backlog)
        _unguard(guard)
        return []
    _unguard(guard)  # saved: a restore brings them back (the guard, killed before this, reset none of them)
    with timed("close"):
        # saved: from here on they are restored, so each is closed in repair mode whatever discard() says
        for sock, state in zip(backlog.socks, states, strict=True):
            try:
                discard(sock, state)
            except Exception:
                sock.close()
    backlog.socks = []
    return states


def _unguard(guard: Freezer) -> None:
    with contextlib.suppress(ProcessError):  # a guard gone holds nothing
        guard.unguard_accepted()
