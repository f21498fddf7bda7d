"""checkpoint_many: checkpoint() of many sockets, with one sock_diag dump per network namespace in place of the
per-socket calls whose answers the dump holds.

The steps of checkpoint() (engine/_checkpoint.py), in the same order for each socket, with these differences:

- every socket is put in repair mode first, and then one dump (NETLINK_SOCK_DIAG, per address family, of the TCP
  sockets in the states checkpoint() takes) is read in the sockets' namespace: taken while they are all frozen, it
  answers what checkpoint() asks once repair mode is on (the state again, tcp_info's options and window scales) and
  what its refusal checks ask sock_diag for (the receive queue's true length, TCP-MD5 keys, ULP, shutdown);
- the 4-tuple comes from the dump (the socket is found there by its inode) instead of getsockname/getpeername;
- of the options read before repair mode, those the dump shows exactly as getsockopt does (TOS / TCLASS, SO_MARK,
  IP_FREEBIND, SO_SNDBUF, SO_RCVBUF, TCP_CONGESTION, no SO_BINDTODEVICE) are taken from it; repair mode changes
  none of them (it forces only the reuse flag, which is read before it as checkpoint() does);
- the refusal checks the dump cannot answer are made per socket (engine/_refuse.py refusals_suspected); when
  anything is suspected, checkpoint()'s own check runs and raises the same error checkpoint() raises.

A socket the dump does not show (another namespace) has its namespace dumped in turn. The states are the ones
checkpoint() returns, field by field (tests/root/test_engine_batch.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from sockrepair.engine._checkpoint import (
    ensure_state,
    ensure_unchanged,
    first_look,
    frozen_state,
    resume_session,
)
from sockrepair.engine._diag import SOCKOPT_FREEBIND, SockView, dump_views
from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._refuse import refusals_suspected, refuse
from sockrepair.engine._session import (
    CHARS,
    SockLike,
    _Session,
    getsockopt,
    hold_reuse,
    new,
    signed32,
)
from sockrepair.engine._sockopts import read_sockopt_values
from sockrepair.engine._socksession import sessions_of
from sockrepair.engine._states import REPAIRABLE
from sockrepair.engine._tcpopts import tcp_info
from sockrepair.errors import SocketCallError
from sockrepair.state import ConnectionState, SocketOptions

# The SocketOptions fields taken from the dump.
DUMPED = frozenset({"tos", "mark", "freebind", "sndbuf", "rcvbuf", "congestion", "bindtodevice"})
_STATES = sum(1 << s for s in REPAIRABLE)
_IFNAMSIZ = 16


@dataclass(frozen=True)
class _Info:
    """The fields of struct tcp_info (linux/tcp.h) frozen_state() reads, from the dump's INET_DIAG_INFO."""

    tcpi_state: int
    tcpi_options: int
    tcpi_wscales: int


@dataclass
class _Frozen:
    session: _Session
    first_state: int
    family: int
    values: dict[str, object]


def checkpoint_many(socks: Sequence[SockLike]) -> list[ConnectionState]:
    """checkpoint() of every socket in `socks` (socket objects or fds of this process), in their order: each is left
    frozen (repair mode on) and its state is the one checkpoint() would return. The network lock must hold every
    one of them off from before the call.

    Raises what checkpoint() raises, for the first socket found failing (errors carry its `.fd`); every socket the
    call put in repair mode is then resumed (repair off without a window probe) before the error goes up."""
    with sessions_of(socks) as sessions:
        return _checkpoint_all(sessions)


def _checkpoint_all(sessions: Sequence[_Session]) -> list[ConnectionState]:
    frozen: list[_Frozen] = []
    try:
        for session in sessions:
            first_state, family = first_look(session)
            values = read_sockopt_values(session, family, DUMPED)
            session.repair_on()
            frozen.append(_Frozen(session, first_state, family, values))
            if values["reuseaddr"]:
                hold_reuse(session.fd)
        inodes = [os.fstat(f.session.fd).st_ino for f in frozen]
        views = _views(frozen, inodes)
        return [_finish(f, views[inode]) for f, inode in zip(frozen, inodes)]
    except BaseException:
        for f in frozen:
            with contextlib.suppress(OSError):
                resume_session(f.session)
        raise


def _views(frozen: Sequence[_Frozen], inodes: Sequence[int]) -> dict[int, SockView]:
    """The dump's view of every socket, by inode: one dump in the namespace of the first socket, and one more in the
    namespace of each socket the dumps so far did not show."""
    families = {f.family for f in frozen}
    wanted = set(inodes)
    views: dict[int, SockView] = {}
    for f, inode in zip(frozen, inodes):
        if inode in views:
            continue
        views.update(dump_views(f.session, families, _STATES, wanted - views.keys()))
        if inode not in views:
            # not among the states checkpoint() takes any more, in its own namespace: it left its state
            ensure_state(f.session, f.first_state, tcp_info(f.session).tcpi_state)
            raise SocketCallError(errno.ENOENT, "sock_diag dump (the socket is not listed)", f.session.fd)
    return views


def _finish(f: _Frozen, view: SockView) -> ConnectionState:
    session = f.session
    session.tuple = view.tuple
    if refusals_suspected(session, view, f.first_state):
        refuse(session, view.tuple, f.first_state)
    ensure_state(session, f.first_state, view.state)
    info = _Info(view.state, view.info[5], view.info[6]) if len(view.info) > 6 else tcp_info(session)
    return frozen_state(session, info, _options(session, f, view))


def _options(session: _Session, f: _Frozen, view: SockView) -> SocketOptions:
    values = f.values
    tos = view.tclass if f.family == socket.AF_INET6 else view.tos
    if (tos is None or view.mark is None or view.sockopt is None or view.congestion is None or view.sndbuf is None
            or view.rcvbuf is None):
        # a kernel whose dump lacks one of them: read them all now (repair mode changes none but the reuse flag)
        values = read_sockopt_values(session, f.family) | {"reuseaddr": values["reuseaddr"]}
    else:
        values = values | {"tos": tos, "mark": signed32(view.mark), "freebind": bool(view.sockopt & SOCKOPT_FREEBIND),
                           "sndbuf": view.sndbuf, "rcvbuf": view.rcvbuf, "congestion": view.congestion,
                           "bindtodevice": _device(session) if view.ifindex else ""}
    return SocketOptions(**values)  # type: ignore[arg-type]


def _device(session: _Session) -> str:
    """SO_BINDTODEVICE's name (the dump gives the index only)."""
    buf = new(CHARS, _IFNAMSIZ)
    size = session.size
    size[0] = _IFNAMSIZ
    if getsockopt(session.fd, lib.SOL_SOCKET, lib.SO_BINDTODEVICE, buf, size) < 0:
        raise session.fail("getsockopt(SO_BINDTODEVICE)")
    return ffi.string(buf, size[0]).decode("ascii", "replace")  # type: ignore[no-any-return]



def ensure_all_unchanged(socks: Sequence[SockLike], states: Sequence[ConnectionState]) -> None:
    """What discard() checks, of every frozen socket in `socks` against its state in `states`: a mover checks every
    socket before it discards any. Raises SocketStateError (`.fd`, `.tuple`) for
    the first that sent or received since its checkpoint."""
    with sessions_of(socks) as sessions:
        for session, state in zip(sessions, states):
            session.tuple = state.tuple
            ensure_unchanged(session, state)
