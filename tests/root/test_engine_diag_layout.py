"""engine/_diag.py reads a sock_diag message by one unpack of a layout learned from an earlier message of the same
length, which must check that message's attribute headers: each SockView it gives equals the one the attribute walk
gives, for sockets whose answers differ in family, options, congestion control names (of one padded length: the same
message length, other headers), TCP-MD5 keys and shutdown, and its options equal what getsockopt reads."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from sockrepair.engine import _diag
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine._session import _Session
from tests.root.pairs import FAMILIES, wait_for

SOL, TCP = socket.SOL_SOCKET, socket.IPPROTO_TCP
TCP_MD5SIG = 14
SO_MAX_PACING_RATE = 47
_STATES = (1 << 1) | (1 << 8)  # ESTABLISHED, CLOSE_WAIT


def _state(sock: socket.socket) -> int:
    return tcpinfo.read(sock, "tcpi_state")[0]


def _pairs(family: int, listen_addr: str, connect_addr: str, n: int) -> list[tuple[socket.socket, socket.socket]]:
    with socket.socket(family) as listener:
        listener.bind((listen_addr, 0))
        listener.listen(n)
        pairs = []
        for _ in range(n):
            client = socket.create_connection((connect_addr, listener.getsockname()[1]))
            server, _ = listener.accept()
            pairs.append((client, server))
    return pairs


def _md5_key(sock: socket.socket) -> None:
    """One TCP-MD5 key for the peer's address (struct tcp_md5sig: sockaddr_storage, flags, prefixlen, keylen,
    ifindex, key[80])."""
    peer = sock.getpeername()
    if sock.family == socket.AF_INET:
        addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + socket.inet_pton(socket.AF_INET, peer[0])
    else:
        addr = (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 0, 0)
                + socket.inet_pton(socket.AF_INET6, peer[0]))
    key = b"0123456789"
    sock.setsockopt(TCP, TCP_MD5SIG, addr.ljust(128, b"\0") + struct.pack("=BBHi", 0, 0, len(key), 0)
                    + key.ljust(80, b"\0"))


def _dump(session: _Session, family: int) -> list[tuple[bytes, int, int]]:
    """Every message of one dump: (the datagram, where the message's struct inet_diag_msg starts, its end)."""
    sock = _diag._netlink_for(session)
    body = _diag._REQ_HEAD.pack(family, socket.IPPROTO_TCP, _diag._DUMP_EXT, _STATES) + bytes(48)
    sock.send(_diag._NLMSG.pack(_diag._NLMSG.size + len(body), _diag.SOCK_DIAG_BY_FAMILY,
                                _diag.NLM_F_REQUEST | _diag.NLM_F_DUMP, 9, 0) + body)
    messages = []
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + _diag._NLMSG.size <= len(data):
            length, kind = _diag._NLMSG.unpack_from(data, off)[:2]
            if kind == _diag.NLMSG_DONE:
                return messages
            assert kind != _diag.NLMSG_ERROR
            messages.append((data, off + _diag._NLMSG.size, off + length))
            off += (length + 3) & ~3


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_a_layout_reads_every_message_as_the_attribute_walk_does(netns, family: int, listen_addr: str,
                                                                 connect_addr: str) -> None:
    pairs = _pairs(family, listen_addr, connect_addr, 8)
    try:
        socks = [s for _, s in pairs]
        level, tos = (socket.IPPROTO_IP, socket.IP_TOS) if family == socket.AF_INET else (socket.IPPROTO_IPV6,
                                                                                           socket.IPV6_TCLASS)
        socks[1].setsockopt(level, tos, 0x28)
        socks[1].setsockopt(SOL, socket.SO_MARK, 0x1234)
        socks[1].setsockopt(SOL, socket.SO_PRIORITY, 6)
        # "reno\0" and "cubic\0" both pad to 8 bytes: messages of one length whose headers differ
        socks[2].setsockopt(TCP, socket.TCP_CONGESTION, b"reno")
        socks[3].setsockopt(TCP, socket.TCP_CONGESTION, b"cubic")
        socks[3].setsockopt(SOL, socket.SO_SNDBUF, 96 << 10)
        socks[3].setsockopt(SOL, SO_MAX_PACING_RATE, 1_000_000)
        socks[4].setsockopt(SOL, socket.SO_BINDTODEVICE, b"lo")
        _md5_key(socks[5])
        socks[6].shutdown(socket.SHUT_RD)
        pairs[7][0].shutdown(socket.SHUT_WR)  # the FIN received sets RCV_SHUTDOWN too (tcp_fin)
        wait_for(lambda: _state(socks[7]) == 8, "CLOSE_WAIT")
        session = _Session(socks[0].fileno())
        _diag._layouts.clear()
        messages = _dump(session, family)
        by_inode = {os.fstat(s.fileno()).st_ino: s for s in socks}
        seen = {}
        for data, msg, end in messages:
            view = _diag._view(data, msg, end, {})
            assert view == _diag._walk(data, msg, end, {})
            inode = _diag._U32.unpack_from(data, msg + _diag._INODE_AT)[0]
            if inode in by_inode:
                seen[inode] = view
        assert set(seen) == set(by_inode)
        # several messages shared one layout, and two of one length were told apart by their headers
        assert sum(map(len, _diag._layouts.values())) < len(messages)
        sizes = {end - msg for _, msg, end in messages}
        assert any(len(_diag._layouts[size]) > 1 for size in sizes)
        for inode, sock in by_inode.items():
            view = seen[inode]
            shown = view.tos if family == socket.AF_INET else view.tclass
            assert shown == sock.getsockopt(level, tos)
            assert view.mark == sock.getsockopt(SOL, socket.SO_MARK)
            assert view.sndbuf == sock.getsockopt(SOL, socket.SO_SNDBUF)
            assert view.rcvbuf == sock.getsockopt(SOL, socket.SO_RCVBUF)
            assert view.congestion == sock.getsockopt(TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()
            assert view.ifindex == sock.getsockopt(SOL, 62)  # SO_BINDTOIFINDEX
            assert view.tuple.local_port == sock.getsockname()[1]
            assert view.tuple.remote_port == sock.getpeername()[1]
            assert view.state == _state(sock)
            # with no net_cls classid, CLASS_ID is sk_priority; tcp_info's u64 rate as the int getsockopt gives
            assert view.class_id == sock.getsockopt(SOL, socket.SO_PRIORITY)
            assert view.max_pacing_rate is not None
            assert struct.unpack("=i", struct.pack("=I", min(view.max_pacing_rate, 0xFFFFFFFF)))[0] == sock.getsockopt(
                SOL, SO_MAX_PACING_RATE)
        assert [seen[os.fstat(s.fileno()).st_ino].md5_keys for s in socks] == [0, 0, 0, 0, 0, 1, 0, 0]
        assert [seen[os.fstat(s.fileno()).st_ino].shutdown for s in socks] == [0, 0, 0, 0, 0, 0, 1, 1]
        assert [seen[os.fstat(s.fileno()).st_ino].state for s in socks] == [1] * 7 + [8]
        assert [seen[os.fstat(s.fileno()).st_ino].class_id for s in socks] == [0, 6, 0, 0, 0, 0, 0, 0]
        rates = [seen[os.fstat(s.fileno()).st_ino].max_pacing_rate for s in socks]
        assert rates == [(1 << 64) - 1] * 3 + [1_000_000] + [(1 << 64) - 1] * 4
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
