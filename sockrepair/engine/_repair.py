"""Repair mode itself: switching it on and off and selecting the queue that TCP_QUEUE_SEQ and send/recv address."""

from __future__ import annotations

import errno

from sockrepair.engine._ffi import lib
from sockrepair.engine._sockcall import IntCalls, fail
from sockrepair.errors import NotPermittedError, SocketCallError, UnsupportedError

TCP = lib.IPPROTO_TCP
TCP_REPAIR = lib.TCP_REPAIR
TCP_REPAIR_QUEUE = lib.TCP_REPAIR_QUEUE
_close = lib.close


def repair_on(fd: int, calls: IntCalls | None = None) -> None:
    try:
        (calls or IntCalls(fd)).set(TCP, TCP_REPAIR, lib.TCP_REPAIR_ON, "TCP_REPAIR")
    except SocketCallError as exc:
        if exc.errno == errno.EPERM:
            raise NotPermittedError(
                f"TCP_REPAIR on fd {fd} refused: it needs CAP_NET_ADMIN in the socket's network namespace "
                "(run as root, or grant the capability)"
            ) from None
        if exc.errno == errno.ENOPROTOOPT:
            raise UnsupportedError("this kernel has no TCP_REPAIR (needs Linux >= 3.5 built with it)") from None
        raise


def repair_off(fd: int, probe: bool, calls: IntCalls | None = None) -> None:
    """Leave repair mode. With `probe` the kernel sends a window probe, which makes the peer answer with an ACK and
    so retransmit at once whatever it sent while the connection was away; without it nothing goes on the wire."""
    value = lib.TCP_REPAIR_OFF if probe else lib.TCP_REPAIR_OFF_NO_WP
    (calls or IntCalls(fd)).set(TCP, TCP_REPAIR, value, "TCP_REPAIR")


def select_queue(fd: int, queue: int, calls: IntCalls | None = None) -> None:
    (calls or IntCalls(fd)).set(TCP, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")


def close_silently(fd: int) -> None:
    """close(2) a socket in repair mode: the kernel drops it without FIN or RST."""
    if _close(fd) < 0:
        raise fail("close", fd)


QUEUE_NAMES = {lib.TCP_RECV_QUEUE: "receive queue", lib.TCP_SEND_QUEUE: "send queue", lib.TCP_NO_QUEUE: "no queue"}
