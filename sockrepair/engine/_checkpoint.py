"""checkpoint / resume / discard: freeze an established socket in repair mode, read it, and let it go on or vanish.

Like libsoccr's libsoccr_pause / libsoccr_save / libsoccr_resume: checkpoint leaves the socket frozen, so the caller
decides whether the connection lives on here (resume) or elsewhere (discard, then restore the state)."""

from __future__ import annotations

import errno
import operator
from typing import NoReturn

from sockrepair.engine._addr import read_tuple
from sockrepair.engine._diag import SOCKOPT_FREEBIND, SockView, connecting_tuple
from sockrepair.engine._ffi import lib
from sockrepair.engine._queues import read_queues
from sockrepair.engine._refuse import refuse
from sockrepair.engine._session import (
    SockLike,
    _Session,
    close_silently,
    fileno,
    hold_reuse,
    release_reuse,
    session_of,
    signed32,
)
from sockrepair.engine._sockopts import (
    DUMPED_PLANS,
    IFNAMSIZ,
    PLANS,
    decode_name,
    read_plain,
    read_sockopts,
    sockopts_of,
)
from sockrepair.engine._states import (
    CLOSE,
    REPAIRABLE,
    closed_peer,
    read_closed,
    send_lengths,
)
from sockrepair.engine._tcpopts import (
    TcpInfo,
    read_options,
    read_timestamp,
    read_window,
    tcp_info,
    tcp_info_from,
    tcp_state,
)
from sockrepair.errors import SocketCallError, SocketStateError
from sockrepair.state import ConnectionState, ConnTuple, SocketOptions, state_name

SOL, AF_INET6 = lib.SOL_SOCKET, lib.AF_INET6
SO_DOMAIN, SO_PROTOCOL, IPPROTO_TCP, INET = lib.SO_DOMAIN, lib.SO_PROTOCOL, lib.IPPROTO_TCP, (lib.AF_INET, AF_INET6)
# the SockView fields dumped_sockopts() takes, in one call
_VIEW_OPTIONS = operator.itemgetter(*map(SockView._fields.index, (
    "ifindex", "tos", "tclass", "mark", "congestion", "sndbuf", "rcvbuf", "sockopt", "class_id", "max_pacing_rate")))
REPAIRABLE_NAMES = ", ".join(state_name(s) for s in sorted(REPAIRABLE))
# Stream protocols that look like TCP from outside (an MPTCP socket's subflows are listed in /proc/net/tcp).
PROTOCOLS = {262: "MPTCP", 132: "SCTP"}


def checkpoint(sock: SockLike) -> ConnectionState:
    """Freeze `sock` (repair mode on) and return its full state; the socket stays frozen: follow with resume() to
    let it go on here, or discard() when the connection moves elsewhere.

    The kernel keeps acknowledging incoming data in repair mode: hold the network lock (sockrepair.lock()) from
    before the call. `sock` is a socket object or a file descriptor of this process. In the state: `send_seq` / `recv_seq` are the
    u32 sequence numbers after the last byte of each queue (TCP_QUEUE_SEQ), `send_queue` the bytes sent but not
    acknowledged followed by the `unsent_len` bytes never sent (SIOCOUTQ, SIOCOUTQNSD), `recv_queue` the bytes
    received but not read (SIOCINQ, recv(MSG_PEEK)), `options` the handshake's options with the MSS clamp in bytes
    (tcp_info, TCP_MAXSEG), `window` the struct tcp_repair_window (TCP_REPAIR_WINDOW; None before Linux 4.8),
    `timestamp` the raw u32 TCP timestamp clock (TCP_TIMESTAMP) and `sockopts` the application's options.

    Raises SocketStateError (`.fd`, and `.tcp_state` / `.tuple` when known) when `sock` is not an open socket, not
    plain IPv4/IPv6 TCP (MPTCP is named), not ESTABLISHED, SYN_SENT, half-closed (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT,
    CLOSING, LAST_ACK: engine/_states.py) nor CLOSE after a connection (`sk_err` and `fin_received` then say what
    the application has still to see; reading the error clears it, so a resume() cannot give it back; an error no
    reset gives is refused), or uses what sockrepair.engine.registry marks REFUSED
    (urgent data, TCP-MD5 keys, kTLS, TCP-AO...: every one found is named; the socket is resumed without a window
    probe, as it was), or when it left its state
    while being frozen; NotPermittedError (a PermissionError) without CAP_NET_ADMIN in the socket's network
    namespace; UnsupportedError on a kernel without TCP_REPAIR; SocketCallError (`.errno`, `.op`, `.fd`, `.tuple`)
    when a kernel call fails, with EAGAIN when the queues kept changing while read (the peer is not locked out).
    On any failure after repair mode is on, the socket is resumed first."""
    session = session_of(sock)
    return checkpoint_session(session, *first_look(session))


def checkpoint_session(session: _Session, family: int, first_state: int, resume_on_error: bool = True
                       ) -> ConnectionState:
    """checkpoint() of the session's socket once first_look() returned (`family`, `first_state`) (checkpoint_many
    reads a socket in CLOSE this way: no sock_diag dump lists it). The options a sock_diag answer shows exactly as
    getsockopt does (_sockopts.DUMPED) are taken from the refusal checks' round trip, made in repair mode, which
    changes none of them (do_tcp_setsockopt TCP_REPAIR sets tp->repair, sk_reuse and tp->repair_queue only; the
    reuse flag is read before it); in CLOSE, which sock_diag cannot see, every option is read before. Without
    `resume_on_error` a failure leaves the socket in repair mode (one found in repair mode already, as a move killed
    half-way leaves it: a look at it must leave it so)."""
    fd = session.fd
    conn = session.tuple = _connection_tuple(session, family, first_state)
    plan = (PLANS if first_state == CLOSE else DUMPED_PLANS)[family]
    values = read_plain(session, plan)
    reuseaddr = values[plan.reuseaddr_at]
    session.repair_on()
    try:
        if reuseaddr:
            # repair mode now forces the flag and leaving it will clear it: resume puts the application's back
            hold_reuse(fd)
        # in repair mode: the application cannot read while the receive queue is compared (engine/_refuse.py)
        checked = refuse(session, conn, first_state)
        # read again under repair (the state may have moved between the first look and the freeze): the refusal
        # checks' sock_diag round trip, made in repair mode, holds the state and tcp_info's head
        view = checked.view
        if view is None:
            info = tcp_info(session)
            sockopts = sockopts_of(plan, values)
        else:
            info = tcp_info_from(session, view.state, view.info)
            sockopts = dumped_sockopts(session, family, values, view)
        ensure_state(session, first_state, info.tcpi_state)
        return frozen_state(session, info, sockopts, checked.inq)
    except BaseException:
        if resume_on_error:
            resume_session(session)
        raise


def first_look(session: _Session) -> tuple[int, int]:
    """Before repair mode: the family (SO_DOMAIN) and TCP state of a plain TCP socket in a state checkpoint()
    takes; SocketStateError otherwise (see checkpoint)."""
    family = _ensure_tcp(session)
    try:
        first_state = tcp_state(session)
    except SocketCallError:
        _ensure_stream(session, family)
        raise
    if first_state not in REPAIRABLE:
        fd = session.fd
        what = "a listening socket" if first_state == lib.TCP_LISTEN else f"in state {state_name(first_state)}"
        raise SocketStateError(f"fd {fd} is {what}; only {REPAIRABLE_NAMES} connections can be checkpointed",
                               fd=fd, tuple=_tuple_if_connected(session), tcp_state=first_state)
    return family, first_state


def ensure_state(session: _Session, first_state: int, now: int) -> None:
    """In repair mode: SocketStateError when the socket left `first_state` (now `now`) while being frozen."""
    if now != first_state:
        raise SocketStateError(
            f"fd {session.fd} left {state_name(first_state)} (now {state_name(now)}) while it was being "
            "frozen", fd=session.fd, tuple=session.tuple, tcp_state=now,
        )


def frozen_state(session: _Session, info: TcpInfo, sockopts: SocketOptions, inq: int = -1) -> ConnectionState:
    """The rest of a checkpoint, in repair mode, once the connection (`session.tuple`), its state and options are
    known (`info`: tcp_info's state, options and window scales, read in repair mode; `inq`: SIOCINQ read in repair
    mode, when it was: -1 otherwise)."""
    tcp_state = info.tcpi_state
    options = read_options(session, info)
    timestamp = read_timestamp(session)
    window = read_window(session)
    conn = session.tuple
    assert conn is not None
    if tcp_state == CLOSE:
        closed = read_closed(session)
        return ConnectionState(
            tuple=conn, tcp_state=CLOSE, send_seq=closed.send_seq, recv_seq=closed.recv_seq, send_queue=b"",
            unsent_len=0, recv_queue=closed.recv_queue, options=options, window=window, timestamp=timestamp,
            sockopts=sockopts, sk_err=closed.sk_err, fin_received=closed.fin_received)
    queues = read_queues(session, tcp_state, inq)
    # positionally (a batch builds thousands): tuple, tcp_state, send_seq, recv_seq, send_queue, unsent_len,
    # recv_queue, options, window, timestamp, sockopts
    return ConnectionState(conn, tcp_state, queues.send_seq, queues.recv_seq, queues.send_queue, queues.unsent_len,
                           queues.recv_queue, options, window, timestamp, sockopts)


def dumped_sockopts(session: _Session, family: int, values: list[object], view: SockView) -> SocketOptions:
    """In repair mode: the SocketOptions of read_plain()'s `values` (DUMPED_PLANS[family], read before repair mode)
    and of the sock_diag answer `view` for the DUMPED fields. Each attribute is what the getsockopt reads
    (net/ipv4/inet_diag.c inet_diag_msg_attrs_fill, inet_sk_diag_fill; net/core/sock.c sk_getsockopt): TOS / TCLASS
    inet->tos / np->tclass, MARK sk_mark, SOCKOPT's freebind bit, SKMEMINFO's sk_sndbuf and sk_rcvbuf, CONG the
    algorithm's name; the device's name only where sk_bound_dev_if is set. SO_PRIORITY is 0 when CLASS_ID is
    (which holds sk_priority whenever the cgroup classid is 0), else read; SO_MAX_PACING_RATE, as an int, is
    min(sk_max_pacing_rate, ~0U), the same of tcp_info's tcpi_max_pacing_rate (sk_max_pacing_rate, ~0UL as ~0ULL:
    tcp_get_info). A kernel whose answer lacks one of the others has them all read now (repair mode changes none
    but the reuse flag, which `values` holds)."""
    ifindex, tos, tclass, mark, congestion, sndbuf, rcvbuf, sockopt, class_id, pacing = _VIEW_OPTIONS(view)
    if family == AF_INET6:
        tos = tclass
    if tos is None or mark is None or sockopt is None or congestion is None or sndbuf is None or rcvbuf is None:
        sockopts = read_sockopts(session, family)
        sockopts.reuseaddr = bool(values[DUMPED_PLANS[family].reuseaddr_at])
        return sockopts
    device = _device(session) if ifindex else ""
    priority = 0 if class_id == 0 else session.get(SOL, lib.SO_PRIORITY, "SO_PRIORITY")
    max_pacing_rate = (session.get(SOL, lib.SO_MAX_PACING_RATE, "SO_MAX_PACING_RATE") if pacing is None
                       else signed32(min(pacing, 0xFFFFFFFF)))
    return sockopts_of(DUMPED_PLANS[family], values, (tos, signed32(mark), sockopt & SOCKOPT_FREEBIND != 0, sndbuf,
                                                      rcvbuf, congestion, device, priority, max_pacing_rate))


def _device(session: _Session) -> str:
    """SO_BINDTODEVICE's name (sock_diag gives the index only)."""
    try:
        raw = session.sock.getsockopt(SOL, lib.SO_BINDTODEVICE, IFNAMSIZ)
    except OSError as exc:
        raise session.failed("getsockopt(SO_BINDTODEVICE)", exc) from None
    return decode_name(raw)


def resume(sock: SockLike) -> None:
    """Let a socket frozen by checkpoint() go on here: repair off without a window probe (TCP_REPAIR_OFF_NO_WP:
    nothing goes on the wire), then SO_REUSEADDR put back if the application had it (leaving repair mode clears it).

    Raises SocketCallError when a kernel call fails (e.g. EBADF when `sock` is not open, EPERM without
    CAP_NET_ADMIN in the socket's network namespace)."""
    resume_session(session_of(sock))


def resume_session(session: _Session) -> None:
    """resume() of the session's socket (checkpoint and checkpoint_many undo a freeze with it)."""
    session.repair_off(False)
    if release_reuse(session.fd):
        session.set(SOL, lib.SO_REUSEADDR, 1, "SO_REUSEADDR")


def discard(sock: SockLike, state: ConnectionState | None = None) -> None:
    """Close a socket frozen by checkpoint() without FIN or RST (close(2) in repair mode): the connection now lives
    only in its saved state. A socket object is closed through the object, so Python does not close the fd number
    again later.

    Repair mode does not stop the kernel's timers: without the network lock a frozen socket can still send a probe
    or a retransmission, or take in an ACK or data, and then the saved state no longer matches what the peer knows.
    Given the `state` from checkpoint, discard compares the queue lengths (SIOCOUTQ, SIOCOUTQNSD, SIOCINQ) with it
    and raises SocketStateError (`.fd`, `.tuple`) when they moved, leaving the socket frozen (resume or discard it
    again). A socket that is not in repair mode (never checkpointed, or resumed) would leave with a FIN: discard
    refuses it with SocketStateError (`.fd`, `.tuple` from `state`) and leaves it open (getsockopt(TCP_REPAIR)
    reads the repair flag, tp->repair, in do_tcp_getsockopt; a kernel that does not answer it, ENOPROTOOPT, is not
    checked). Raises SocketCallError when a kernel call fails."""
    fd = fileno(sock)
    session = session_of(sock, state.tuple if state is not None else None)
    if not _in_repair(session):
        raise SocketStateError(f"fd {fd} is not in repair mode (never checkpointed, or resumed): closing it would "
                               "send a FIN; checkpoint() it first", fd=fd,
                               tuple=state.tuple if state is not None else None)
    if state is not None:
        ensure_unchanged(session, state)
    release_reuse(fd)
    if isinstance(sock, int):
        close_silently(fd)
    else:
        sock.close()


def _in_repair(session: _Session) -> bool:
    try:
        return bool(session.get(lib.IPPROTO_TCP, lib.TCP_REPAIR, "TCP_REPAIR"))
    except SocketCallError as exc:
        if exc.errno == errno.ENOPROTOOPT:
            return True
        raise


def ensure_unchanged(session: _Session, state: ConnectionState) -> None:
    """Raise SocketStateError (`.fd`, `.tuple`) when the session's frozen socket sent or received since `state` was
    taken: what discard() checks (engine/_batch.py ensure_all_unchanged: for a mover that checks every socket before
    it discards any)."""
    ioctl = session.ioctl
    now = (*send_lengths(state.tcp_state, ioctl(lib.SIOCOUTQ, "SIOCOUTQ"), ioctl(lib.SIOCOUTQNSD, "SIOCOUTQNSD")),
           ioctl(lib.SIOCINQ, "SIOCINQ"))
    saved = (len(state.send_queue), state.unsent_len, len(state.recv_queue))
    if now != saved:
        raise SocketStateError(
            f"fd {session.fd} ({state.tuple}) changed since its checkpoint (send queue / never sent / receive queue "
            f"{saved} -> {now}): it sent or received while frozen; hold the network lock across the move",
            fd=session.fd, tuple=state.tuple,
        )


def _ensure_tcp(session: _Session) -> int:
    """The family of an IPv4 or IPv6 socket of protocol TCP; SocketStateError for any other socket. Of the inet
    sockets, only TCP's and raw ones have sk_protocol IPPROTO_TCP (inet_create / inet6_create take it from the
    inetsw entry of the type: SOCK_STREAM's tcp_prot, or SOCK_RAW's wildcard): first_look tells a raw one by its
    TCP_INFO failing (raw_getsockopt and rawv6_getsockopt answer ENOPROTOOPT at level SOL_TCP), and only then
    reads SO_TYPE."""
    fd, getsockopt = session.fd, session.sock.getsockopt
    try:
        domain = getsockopt(SOL, SO_DOMAIN)
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise SocketStateError(f"fd {fd} is not a socket", fd=fd) from None
        if exc.errno == errno.EBADF:
            raise SocketStateError(f"fd {fd} is not an open file descriptor", fd=fd) from None
        raise session.failed("getsockopt(SO_DOMAIN)", exc) from None
    try:
        protocol = getsockopt(SOL, SO_PROTOCOL)
    except OSError as exc:
        raise session.failed("getsockopt(SO_PROTOCOL)", exc) from None
    if protocol == IPPROTO_TCP and domain in INET:
        return int(domain)
    _refuse_socket(session, domain, session.get(SOL, lib.SO_TYPE, "SO_TYPE"), protocol)


def _ensure_stream(session: _Session, family: int) -> None:
    """After TCP_INFO failed on an inet socket of protocol TCP: SocketStateError unless it is SOCK_STREAM."""
    sock_type = session.get(SOL, lib.SO_TYPE, "SO_TYPE")
    if sock_type != lib.SOCK_STREAM:
        _refuse_socket(session, family, sock_type, lib.IPPROTO_TCP)


def _refuse_socket(session: _Session, domain: int, sock_type: int, protocol: int) -> NoReturn:
    fd = session.fd
    what = f"an {PROTOCOLS[protocol]} socket" if protocol in PROTOCOLS else "not a TCP socket"
    raise SocketStateError(
        f"fd {fd} is {what} (domain {domain}, type {sock_type}, protocol {protocol}); "
        "only plain IPv4/IPv6 TCP connections can be repaired", fd=fd
    )


def _connection_tuple(session: _Session, family: int, tcp_state: int) -> ConnTuple:
    """getsockname/getpeername; in SYN_SENT, where getpeername says ENOTCONN, sock_diag's view of the socket; in
    CLOSE, where it says ENOTCONN too, SO_PEERNAME (ENOTCONN only when the socket has no peer: never connected,
    or disconnected with connect(AF_UNSPEC))."""
    if tcp_state == CLOSE:
        conn = closed_peer(session)
        if conn is None:
            raise SocketStateError(f"fd {session.fd} is in state CLOSE without a peer (never connected, or "
                                   "disconnected): there is no connection to checkpoint", fd=session.fd,
                                   tcp_state=tcp_state)
        return conn
    if tcp_state != lib.TCP_SYN_SENT:
        return read_tuple(session)
    conn = connecting_tuple(session, family, tcp_state)
    if conn is None:
        raise SocketStateError(f"fd {session.fd} left SYN_SENT before its peer could be read", fd=session.fd,
                               tcp_state=tcp_state)
    return conn


def _tuple_if_connected(session: _Session) -> ConnTuple | None:
    """The 4-tuple for an error about a socket that is not ESTABLISHED; None when it has no peer (LISTEN, CLOSE)."""
    try:
        return read_tuple(session)
    except SocketCallError:
        return None
