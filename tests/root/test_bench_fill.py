"""The engine benchmark's filled queues hold still: a single cycle takes no lock, so a byte the kernel's timers send
later would land in some cycle's freeze, and discard refuses a socket that sent while frozen."""

from __future__ import annotations

import socket
import time

from sockrepair.bench.bench_engine import PEER_RCVBUF, _connect, _fill_send_queue, _listener, _snd_wnd, _stream
from sockrepair.engine._ffi import lib
from sockrepair.engine._sockcall import ioctl_int
from sockrepair.netns import NetNS

# The zero-window probe timer fires an RTO (200 ms at least) after the window closed: well inside this.
PAST_THE_PROBE_TIMER = 0.6


def _queues(sock: socket.socket) -> tuple[int, int]:
    return ioctl_int(sock.fileno(), lib.SIOCOUTQ, "SIOCOUTQ"), ioctl_int(sock.fileno(), lib.SIOCOUTQNSD, "SIOCOUTQNSD")


def test_a_filled_send_queue_sends_nothing_past_the_probe_timer(netns: NetNS) -> None:
    q = 4096
    with _listener(PEER_RCVBUF) as listener:
        sock = _connect(listener, 2 * q + (1 << 20))
        peer, _ = listener.accept()
    with sock, peer:
        sent = _fill_send_queue(sock, peer, q, _stream(1, 4 << 20))
        before = _queues(sock)
        time.sleep(PAST_THE_PROBE_TIMER)
        assert before == (q, q) == _queues(sock)
        assert _snd_wnd(sock) == 0
        assert ioctl_int(peer.fileno(), lib.SIOCINQ, "SIOCINQ") == sent - q
