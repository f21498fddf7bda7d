"""checkpoint_many: checkpoint() of many sockets, with one sock_diag dump per network namespace in place of the
per-socket calls whose answers the dump holds. Each socket's calls go through a _Session (engine/_session.py), as
checkpoint()'s do.

The steps of checkpoint() (engine/_checkpoint.py), in the same order for each socket, with these differences:

- every socket is put in repair mode first, and then one dump (NETLINK_SOCK_DIAG, per address family, of the TCP
  sockets in the states checkpoint() takes) is read in the sockets' namespace: taken while they are all frozen, it
  answers what checkpoint() asks once repair mode is on (the state again, tcp_info's options and window scales) and
  what its refusal checks ask sock_diag for (the receive queue's true length, TCP-MD5 keys, ULP, shutdown); when
  the sockets share a few local ports (a server's connections), the kernel lists only the sockets on those
  (a filter it runs on each: engine/_diag.py ports_filter), not every other of a busy namespace;
- the 4-tuple comes from the dump (the socket is found there by its inode) instead of getsockname/getpeername;
- the options checkpoint() takes from its own sock_diag answer (engine/_sockopts.py DUMPED: TOS / TCLASS,
  SO_MARK, IP_FREEBIND, SO_SNDBUF, SO_RCVBUF, TCP_CONGESTION, no SO_BINDTODEVICE, SO_PRIORITY 0, SO_MAX_PACING_RATE)
  are taken from the dump (engine/_checkpoint.py dumped_sockopts); repair mode changes none of them (it forces only
  the reuse flag, which is read before it as checkpoint() does);
- the refusal checks the dump cannot answer are made per socket (engine/_refuse.py unsuspected_inq); when
  anything is suspected, checkpoint()'s own check runs and raises the same error checkpoint() raises.
- a socket in CLOSE, which no dump lists (it left the hash tables), is read as checkpoint() reads it, after all
  the others: reading its pending error clears it, and a batch failing on another socket then leaves it unread.

A socket the dump does not show (another namespace) has its namespace dumped in turn. A dump walks the whole
established hash table whatever it lists: a batch shorter than dump_pays_from() (some hundred sockets on a machine
of some GiB) is cheaper read one socket at a time, and is, by checkpoint()'s own steps (checkpoint_session). The
states are the ones checkpoint() returns, field by field (tests/root/test_engine_batch.py)."""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Sequence
from os import fstat
from typing import NamedTuple

from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine._checkpoint import (
    checkpoint_session,
    dumped_sockopts,
    ensure_state,
    ensure_unchanged,
    first_look,
    frozen_state,
    resume_session,
)
from sockrepair.engine._diag import FILTER_PORTS_MAX, SockView, dump_views
from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._refuse import refuse, unsuspected_inq
from sockrepair.engine._session import (
    SockLike,
    _close,
    _reuse_held,
    _Session,
    fileno,
    hold_reuse,
    session_of,
)
from sockrepair.engine._sockopts import DUMPED_PLANS, TCP, read_plain
from sockrepair.engine._states import CLOSE, REPAIRABLE, send_lengths
from sockrepair.engine._tcpopts import tcp_info, tcp_info_from
from sockrepair.errors import SocketCallError
from sockrepair.state import TCP_ESTABLISHED, ConnectionState

# No dump lists a socket in CLOSE (it is in no hash table): checkpoint_many reads those as checkpoint() does.
_STATES = sum(1 << s for s in REPAIRABLE - {CLOSE})


class _Frozen(NamedTuple):
    at: int  # its place in the batch
    session: _Session
    family: int
    first_state: int
    values: list[object]  # read_plain() of DUMPED_PLANS[family]


def checkpoint_many(socks: Sequence[SockLike]) -> list[ConnectionState]:
    """checkpoint() of every socket in `socks` (socket objects or fds of this process), in their order: each is left
    frozen (repair mode on) and its state is the one checkpoint() would return. The network lock must hold every
    one of them off from before the call. A socket in CLOSE is read last, as checkpoint() reads it: its pending
    error, which reading clears, is read only once every other socket was.

    Raises what checkpoint() raises, for the first socket found failing (errors carry its `.fd`); every socket the
    call put in repair mode is then resumed (repair off without a window probe) before the error goes up."""
    return _checkpoint_all([session_of(sock) for sock in socks])


def _checkpoint_all(sessions: Sequence[_Session]) -> list[ConnectionState]:
    frozen: list[_Frozen] = []
    inodes: list[int] = []
    closed: list[tuple[int, int]] = []
    done: list[_Session] = []
    states: list[ConnectionState | None] = [None] * len(sessions)
    plans = DUMPED_PLANS
    one_by_one = len(sessions) < dump_pays_from()
    try:
        for index, session in enumerate(sessions):
            family, first_state = first_look(session)
            if first_state == CLOSE:
                closed.append((index, family))
                continue
            if one_by_one:
                states[index] = checkpoint_session(session, family, first_state)
                done.append(session)
                continue
            plan = plans[family]
            values = read_plain(session, plan)
            inode = fstat(session.fd).st_ino
            session.repair_on()
            frozen.append(_Frozen(index, session, family, first_state, values))
            inodes.append(inode)
            if values[plan.reuseaddr_at]:
                hold_reuse(session.fd, inode)
        if frozen:
            views = _views(frozen, inodes)
            for f, inode in zip(frozen, inodes):
                states[f.at] = _finish(f, views[inode])
        for index, family in closed:
            # resumes its own socket when it fails
            states[index] = checkpoint_session(sessions[index], family, CLOSE)
            done.append(sessions[index])
    except BaseException:
        for session in [f.session for f in frozen] + done:
            with contextlib.suppress(OSError):
                resume_session(session)
        raise
    return [state for state in states if state is not None]


# A dump walks every bucket of the TCP established hash table, its sockets or not (inet_diag_dump_icsk): a fixed
# cost, about 4 ns a bucket, that the dump's saving per socket over checkpoint_session (some 7 us) repays only from
# about one socket per this many buckets. Measured on Linux 6.18, 262,144 buckets, batch against one by one:
# 1 socket 0.97 / 0.06 ms, 10: 1.8 / 0.7, 100: 7.0 / 6.4, 200: 10.1 / 10.5, 1,000: 63.5 / 66.0.
BUCKETS_PER_SOCKET = 2048
_EHASH_ENTRIES = "/proc/sys/net/ipv4/tcp_ehash_entries"  # Linux 6.1+; negative: the initial namespace's, shared
_DEFAULT_BUCKETS = 1 << 16  # an older kernel's: what alloc_large_system_hash gives a machine of a few GiB


@functools.cache
def dump_pays_from() -> int:
    """The fewest sockets a batch reads through one dump rather than one by one: the size of the established
    hash table of the caller's network namespace (sysctl net.ipv4.tcp_ehash_entries), over BUCKETS_PER_SOCKET;
    read once per process."""
    try:
        with open(_EHASH_ENTRIES) as f:
            buckets = abs(int(f.read()))
    except (OSError, ValueError):
        buckets = _DEFAULT_BUCKETS
    return max(1, buckets // BUCKETS_PER_SOCKET)


def _views(frozen: Sequence[_Frozen], inodes: Sequence[int]) -> dict[int, SockView]:
    """The dump's view of every socket, by inode: one dump in the namespace of the first socket, and one more in the
    namespace of each socket the dumps so far did not show."""
    families = {f.family for f in frozen}
    wanted = set(inodes)
    ports = _local_ports(frozen)
    views: dict[int, SockView] = {}
    for f, inode in zip(frozen, inodes):
        if inode in views:
            continue
        views.update(dump_views(f.session, families, _STATES, wanted - views.keys(), ports))
        if inode not in views:
            # not among the states checkpoint() takes any more, in its own namespace: it left its state
            ensure_state(f.session, f.first_state, tcp_info(f.session).tcpi_state)
            raise SocketCallError(errno.ENOENT, "sock_diag dump (the socket is not listed)", f.session.fd)
    return views


def _local_ports(frozen: Sequence[_Frozen]) -> set[int]:
    """The local ports of the sockets, for the dump's filter: a server's connections share a few (its listeners'),
    while a busy namespace holds many more sockets; empty when they are more than the filter takes (a client's
    connections, each on a port of its own), found by the first FILTER_PORTS_MAX + 1 different ones."""
    ports: set[int] = set()
    for f in frozen:
        try:
            ports.add(f.session.sock.getsockname()[1])
        except OSError:
            return set()  # not expected of a connected socket; the dump is then not filtered
        if len(ports) > FILTER_PORTS_MAX:
            return set()
    return ports


def _finish(f: _Frozen, view: SockView) -> ConnectionState:
    session = f.session
    session.tuple = view.tuple
    inq = unsuspected_inq(session, view, f.first_state)
    if inq < 0:
        inq = refuse(session, view.tuple, f.first_state).inq
    ensure_state(session, f.first_state, view.state)
    return frozen_state(session, tcp_info_from(session, view.state, view.info),
                        dumped_sockopts(session, f.family, f.values, view), inq)


def ensure_all_unchanged(socks: Sequence[SockLike], states: Sequence[ConnectionState]) -> None:
    """What discard() checks, of every frozen socket in `socks` against its state in `states`: a mover checks every
    socket before it discards any. Raises SocketStateError (`.fd`, `.tuple`) for the first that sent or received
    since its checkpoint. The queue lengths are read through libc into one buffer; a socket whose lengths differ
    from its state's (or whose ioctl fails) is checked again as discard() checks it, which raises the error."""
    value = ffi.new("int *")
    ioctl, outq, unsent_q, inq = lib.ioctl, lib.SIOCOUTQ, lib.SIOCOUTQNSD, lib.SIOCINQ
    for sock, state in zip(socks, states, strict=True):
        fd = fileno(sock)
        if ioctl(fd, outq, value) == 0:
            queued = value[0]
            # write_seq - snd_nxt is at most write_seq - snd_una: an empty send queue has nothing unsent
            if queued == 0 or ioctl(fd, unsent_q, value) == 0:
                unsent = value[0]
                if (ioctl(fd, inq, value) == 0 and value[0] == len(state.recv_queue)
                        and send_lengths(state.tcp_state, queued, unsent) == (len(state.send_queue),
                                                                              state.unsent_len)):
                    continue
        ensure_unchanged(session_of(sock, state.tuple), state)


def discard_all(fds: Sequence[int], inodes: Sequence[int]) -> bool:
    """Disconnect and close every socket in `fds` (of inodes `inodes`, in that order) without FIN or RST: sockets
    this process put in repair mode with checkpoint_many() and holds frozen, as end_source() does
    (sockrepair.move.take). Each is disconnected first (connect(AF_UNSPEC): tcp_disconnect, which in repair mode
    sends nothing, as the close of its last reference would), so that its 4-tuple leaves the established hash at
    once even while another process (the frozen program, being killed) still holds the socket: a restore in the
    same namespace need not wait for that process to exit. Returns whether every socket was disconnected (one that
    was not is closed all the same: its 4-tuple is freed with the last reference). Stops at the first close that
    fails, raising SocketCallError, and leaves the sockets after it open.

    Unlike discard(), the repair flag is not read again (a getsockopt per socket, a millisecond at 1,000): tp->repair
    is cleared only by setsockopt(TCP_REPAIR, off) through a file of the socket (do_tcp_setsockopt,
    net/ipv4/tcp.c). Those files are this process's copies, which only the resume of a failed capture turns off,
    before end_source() could run; the frozen process's own fds, none of whose threads runs; and the guard's copies,
    which it takes only once this process is gone (sockrepair.move.freeze). A third process sharing the file could
    turn it off between any read and the close as well: the read would not make that safe either."""
    if _reuse_held:
        _reuse_held.difference_update(inodes)
    unspec = ffi.new("struct sockaddr *")  # sa_family 0: AF_UNSPEC
    size = ffi.sizeof("struct sockaddr")
    connect = lib.connect
    disconnected = True
    for fd in fds:
        if connect(fd, unspec, size) < 0:
            disconnected = False
        if _close(fd) < 0:
            raise SocketCallError(ffi.errno, "close", fd)
    return disconnected


SEGS_OUT = tcpinfo.view("tcpi_segs_out")


def segs_out_of(socks: Sequence[SockLike]) -> list[int]:
    """tcpi_segs_out (TCP_INFO) of every socket in `socks`, in their order: the segments each has sent (counted in
    __tcp_transmit_skb, before the netfilter output hook, so a segment the network lock dropped counts too). Read
    through libc with one buffer for all (a Python socket object per fd would cost 3-4 us each: this is read under
    the freeze). Raises SocketCallError when TCP_INFO cannot be read."""
    buf = ffi.new("char[]", SEGS_OUT.size)
    length = ffi.new("socklen_t *")
    view = ffi.buffer(buf)
    getsockopt, tcp_info, unpack = lib.getsockopt, lib.TCP_INFO, SEGS_OUT.unpack_from
    out = []
    for sock in socks:
        fd = fileno(sock)
        length[0] = SEGS_OUT.size
        if getsockopt(fd, TCP, tcp_info, buf, length) < 0 or length[0] < SEGS_OUT.size:
            raise SocketCallError(ffi.errno or errno.EPROTO, "getsockopt(TCP_INFO)", fd)
        out.append(unpack(view)[0])
    return out


def owed_acks(socks: Sequence[SockLike], states: Sequence[ConnectionState], segs_out_before: Sequence[int]
              ) -> list[bool]:
    """For each frozen socket in `socks` (checkpointed into `states`, in that order), whether its peer may lack an
    ACK of everything the socket received, so that the restored socket must be made to send one
    (engine/_restore.py _ask_for_ack; restore_with's `owed`). False only for an ESTABLISHED socket whose saved
    window has rcv_wup == rcv_nxt (the last segment it sent acknowledged all it had received: tcp_select_window
    sets rcv_wup = rcv_nxt on every segment sent, net/ipv4/tcp_output.c) and whose tcpi_segs_out is still
    `segs_out_before[i]`, read before the network lock was taken: that last segment left before the lock, which
    drops what is sent after it (a delayed ACK fired between the lock and the checkpoint counts, and owes). Call
    it after the checkpoint (the window was read then: a segment sent between that read and this call counts too)
    and before the sockets are discarded. Raises SocketCallError when TCP_INFO cannot be read."""
    now = segs_out_of(socks)
    return [state.tcp_state != TCP_ESTABLISHED or state.window is None
            or state.window.rcv_wup != state.recv_seq or after != before
            for state, before, after in zip(states, segs_out_before, now, strict=True)]
