"""The listen backlog of a program a move ends: connections the kernel completed for one of its listeners (the
three-way handshake done, the peer free to send) that the program had not accepted yet. Ending the program closes
the listener, and the kernel resets every connection still in its accept queue (inet_csk_listen_stop,
net/ipv4/inet_connection_sock.c): a peer that connected during the move, while the program was frozen, would see
its connection reset after it was established, its request lost.

So migrate() takes a duplicate of each listener the program alone holds (pidfd_getfd) right before it ends the
program: the duplicate keeps the listener open (and completing handshakes) after the program's exit, and once the
moved connections are live, what waits in its accept queue is accepted and handed off with them (a live socket
needs no repair). The duplicates are closed right after, as the program's exit would have closed the listener."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Sequence

from sockrepair.errors import ProcessError
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import ProcSocket
from sockrepair.state import ConnTuple

# the accept queue of one listener is at most net.core.somaxconn long (4096 by default); a bound all the same, so
# that a flood of new connections cannot keep the move from its handoff
MAX_ACCEPTED = 65536


def take_listeners(pidfd: PidFd, listeners: Sequence[ProcSocket]) -> list[socket.socket]:
    """Duplicates of the process's `listeners` (from the look) that still hold the socket they held then (inode),
    as socket objects of this process. A listener closed since, or one that cannot be taken, is left out: it dies
    with the program as it would have. Never raises for one listener (it runs past the point of no return)."""
    taken: list[socket.socket] = []
    for s in listeners:
        try:
            fd = pidfd.getfd_if_open(s.fd)
        except ProcessError:  # past the point of no return: a listener not taken only dies with the program
            continue
        if fd is None:
            continue
        try:
            if os.fstat(fd).st_ino != s.inode:
                os.close(fd)
                continue
            taken.append(socket.socket(fileno=fd))
        except OSError:
            with contextlib.suppress(OSError):
                os.close(fd)
    return taken


def _tuple(conn: socket.socket) -> ConnTuple:
    local, remote = conn.getsockname(), conn.getpeername()
    family = socket.AF_INET if len(local) == 2 else socket.AF_INET6
    return ConnTuple(family, local[0], local[1], remote[0], remote[1])


def accept_waiting(listeners: Sequence[socket.socket]) -> tuple[list[socket.socket], list[ConnTuple]]:
    """Accept every connection waiting in the accept queues of `listeners` without waiting for more: the
    connections (blocking sockets, as restored ones are) and their tuples, listener by listener in queue order.
    A connection its peer reset meanwhile (no peer address any more) is closed and left out."""
    socks: list[socket.socket] = []
    tuples: list[ConnTuple] = []
    for listener in listeners:
        listener.setblocking(False)
        while len(socks) < MAX_ACCEPTED:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:  # reset in the queue: the kernel skips it
                    continue
                break
            try:
                conn.setblocking(True)
                tuples.append(_tuple(conn))
            except OSError:
                conn.close()
                continue
            socks.append(conn)
    return socks, tuples


def close_all(listeners: list[socket.socket]) -> None:
    """Close the duplicates (what arrived after the accepts is reset, as at the program's exit)."""
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.close()
    listeners.clear()
