"""sock_diag (NETLINK_SOCK_DIAG) for one connection: what no getsockopt shows. The true length of the receive queue
(rcv_nxt - copied_seq: SIOCINQ stops at an urgent mark), the TCP-MD5 keys (INET_DIAG_MD5SIG, only to CAP_NET_ADMIN),
the upper-layer protocol (INET_DIAG_ULP_INFO) and the shutdown bits (INET_DIAG_SHUTDOWN).

The request names the connection by its 4-tuple with no cookie (net/ipv4/inet_diag.c inet_diag_find_one_icsk), in
the network namespace of the socket: the netlink socket is opened there (SIOCGSKNS gives that namespace), and the
last one is kept per thread, so a run of checkpoints in one namespace opens one; a forked child forgets it."""

from __future__ import annotations

import errno
import operator
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._session import _Session
from sockrepair.engine._sockopts import decode_name
from sockrepair.engine._tcpopts import INFO_HEAD
from sockrepair.errors import NotPermittedError, SocketCallError
from sockrepair.state import ConnTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_INFO, INET_DIAG_SHUTDOWN, INET_DIAG_MD5SIG, INET_DIAG_ULP_INFO = 2, 8, 18, 19
NO_COOKIE = b"\xff" * 8  # INET_DIAG_NOCOOKIE: any socket with this 4-tuple
SOL_SOCKET, SO_COOKIE = lib.SOL_SOCKET, lib.SO_COOKIE
_COOKIE, _COOKIE_HALVES = struct.Struct("=Q"), struct.Struct("=II")
_LITTLE_ENDIAN = sys.byteorder == "little"
_NLMSG = struct.Struct("=IHHII")
_REQ_HEAD = struct.Struct("=BBBxI")  # sdiag_family, sdiag_protocol, idiag_ext, pad, idiag_states
_PORTS = struct.Struct("!HH")
_IFINDEX = struct.Struct("=I")
_MSG_QUEUES = struct.Struct("=II")  # idiag_rqueue, idiag_wqueue, in inet_diag_msg after family..expires
_MSG_SIZE = 72  # struct inet_diag_msg
_QUEUES_AT = 56
_ATTR = struct.Struct("=HH")
_MD5_KEY_SIZE = 100  # struct tcp_diag_md5sig: family, prefixlen, keylen, ifindex, addr[4], key[80]


class _Cache(threading.local):
    netns: int = -1
    sock: socket.socket | None = None

    def __init__(self) -> None:
        # an answer is read into this buffer and copied out at its size: recv() of a new 64 KiB bytes object for
        # an answer of some 500 bytes costs more than the kernel's work for it
        self.buf = bytearray(1 << 16)


_cache = _Cache()


def _forget_after_fork() -> None:
    # a forked child (the freeze guard is one) shares the parent's netlink socket: a request of each at once mixes
    # their answers, and a dump under way in the other is EBUSY; the child opens its own when it needs one
    sock, _cache.sock, _cache.netns = _cache.sock, None, -1
    if sock is not None:
        sock.close()


os.register_at_fork(after_in_child=_forget_after_fork)


def _netlink_for(session: _Session) -> socket.socket:
    """A sock_diag socket in the network namespace of the session's socket."""
    nsfd = lib.ioctl(session.fd, lib.SIOCGSKNS)
    if nsfd < 0:
        if ffi.errno == errno.EPERM:
            raise NotPermittedError(
                f"reading fd {session.fd} through sock_diag refused: it needs CAP_NET_ADMIN in the socket's network "
                "namespace, as TCP_REPAIR does (run as root, or grant the capability)", fd=session.fd)
        raise session.fail("ioctl(SIOCGSKNS)")
    try:
        netns = os.fstat(nsfd).st_ino
        if _cache.sock is not None and _cache.netns == netns:
            return _cache.sock
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if lib.setns(nsfd, lib.CLONE_NEWNET) < 0:
                raise session.fail("setns(the socket's network namespace)")
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
            finally:
                if lib.setns(own, lib.CLONE_NEWNET) < 0:
                    raise session.fail("setns(back)")
        finally:
            os.close(own)
    finally:
        os.close(nsfd)
    if _cache.sock is not None:
        _cache.sock.close()
    _cache.netns, _cache.sock = netns, sock
    return sock


NLM_F_DUMP = 0x300
NLMSG_DONE = 3
_INODE_AT = 68  # idiag_inode in struct inet_diag_msg
# a message's nlmsg_len, nlmsg_type and idiag_inode
_NLMSG_INODE = struct.Struct(f"=IH{_NLMSG.size - 6 + _INODE_AT}xI")


def connecting_tuple(session: _Session, family: int, tcp_state: int) -> ConnTuple | None:
    """The 4-tuple of the session's socket when getpeername cannot say it (SYN_SENT: ENOTCONN), from a sock_diag
    dump of the sockets in `tcp_state`, matched by inode; None when it is not among them."""
    sock = _netlink_for(session)
    inode = os.fstat(session.fd).st_ino
    body = _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 1 << tcp_state) + bytes(48)
    try:
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 2, 0) + body)
        found = None
        while True:
            data = sock.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind = _NLMSG.unpack_from(data, off)[:2]
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSG.size)
                    raise SocketCallError(-err, "sock_diag dump", session.fd)
                msg = off + _NLMSG.size
                if struct.unpack_from("=I", data, msg + _INODE_AT)[0] == inode:
                    sport, dport = _PORTS.unpack_from(data, msg + 4)
                    size = 4 if family == socket.AF_INET else 16
                    local = socket.inet_ntop(family, data[msg + 8 : msg + 8 + size])
                    remote = socket.inet_ntop(family, data[msg + 24 : msg + 24 + size])
                    found = ConnTuple(family, local, sport, remote, dport)
                off += (length + 3) & ~3
    except OSError as exc:
        if isinstance(exc, SocketCallError):
            raise
        raise SocketCallError(exc.errno or errno.EIO, "sock_diag dump", session.fd) from None


# struct inet_diag_req_v2 after its head: sport, dport (big-endian), src[16], dst[16], if, cookie[2]
_REQ_ID = struct.Struct("!HH16s16s")
_REQ_SIZE = _NLMSG.size + _REQ_HEAD.size + _REQ_ID.size + _IFINDEX.size + len(NO_COOKIE)


def _request(conn: ConnTuple, ifindex: int, cookie: bytes = NO_COOKIE) -> bytes:
    family = conn.family
    # the attributes a dump asks for: a checkpoint takes its DUMPED options from them (engine/_checkpoint.py)
    head = _REQUEST_HEADS.get(family)
    if head is None:
        head = _REQUEST_HEADS[family] = (
            _NLMSG.pack(_REQ_SIZE, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
            + _REQ_HEAD.pack(family, socket.IPPROTO_TCP, _DUMP_EXT, 0xFFFFFFFF))
    # "16s" pads an IPv4 address with zeros, as the kernel reads it
    return (head + _REQ_ID.pack(conn.local_port, conn.remote_port, inet_pton(family, conn.local_addr),
                                inet_pton(family, conn.remote_addr)) + _IFINDEX.pack(ifindex) + cookie)


# per family: the netlink header and struct inet_diag_req_v2's head of every request (all but the socket's id)
_REQUEST_HEADS: dict[int, bytes] = {}
inet_pton = socket.inet_pton


def _ask(sock: socket.socket, request: bytes, session: _Session, conn: ConnTuple) -> tuple[bytes, int]:
    """The answer to one sock_diag request, and the error the kernel answered with (0 for none)."""
    buf = _cache.buf
    try:
        sock.send(request)
        data = bytes(memoryview(buf)[: sock.recv_into(buf)])
    except OSError as exc:
        raise SocketCallError(exc.errno or errno.EIO, "sock_diag", session.fd, tuple=conn) from None
    if _NLMSG.unpack_from(data)[1] == NLMSG_ERROR:
        return data, -struct.unpack_from("=i", data, _NLMSG.size)[0]
    return data, 0


def diag(session: _Session, conn: ConnTuple, ifindex: int) -> SockView:
    """The sock_diag view of the session's connection `conn` (`ifindex`: the device it is bound to, 0 for none),
    read as a dump's (_view): the reply is the same struct inet_diag_msg with its attributes.
    Raises NotPermittedError without CAP_NET_ADMIN in the socket's network namespace, SocketCallError (op
    "sock_diag") when the kernel answers with an error: ENOENT when no socket has this 4-tuple any more, or when
    the one found is not this socket.

    Every request carries the socket's own cookie (SO_COOKIE), which inet_diag_find_one_icsk checks: the lookup
    behind it is the one an arriving segment makes, so for an accepted socket bound to a device (an IPv6
    link-local one is bound to its scope's) and asked for with another `ifindex` it falls back to the listener,
    whose accept queue would read as this socket's receive queue. The netlink socket this thread used last is asked
    first, which spares finding the socket's namespace (SIOCGSKNS, fstat, close) when it is the same; otherwise
    the request is made again in the socket's namespace. Without a cookie (SO_COOKIE unreadable) a listener's
    answer counts as ENOENT."""
    try:
        raw = session.sock.getsockopt(SOL_SOCKET, SO_COOKIE, 8)
    except OSError:
        raw = b""
    if len(raw) != 8:
        raw = NO_COOKIE
    elif not _LITTLE_ENDIAN:
        # idiag_cookie is two u32s, the low half first (sock_diag_check_cookie): on a little-endian host the u64's
        # own bytes
        cookie = _COOKIE.unpack(raw)[0]
        raw = _COOKIE_HALVES.pack(cookie & 0xFFFFFFFF, cookie >> 32)
    request = _request(conn, ifindex, raw)
    err = errno.ENOENT
    if _cache.sock is not None:
        data, err = _ask(_cache.sock, request, session, conn)
    if err in (errno.ENOENT, errno.ESTALE):
        data, err = _ask(_netlink_for(session), request, session, conn)
    if err:
        raise SocketCallError(errno.ENOENT if err == errno.ESTALE else err, "sock_diag", session.fd, tuple=conn)
    view = _view(data, _NLMSG.size, _NLMSG.unpack_from(data)[0], {}, conn)
    if raw == NO_COOKIE and view.state == lib.TCP_LISTEN:
        raise SocketCallError(errno.ENOENT, "sock_diag", session.fd, tuple=conn)
    return view


INET_DIAG_CONG, INET_DIAG_TOS, INET_DIAG_TCLASS, INET_DIAG_SKMEMINFO = 4, 5, 6, 7
INET_DIAG_MARK, INET_DIAG_CLASS_ID, INET_DIAG_SOCKOPT = 15, 17, 22
_MAX_PACING, _MAX_PACING_AT = tcpinfo.view("tcpi_max_pacing_rate"), tcpinfo.offset("tcpi_max_pacing_rate")
# struct inet_diag_sockopt, first byte (little-endian bitfields): recverr, is_icsk, freebind, hdrincl, mc_loop,
# transparent, ...
SOCKOPT_RECVERR, SOCKOPT_FREEBIND, SOCKOPT_TRANSPARENT = 0x01, 0x04, 0x20
# The TCLASS bit asks for INET_DIAG_CLASS_ID too, in either family (idiag_ext is a u8: CLASS_ID's own bit, 1 << 16,
# does not fit; inet_diag_msg_attrs_fill answers either); INET_DIAG_TCLASS itself comes for AF_INET6 only.
_DUMP_EXT = sum(1 << (kind - 1) for kind in (INET_DIAG_INFO, INET_DIAG_CONG, INET_DIAG_TOS, INET_DIAG_TCLASS,
                                             INET_DIAG_SKMEMINFO))
_DUMP_HEAD = struct.Struct("=BBBBHH")  # family, state, timer, retrans, sport, dport (ports big-endian: swapped)
_IF_AT, _U32 = 40, struct.Struct("=I")
_MEMINFO = struct.Struct("=4I")  # u32 sk_meminfo[]: SK_MEMINFO_RMEM_ALLOC, _RCVBUF, _WMEM_ALLOC, _SNDBUF
_OPTMEM = struct.Struct("=24xI")  # SK_MEMINFO_OPTMEM (sk_omem_alloc), after _FWD_ALLOC and _WMEM_QUEUED


class SockView(NamedTuple):
    """One socket in a sock_diag dump or the answer to one request (struct inet_diag_msg and its attributes,
    net/ipv4/inet_diag.c inet_sk_diag_fill): `tuple` as getsockname/getpeername give it, `state` (sk_state), `info`
    the struct tcp_info bytes up to its window scales (INET_DIAG_INFO; b"" when the kernel sent none), `rqueue`
    rcv_nxt - copied_seq (a received FIN counts 1), `md5_keys` how many TCP-MD5 keys the socket has
    (INET_DIAG_MD5SIG, only to CAP_NET_ADMIN), `ulp` whether an upper-layer protocol is attached
    (INET_DIAG_ULP_INFO), `shutdown` sk_shutdown (1 receive side, 2 send side), `ifindex` (sk_bound_dev_if), and
    the options the dump shows, each None when the kernel did not send its attribute: `tos` (inet->tos,
    INET_DIAG_TOS) and `tclass` (IPv6 sockets, INET_DIAG_TCLASS), `mark` (sk_mark, INET_DIAG_MARK: to CAP_NET_ADMIN
    only), `congestion` (INET_DIAG_CONG), `sndbuf` / `rcvbuf` (sk_sndbuf / sk_rcvbuf, INET_DIAG_SKMEMINFO), `sockopt`
    (the first byte of struct inet_diag_sockopt, INET_DIAG_SOCKOPT, Linux 5.10+), `class_id` (INET_DIAG_CLASS_ID: the
    net_cls cgroup's classid, or sk_priority when that is 0, so 0 only when sk_priority is 0) and `max_pacing_rate`
    (tcp_info's tcpi_max_pacing_rate: sk_max_pacing_rate, ~0 as 2**64 - 1), `optmem` (SKMEMINFO's sk_omem_alloc: what
    sock_kmalloc and a socket filter charge the socket)."""

    tuple: ConnTuple
    state: int
    info: bytes
    rqueue: int
    md5_keys: int
    ulp: bool
    shutdown: int
    ifindex: int
    tos: int | None
    tclass: int | None
    mark: int | None
    congestion: str | None
    sndbuf: int | None
    rcvbuf: int | None
    sockopt: int | None
    class_id: int | None
    max_pacing_rate: int | None
    optmem: int | None


INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP, INET_DIAG_BC_S_EQ = 1, 11
_BC_OP = struct.Struct("=BBH")  # struct inet_diag_bc_op: code, yes, no (byte offsets forward)
FILTER_PORTS_MAX = 16  # more local ports than this: the dump is not filtered (one condition per port)


def ports_filter(ports: Collection[int]) -> bytes:
    """The INET_DIAG_REQ_BYTECODE attribute of a dump that lists only the sockets whose local port is one of
    `ports` (b"" for none, or more than FILTER_PORTS_MAX: no filter), run by the kernel on each socket
    (net/ipv4/inet_diag.c inet_diag_bc_run).

    A socket passes when the program's run ends exactly at its end, and fails when it jumps past it. The audit
    (inet_diag_bc_audit) follows the `yes` offsets from the start and accepts a `no` offset only to a place on that
    path, so each port's test (S_EQ, its port in the next op's `no`) is followed by an unconditional jump to the end
    (JMP: `no` taken) that a match falls into, and a mismatch skips it to the next test; the last test's mismatch
    jumps 4 bytes past the end."""
    order = sorted(set(ports))
    if not order or len(order) > FILTER_PORTS_MAX:
        return b""
    ops = []
    for i, port in enumerate(order):
        ops.append(_BC_OP.pack(INET_DIAG_BC_S_EQ, 8, 12) + _BC_OP.pack(0, 0, port))
        if i + 1 < len(order):
            ops.append(_BC_OP.pack(INET_DIAG_BC_JMP, 4, 12 * (len(order) - 1 - i)))
    code = b"".join(ops)
    return _ATTR.pack(_ATTR.size + len(code), INET_DIAG_REQ_BYTECODE) + code


def dump_views(session: _Session, families: set[int], states: int, inodes: set[int],
               local_ports: Collection[int] = ()) -> dict[int, SockView]:
    """One sock_diag dump per family in `families` of the TCP sockets in the `states` (a bit per TCP state) of the
    network namespace of the session's socket: the SockView of each socket whose inode is in `inodes`, by inode.
    `local_ports`: the local ports (host order) of those sockets, when known; the kernel then lists only the
    sockets on them (ports_filter), which spares reading the rest of a busy namespace. Raises NotPermittedError
    without CAP_NET_ADMIN there, SocketCallError (op "sock_diag dump") when the kernel answers with an error."""
    sock = _netlink_for(session)
    views: dict[int, SockView] = {}
    bytecode = ports_filter(local_ports)
    for family in sorted(families):
        body = _REQ_HEAD.pack(family, socket.IPPROTO_TCP, _DUMP_EXT, states) + bytes(48) + bytecode
        try:
            sock.send(_NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 3, 0)
                      + body)
            _read_dump(sock, session, inodes, views)
        except OSError as exc:
            if isinstance(exc, SocketCallError):
                raise
            raise SocketCallError(exc.errno or errno.EIO, "sock_diag dump", session.fd) from None
    return views


def _read_dump(sock: socket.socket, session: _Session, inodes: set[int], views: dict[int, SockView]) -> None:
    unpack_nlmsg, unpack_socket = _NLMSG.unpack_from, _NLMSG_INODE.unpack_from
    buf = bytearray(1 << 16)
    texts: dict[bytes, str] = {}  # a dump repeats a few addresses: each is turned into text once
    while True:
        size = sock.recv_into(buf)
        data = bytes(memoryview(buf)[:size])
        off = 0
        while off + _NLMSG.size <= size:
            # a socket's message is at least _NLMSG_INODE long; NLMSG_DONE and NLMSG_ERROR may be shorter
            if off + _NLMSG_INODE.size <= size:
                length, kind, inode = unpack_socket(data, off)
            else:
                length, kind = unpack_nlmsg(data, off)[:2]
                inode = -1
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, off + _NLMSG.size)
                raise SocketCallError(-err, "sock_diag dump", session.fd)
            if inode in inodes:
                views[inode] = _view(data, off + _NLMSG.size, off + length, texts)
            off += (length + 3) & ~3


def _text(texts: dict[bytes, str], family: int, raw: bytes) -> str:
    text = texts.get(raw)
    if text is None:
        text = texts[raw] = socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)
    return text


def _view(data: bytes, msg: int, end: int, texts: dict[bytes, str], conn: ConnTuple | None = None) -> SockView:
    """The SockView of the struct inet_diag_msg at `msg` (its attributes up to `end`); `conn`: the 4-tuple when the
    caller knows it (a request names the socket by it), else read from the message (`texts` caches addresses).

    The kernel puts the same attributes in the same order in the answer of every socket alike (inet_sk_diag_fill):
    a message is read by one unpack of the _Layout learned from the first of its length and attribute headers,
    which checks those headers; another is walked attribute by attribute (_walk) and its layout learned."""
    size = end - msg
    for layout in _layouts.get(size, ()):
        values = layout.struct.unpack_from(data, msg)
        if layout.headers(values) == layout.expected:
            break
    else:
        found = _learn(data, msg, end)
        if found is None:
            return _walk(data, msg, end, texts, conn)
        layout = found
        values = layout.struct.unpack_from(data, msg)
    if conn is None:
        family = values[0]
        conn = ConnTuple(family, _text(texts, family, values[4]), ntohs(values[2]), _text(texts, family, values[5]),
                         ntohs(values[3]))
    info, shutdown, tos, tclass, mark, raw_name, sndbuf, rcvbuf, sockopt, class_id, pacing, optmem = layout.pick(
        values + _ABSENT)
    congestion = None if raw_name is None else _name(raw_name)
    return SockView._make((conn, values[1], info, values[7], layout.md5_keys, layout.ulp, shutdown, values[6], tos,
                           tclass, mark, congestion, sndbuf, rcvbuf, sockopt, class_id, pacing, optmem))


# struct inet_diag_msg, as a _Layout reads it: family, state, sport, dport (big-endian), src, dst, ifindex, rqueue
_HEAD_FORMAT = "=BB2xHH16s16sI8x4xI12x"
_HEAD_ITEMS = 8
# What the SockView fields _Layout.pick takes hold when their attribute is absent: info, shutdown, tos, tclass,
# mark, congestion, sndbuf, rcvbuf, sockopt, class_id, max_pacing_rate, optmem
_ABSENT: tuple[object, ...] = (b"", 0, None, None, None, None, None, None, None, None, None, None)
_PICKED = ("info", "shutdown", "tos", "tclass", "mark", "congestion", "sndbuf", "rcvbuf", "sockopt", "class_id",
           "max_pacing_rate", "optmem")
_MAX_LAYOUTS = 64
ntohs = socket.ntohs


class _Layout(NamedTuple):
    """How every message of one length and one sequence of attribute headers is read: `struct` unpacks the
    message head, each attribute's header (nla_len, nla_type) and the values wanted; `headers` picks the headers
    from what it unpacked, which must equal `expected`; `pick` the SockView fields in _PICKED's order from what it
    unpacked followed by _ABSENT; `md5_keys` and `ulp` follow from the headers alone."""

    struct: struct.Struct
    headers: Callable[[tuple[Any, ...]], tuple[int, ...]]
    expected: tuple[int, ...]
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    md5_keys: int
    ulp: bool


_layouts: dict[int, list[_Layout]] = {}
_names: dict[bytes, str] = {}


def _name(raw: bytes) -> str:
    name = _names.get(raw)
    if name is None:
        name = decode_name(raw)
        if len(_names) < _MAX_LAYOUTS:
            _names[raw] = name
    return name


# The attributes a _Layout reads a value of, by kind: (SockView field, struct format of the value, its size)
_WANTED = {
    INET_DIAG_SHUTDOWN: ("shutdown", "B", 1),
    INET_DIAG_TOS: ("tos", "B", 1),
    INET_DIAG_TCLASS: ("tclass", "B", 1),
    INET_DIAG_MARK: ("mark", "I", 4),
    INET_DIAG_SOCKOPT: ("sockopt", "B", 1),
    INET_DIAG_CLASS_ID: ("class_id", "I", 4),
}


def _learn(data: bytes, msg: int, end: int) -> _Layout | None:
    """The _Layout of the message at `msg` (attributes up to `end`), kept for the next of its kind; None when one
    cannot read it (an attribute too short for its value, or a length that does not end at `end`)."""
    formats = [_HEAD_FORMAT]
    items = _HEAD_ITEMS
    header_at: list[int] = []
    expected: list[int] = []
    at_of: dict[str, int] = {}
    md5_keys = 0
    ulp = False
    off = msg + _MSG_SIZE
    while off + _ATTR.size <= end:
        alen, kind = _ATTR.unpack_from(data, off)
        padded = (alen + 3) & ~3
        if alen < _ATTR.size or off + padded > end:
            return None
        header_at += (items, items + 1)
        expected += (alen, kind)
        formats.append("HH")
        items += 2
        payload, room = alen - _ATTR.size, padded - _ATTR.size
        kind &= 0x3FFF
        wanted = _WANTED.get(kind)
        if wanted is not None:
            field, fmt, need = wanted
            if payload < need:
                return None
            formats.append(f"{fmt}{room - need}x")
            at_of[field] = items
            items += 1
        elif kind == INET_DIAG_INFO:
            if payload < INFO_HEAD:
                return None
            at_of["info"] = items
            items += 1
            if payload < _MAX_PACING.size:
                formats.append(f"{INFO_HEAD}s{room - INFO_HEAD}x")
            else:
                formats.append(f"{INFO_HEAD}s{_MAX_PACING_AT - INFO_HEAD}xQ{room - _MAX_PACING.size}x")
                at_of["max_pacing_rate"] = items
                items += 1
        elif kind == INET_DIAG_SKMEMINFO:
            if payload < _OPTMEM.size:
                return None
            formats.append(f"4xI4xI8xI{room - _OPTMEM.size}x")
            at_of["rcvbuf"], at_of["sndbuf"], at_of["optmem"] = items, items + 1, items + 2
            items += 3
        elif kind == INET_DIAG_CONG:
            formats.append(f"{payload}s{room - payload}x")
            at_of["congestion"] = items
            items += 1
        else:
            if kind == INET_DIAG_MD5SIG:
                md5_keys = payload // _MD5_KEY_SIZE
            elif kind == INET_DIAG_ULP_INFO:
                ulp = True
            formats.append(f"{room}x")
        off += padded
    layout_struct = struct.Struct("".join(formats))
    if off != end or layout_struct.size != end - msg or len(expected) < 2:
        return None
    layout = _Layout(layout_struct, operator.itemgetter(*header_at), tuple(expected),
                     operator.itemgetter(*(at_of.get(field, items + i) for i, field in enumerate(_PICKED))),
                     md5_keys, ulp)
    known = _layouts.setdefault(end - msg, [])
    if len(known) < _MAX_LAYOUTS:
        known.append(layout)
    return layout


def _walk(data: bytes, msg: int, end: int, texts: dict[bytes, str], conn: ConnTuple | None = None) -> SockView:
    """_view of a message no _Layout reads: attribute by attribute."""
    family, state, _, _, sport, dport = _DUMP_HEAD.unpack_from(data, msg)
    if conn is None:
        conn = ConnTuple(family, _text(texts, family, data[msg + 8 : msg + 24]), socket.ntohs(sport),
                         _text(texts, family, data[msg + 24 : msg + 40]), socket.ntohs(dport))
    ifindex = _U32.unpack_from(data, msg + _IF_AT)[0]
    rqueue = _MSG_QUEUES.unpack_from(data, msg + _QUEUES_AT)[0]
    info = b""
    md5_keys = shutdown = 0
    ulp = False
    tos = tclass = mark = sndbuf = rcvbuf = sockopt = class_id = pacing = optmem = None
    congestion = None
    unpack_attr = _ATTR.unpack_from
    off = msg + _MSG_SIZE
    # the most frequent first: every TCP socket has these in a dump, but the last two
    while off + _ATTR.size <= end:
        alen, kind = unpack_attr(data, off)
        if alen < _ATTR.size:
            break
        at = off + _ATTR.size
        kind &= 0x3FFF
        if kind == INET_DIAG_INFO:
            info = data[at : at + INFO_HEAD]
            if alen - _ATTR.size >= _MAX_PACING.size:
                pacing = _MAX_PACING.unpack_from(data, at)[0]
        elif kind == INET_DIAG_CLASS_ID:
            class_id = _U32.unpack_from(data, at)[0]
        elif kind == INET_DIAG_SHUTDOWN:
            shutdown = data[at]
        elif kind == INET_DIAG_MARK:
            mark = _U32.unpack_from(data, at)[0]
        elif kind == INET_DIAG_SOCKOPT:
            sockopt = data[at]
        elif kind == INET_DIAG_SKMEMINFO:
            _, rcvbuf, _, sndbuf = _MEMINFO.unpack_from(data, at)
            if alen - _ATTR.size >= _OPTMEM.size:
                optmem = _OPTMEM.unpack_from(data, at)[0]
        elif kind == INET_DIAG_TOS:
            tos = data[at]
        elif kind == INET_DIAG_CONG:
            congestion = decode_name(data[at : off + alen])
        elif kind == INET_DIAG_TCLASS:
            tclass = data[at]
        elif kind == INET_DIAG_MD5SIG:
            md5_keys = (alen - _ATTR.size) // _MD5_KEY_SIZE
        elif kind == INET_DIAG_ULP_INFO:
            ulp = True
        off += (alen + 3) & ~3
    return SockView(conn, state, info, rqueue, md5_keys, ulp, shutdown, ifindex, tos, tclass, mark, congestion,
                    sndbuf, rcvbuf, sockopt, class_id, pacing, optmem)
