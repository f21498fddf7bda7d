"""The REFUSED entries of sockrepair.engine.registry, checked on a live socket: by checkpoint() right after repair
mode goes on (it then resumes the socket without a window probe: nothing reaches the wire), and by a process dump
on every socket before it freezes the process (sockrepair/move/take.py screen()).

Every check reads without changing anything: getsockopt, ioctl, recv(MSG_OOB | MSG_PEEK) and one sock_diag request.
Urgent data shows in two ways: an urgent byte not yet read (recv(MSG_OOB | MSG_PEEK) returns it, or EAGAIN while the
peer announced it without sending it yet), or one read with MSG_OOB whose mark is still ahead of the reader; in
both cases SIOCINQ stops at the mark while sock_diag's rqueue (rcv_nxt - copied_seq) is the queue's true length."""

from __future__ import annotations

import errno
import threading
from typing import NamedTuple

from sockrepair.engine._addr import read_tuple
from sockrepair.engine._diag import (
    SOCKOPT_RECVERR,
    SOCKOPT_TRANSPARENT,
    SockView,
    connecting_tuple,
    diag,
)
from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._session import CHARS, _Session, getsockopt, new
from sockrepair.engine._states import REPAIRABLE, closed_peer
from sockrepair.engine._tcpopts import tcp_info
from sockrepair.errors import SocketCallError, SocketStateError
from sockrepair.state import ConnTuple, state_name

SOL, TCP, IP, IPV6 = lib.SOL_SOCKET, lib.IPPROTO_TCP, lib.IPPROTO_IP, lib.IPPROTO_IPV6
RCV_SHUTDOWN = 1
HEADER_ENTRY = "IP_OPTIONS/IPV6_HOPOPTS/IPV6_RTHDR/IPV6_DSTOPTS/IPV6_RTHDRDSTOPTS"
# States reached by receiving the peer's FIN, which sock_diag's rqueue counts as one byte.
_FIN_RECEIVED = frozenset({lib.TCP_CLOSE_WAIT, lib.TCP_LAST_ACK, lib.TCP_CLOSING, lib.TCP_TIME_WAIT})
# (registry entry, level, option, option name, the value every new socket has): refused when it differs
_INTS = [
    ("SO_DONTROUTE", SOL, lib.SO_DONTROUTE, "SO_DONTROUTE", 0),
    *(("SO_TIMESTAMP/SO_TIMESTAMPNS/SO_TIMESTAMPING", SOL, opt, name, 0) for opt, name in (
        (lib.SO_TIMESTAMP_OLD, "SO_TIMESTAMP"), (lib.SO_TIMESTAMPNS_OLD, "SO_TIMESTAMPNS"),
        (lib.SO_TIMESTAMPING_OLD, "SO_TIMESTAMPING"), (lib.SO_TIMESTAMP_NEW, "SO_TIMESTAMP_NEW"),
        (lib.SO_TIMESTAMPNS_NEW, "SO_TIMESTAMPNS_NEW"), (lib.SO_TIMESTAMPING_NEW, "SO_TIMESTAMPING_NEW"))),
    ("SO_ZEROCOPY", SOL, lib.SO_ZEROCOPY, "SO_ZEROCOPY", 0),
    ("SO_PEEK_OFF", SOL, lib.SO_PEEK_OFF, "SO_PEEK_OFF", -1),
    ("TCP_TX_DELAY", TCP, lib.TCP_TX_DELAY, "TCP_TX_DELAY", 0),
]
_FAMILY_INTS = {
    lib.AF_INET: [
        ("IP_TRANSPARENT/IPV6_TRANSPARENT", IP, lib.IP_TRANSPARENT, "IP_TRANSPARENT", 0),
        ("IP_RECVERR/IPV6_RECVERR", IP, lib.IP_RECVERR, "IP_RECVERR", 0),
        ("IP_MINTTL/IPV6_MINHOPCOUNT", IP, lib.IP_MINTTL, "IP_MINTTL", 0),
    ],
    lib.AF_INET6: [
        ("IP_TRANSPARENT/IPV6_TRANSPARENT", IPV6, lib.IPV6_TRANSPARENT, "IPV6_TRANSPARENT", 0),
        ("IP_RECVERR/IPV6_RECVERR", IPV6, lib.IPV6_RECVERR, "IPV6_RECVERR", 0),
        ("IP_MINTTL/IPV6_MINHOPCOUNT", IPV6, lib.IPV6_MINHOPCOUNT, "IPV6_MINHOPCOUNT", 0),
        # a v4-mapped connection's IPv4 side
        ("IP_TRANSPARENT/IPV6_TRANSPARENT", IP, lib.IP_TRANSPARENT, "IP_TRANSPARENT", 0),
        ("IP_RECVERR/IPV6_RECVERR", IP, lib.IP_RECVERR, "IP_RECVERR", 0),
        ("IP_MINTTL/IPV6_MINHOPCOUNT", IP, lib.IP_MINTTL, "IP_MINTTL", 0),
    ],
}
# Options whose value is bytes, refused when there are any: (level, option, name)
_HEADER_OPTS = {
    lib.AF_INET: [(IP, lib.IP_OPTIONS, "IP_OPTIONS")],
    lib.AF_INET6: [(IP, lib.IP_OPTIONS, "IP_OPTIONS"), (IPV6, lib.IPV6_HOPOPTS, "IPV6_HOPOPTS"),
                   (IPV6, lib.IPV6_RTHDR, "IPV6_RTHDR"), (IPV6, lib.IPV6_DSTOPTS, "IPV6_DSTOPTS"),
                   (IPV6, lib.IPV6_RTHDRDSTOPTS, "IPV6_RTHDRDSTOPTS")],
}
_NAME_SIZE = 16
_HEADER_SIZE = 64  # enough to tell IP options or an extension header from none
_AO_INFO_SIZE = 48  # struct tcp_ao_info_opt
_OOB_FLAGS = lib.MSG_OOB | lib.MSG_PEEK | lib.MSG_DONTWAIT
# What getsockopt says for an option this kernel does not have (ENOPROTOOPT, EOPNOTSUPP) or that is unset (ENOENT:
# TCP-AO without keys).
_ABSENT = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOENT})
# SIOCINQ and the sock_diag rqueue are read again when data arrived in between (no lock holds the peer off).
_ATTEMPTS = 20


# The IPv4 flags INET_DIAG_SOCKOPT shows (struct inet_diag_sockopt).
_SOCKOPT_BITS = SOCKOPT_TRANSPARENT | SOCKOPT_RECVERR
# Enough to suspect any receive timestamping (net/core/sock.c sk_getsockopt): SO_TIMESTAMP_NEW reads 1 for
# SO_TIMESTAMPNS_NEW too (it sets SOCK_RCVTSTAMP as well), and SO_TIMESTAMPING_OLD reads the flags however they were
# set; refusals() then names the option.
_SUSPECT_INTS = [i for i in _INTS if i[2] not in (lib.SO_TIMESTAMPNS_NEW, lib.SO_TIMESTAMPING_NEW)]


class _IntChecks(NamedTuple):
    """Int options to check: `ints` as _INTS lists them, and their levels, options and fresh values, which one
    map() over the socket method reads and compares (no bytecode runs per option while none differs)."""

    ints: list[tuple[str, int, int, str, int]]
    levels: tuple[int, ...]
    opts: tuple[int, ...]
    fresh: tuple[int, ...]


def _int_checks(ints: list[tuple[str, int, int, str, int]]) -> _IntChecks:
    return _IntChecks(ints, tuple(i[1] for i in ints), tuple(i[2] for i in ints), tuple(i[4] for i in ints))


# The ints the checks read, per family: all of them, or all but those a dump's INET_DIAG_SOCKOPT showed unset.
_READ_ALL = {family: _int_checks(_SUSPECT_INTS + ints) for family, ints in _FAMILY_INTS.items()}
_READ_UNSHOWN = {
    family: _int_checks(_SUSPECT_INTS + [i for i in ints
                                         if not (i[1] == IP and i[2] in (lib.IP_TRANSPARENT, lib.IP_RECVERR))])
    for family, ints in _FAMILY_INTS.items()
}
# _HEADER_OPTS as the arguments of one map(): levels, options, buffer sizes
_HEADER_READS = {family: (tuple(h[0] for h in opts), tuple(h[1] for h in opts), (_HEADER_SIZE,) * len(opts))
                 for family, opts in _HEADER_OPTS.items()}
_IP_OPTIONS_READ = _HEADER_READS[lib.AF_INET]


def _ints_to_read(family: int, sockopt: int | None) -> _IntChecks:
    """The int options to read, given INET_DIAG_SOCKOPT's first byte (None: the kernel sent none): those it shows
    are read only to name one it shows set."""
    return _READ_ALL[family] if sockopt is None or sockopt & _SOCKOPT_BITS else _READ_UNSHOWN[family]


class Checked(NamedTuple):
    """What refusals() found (registry entry name, what was found), and what its sock_diag round trip read on the
    way, which a checkpoint uses again: `view` (None in CLOSE, which sock_diag cannot see) and SIOCINQ right after
    it (`inq`, -1 with no view)."""

    found: list[tuple[str, str]]
    view: SockView | None
    inq: int


def refusals(session: _Session, conn: ConnTuple, tcp_state: int, in_repair: bool) -> list[tuple[str, str]]:
    """(registry entry name, what was found) for every REFUSED entry the connection uses; [] when none. An urgent
    byte already read shows only as SIOCINQ stopping short of sock_diag's rqueue, which is compared `in_repair`
    only: out of repair mode the application may read between the two calls, and the two would disagree for that
    reason alone. Raises SocketCallError when a kernel call fails unexpectedly."""
    return checked(session, conn, tcp_state, in_repair).found


def checked(session: _Session, conn: ConnTuple, tcp_state: int, in_repair: bool) -> Checked:
    """refusals(), with what its sock_diag round trip read."""
    found: list[tuple[str, str]] = []
    family = conn.family
    view: SockView | None = None
    inq = -1
    if tcp_state != lib.TCP_CLOSE:
        # sock_diag finds no socket in CLOSE (it left the hash tables, and its keys can sign no more segments)
        ifindex: int | None = None
        for _ in range(_ATTEMPTS):
            inq = session.ioctl(lib.SIOCINQ, "SIOCINQ")
            view, ifindex = _diag_bound(session, conn, ifindex)
            if session.ioctl(lib.SIOCINQ, "SIOCINQ") == inq:
                break
    # the dump shows IP_TRANSPARENT and IP_RECVERR: read only to name them (unsuspected_inq does the same)
    _option_refusals(session, _ints_to_read(family, None if view is None else view.sockopt), family, found,
                     None if view is None else view.optmem)
    # in repair mode CAP_NET_ADMIN is held, to which sock_diag shows an upper-layer protocol: its name is read
    # only when there is one
    ulp = _ulp(session) if view is None or not in_repair or view.ulp else ""
    if ulp:
        found.append(("TCP_ULP", f"upper-layer protocol {ulp!r}" + (" (kTLS)" if ulp == "tls" else "")))
    _ao_refusal(session, found)
    urgent = _urgent(session)
    if view is None:
        # _states.read_closed refuses bytes past SIOCINQ, where an urgent mark already read would show
        if urgent is not None:
            found.append(("urgent data (MSG_OOB)", urgent))
        return Checked(found, None, -1)
    fin = 1 if tcp_state in _FIN_RECEIVED else 0
    if in_repair and urgent is None and view.rqueue > inq + fin:
        urgent = f"an urgent mark {inq} bytes into the {view.rqueue - fin}-byte receive queue"
    if urgent is not None:
        found.append(("urgent data (MSG_OOB)", urgent))
    if view.md5_keys:
        found.append(("TCP_MD5SIG/TCP_MD5SIG_EXT", f"{view.md5_keys} TCP-MD5 key(s) (RFC 2385)"))
    if view.shutdown & RCV_SHUTDOWN and tcp_state == lib.TCP_ESTABLISHED:
        found.append(("shutdown(SHUT_RD)", f"the receive side is shut down in {state_name(tcp_state)}"))
    return Checked(found, view, inq)


def _diag_bound(session: _Session, conn: ConnTuple, ifindex: int | None) -> tuple[SockView, int]:
    """diag() naming the device the socket is bound to, and that device's index: `ifindex` when known; else none
    first, which finds every socket not bound to a device (the most frequent: no SO_BINDTOIFINDEX read), and a
    bound one only by its device (net/ipv4/inet_hashtables.c inet_match: inet_bound_dev_eq), so on ENOENT the
    device SO_BINDTOIFINDEX names, if any."""
    if ifindex is not None:
        return diag(session, conn, ifindex), ifindex
    try:
        return diag(session, conn, 0), 0
    except SocketCallError as exc:
        if exc.errno != errno.ENOENT:
            raise
        bound = session.get(SOL, lib.SO_BINDTOIFINDEX, "SO_BINDTOIFINDEX")
        if not bound:
            raise
    return diag(session, conn, bound), bound


def _option_refusals(session: _Session, checks: _IntChecks, family: int, found: list[tuple[str, str]],
                     optmem: int | None = None) -> None:
    """The refused int options in `checks`, IP options or IPv6 extension headers, and socket filters. Each group
    is read in one map() first; only when it shows something (or a read fails) is it read again one by one, to
    name what was found (or the call that failed). `optmem`: sk_omem_alloc from sock_diag (SockView.optmem), when
    known. A socket filter charges it (net/core/filter.c __sk_filter_charge, and sk_clone_lock for an accepted
    socket's copy), and so do IPv6 extension headers (net/ipv6/exthdrs.c ipv6_renew_options, ipv6_dup_options:
    sock_kmalloc): at 0 neither is there, and only IP_OPTIONS (kzalloc'd, uncharged: ip_options_get) is read."""
    getsockopt_int = session.sock.getsockopt
    try:
        suspect = tuple(map(getsockopt_int, checks.levels, checks.opts)) != checks.fresh
    except OSError:
        suspect = True
    if suspect:
        _int_refusals(session, checks.ints, found)
    try:
        held = any(map(len, map(getsockopt_int, *(_IP_OPTIONS_READ if optmem == 0 else _HEADER_READS[family]))))
    except OSError:
        held = True  # an IPv6 header option a v4-mapped socket does not answer: each is asked alone
    if held:
        _header_refusals(session, family, found)
    if optmem == 0:
        return
    size = session.size
    size[0] = 0
    if getsockopt(session.fd, SOL, lib.SO_GET_FILTER, ffi.NULL, size) < 0:
        if ffi.errno != errno.EACCES:
            raise session.fail("getsockopt(SO_GET_FILTER)")
        found.append(("SO_ATTACH_FILTER/SO_ATTACH_BPF", "an eBPF socket filter is attached"))
    elif size[0]:
        found.append(("SO_ATTACH_FILTER/SO_ATTACH_BPF", f"a classic BPF filter of {size[0]} instructions is attached"))


def _int_refusals(session: _Session, ints: list[tuple[str, int, int, str, int]], found: list[tuple[str, str]]
                  ) -> None:
    getsockopt_int = session.sock.getsockopt
    for entry, level, opt, name, fresh in ints:
        try:
            value = getsockopt_int(level, opt)
        except OSError as exc:
            if exc.errno in _ABSENT:
                continue
            raise session.failed(f"getsockopt({name})", exc) from None
        if value != fresh and entry not in (e for e, _ in found):
            found.append((entry, f"{name} is {value}"))


def _header_refusals(session: _Session, family: int, found: list[tuple[str, str]]) -> None:
    getsockopt_int = session.sock.getsockopt
    for level, opt, name in _HEADER_OPTS[family]:
        try:
            held = len(getsockopt_int(level, opt, _HEADER_SIZE))
        except OSError:
            continue  # not an option of this socket (IPv6 headers on a v4-mapped one)
        if held:
            found.append((HEADER_ENTRY, f"{name} holds {held} bytes"))
            break


class _Kernel:
    # ENOPROTOOPT for TCP_AO_INFO: the kernel was built without TCP-AO (CONFIG_TCP_AO), so no socket of this boot
    # can have its keys, and the call is not made again
    ao_absent = False


def _ao_refusal(session: _Session, found: list[tuple[str, str]]) -> None:
    """TCP_AO_INFO answers only when TCP-AO keys are set: ENOENT without keys, ENOPROTOOPT on a kernel without
    TCP-AO. Through cffi, not the socket method: nearly every socket fails the call, and the socket method then
    raises, which costs more than the call."""
    if _Kernel.ao_absent:
        return
    buf = new(CHARS, _AO_INFO_SIZE)
    size = session.size
    size[0] = _AO_INFO_SIZE
    if getsockopt(session.fd, TCP, lib.TCP_AO_INFO, buf, size) < 0:
        err = ffi.errno
        if err == errno.ENOPROTOOPT:
            _Kernel.ao_absent = True
        if err in _ABSENT:
            return
        raise session.fail("getsockopt(TCP_AO_INFO)", err)
    found.append(("TCP_AO_INFO/TCP_AO_GET_KEYS/TCP_AO_REPAIR", "TCP-AO keys are set"))


def unsuspected_inq(session: _Session, view: SockView, tcp_state: int) -> int:
    """In repair mode, with `view` from a sock_diag dump taken while the socket was already in repair mode (so its
    rqueue and SIOCINQ now can be compared: nothing read in between): -1 when the connection may use a REFUSED
    entry, else the SIOCINQ it read (bytes, in repair mode: the queues' snapshot takes it, as checkpoint() takes
    refusals()'). What the dump shows (TCP-MD5 keys, ULP, shutdown, the receive queue's true length, IP_TRANSPARENT
    and IP_RECVERR) costs no call; the rest are the calls of refusals(). On -1, refusals() names what is found (the
    batch checkpoint then raises exactly what checkpoint() does). Raises SocketCallError when a call fails."""
    if view.md5_keys or view.ulp or (view.shutdown & RCV_SHUTDOWN and tcp_state == lib.TCP_ESTABLISHED):
        return -1
    if view.sockopt is not None and view.sockopt & _SOCKOPT_BITS:
        return -1
    family = view.tuple.family
    found: list[tuple[str, str]] = []
    _option_refusals(session, _ints_to_read(family, view.sockopt), family, found, view.optmem)
    _ao_refusal(session, found)
    if found or _urgent(session) is not None:
        return -1
    fin = 1 if tcp_state in _FIN_RECEIVED else 0
    inq = session.ioctl(lib.SIOCINQ, "SIOCINQ")
    return -1 if view.rqueue > inq + fin else inq


def refusals_of(fd: int) -> list[tuple[str, str]]:
    """refusals() of the TCP socket `fd` (e.g. another process's, taken with pidfd_getfd), for a mover that screens
    every socket before it freezes anything; [] for a socket in a state the engine does not repair."""
    session = _Session(fd)
    tcp_state = tcp_info(session).tcpi_state
    if tcp_state not in REPAIRABLE:
        return []  # checkpoint() refuses it by its state
    if tcp_state == lib.TCP_SYN_SENT:
        conn = connecting_tuple(session, session.get(SOL, lib.SO_DOMAIN, "SO_DOMAIN"), tcp_state)
        if conn is None:
            return []  # connected meanwhile: checkpoint() reads it as it is then
    elif tcp_state == lib.TCP_CLOSE:
        conn = closed_peer(session)
        if conn is None:
            return []  # no peer: checkpoint() refuses it
    else:
        conn = read_tuple(session)
    session.tuple = conn
    return refusals(session, conn, tcp_state, in_repair=False)


def refuse(session: _Session, conn: ConnTuple, tcp_state: int) -> Checked:
    """In repair mode (the application cannot read meanwhile): raise SocketStateError (`.fd`, `.tuple`,
    `.tcp_state`) naming every REFUSED entry the connection uses; else what the checks read."""
    found, view, inq = checked(session, conn, tcp_state, True)
    if found:
        what = "; ".join(f"{detail} ({entry})" for entry, detail in found)
        raise SocketStateError(
            f"fd {session.fd} ({conn}) uses what TCP_REPAIR cannot move: {what}; it was left as it was "
            "(sockrepair.engine.registry says why each is refused)", fd=session.fd, tuple=conn, tcp_state=tcp_state)
    return Checked(found, view, inq)


def _ulp(session: _Session) -> str:
    buf = new(CHARS, _NAME_SIZE)
    size = session.size
    size[0] = _NAME_SIZE
    if getsockopt(session.fd, TCP, lib.TCP_ULP, buf, size) < 0:
        if ffi.errno == errno.ENOPROTOOPT:
            return ""
        raise session.fail("getsockopt(TCP_ULP)")
    return ffi.string(buf, size[0]).decode("ascii", "replace")  # type: ignore[no-any-return]


class _OobByte(threading.local):
    """Per thread (the kernel writes it while the GIL is released): the byte an urgent peek reads into."""

    def __init__(self) -> None:
        self.byte = new(CHARS, 1)


_oob = _OobByte()


def _urgent(session: _Session) -> str | None:
    """What recv(MSG_OOB | MSG_PEEK) says about an urgent byte not yet read; None when there is none to read.
    Through cffi, like TCP_AO_INFO: without urgent data the call fails (EINVAL)."""
    buf = _oob.byte
    got = lib.recv(session.fd, buf, 1, _OOB_FLAGS)
    if got == 1:
        return f"an urgent byte {ffi.buffer(buf, 1)[:]!r} not yet read"
    err = ffi.errno
    if got < 0 and err == errno.EAGAIN:
        return "an urgent pointer whose byte has not arrived yet"
    if got < 0 and err == errno.ENOTCONN:
        return "an urgent byte not yet read, in CLOSE"  # tcp_recv_urg says ENOTCONN before it looks at the byte
    if got == 0:
        return "an urgent pointer whose byte never arrived (the peer closed first)"
    return None
