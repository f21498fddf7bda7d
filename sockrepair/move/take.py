"""Taking connections out of a running program that knows nothing of sockrepair: freeze it, take its sockets with
pidfd_getfd, lock them and checkpoint them (captured()); then the caller lets them go on there, or ends the source
(end_source()) once their states are safe elsewhere."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sockrepair.engine._batch import (
    checkpoint_many,
    discard_all,
    ensure_all_unchanged,
    owed_acks,
    segs_out_of,
)
from sockrepair.engine._checkpoint import (
    REPAIRABLE_NAMES,
    checkpoint,
    checkpoint_session,
    first_look,
    resume,
)
from sockrepair.engine._refuse import refusals_of
from sockrepair.engine._repair import in_repair
from sockrepair.engine._session import session_of
from sockrepair.engine._states import REPAIRABLE
from sockrepair.errors import ProcessError, SocketCallError, SocketStateError
from sockrepair.lock import Locker
from sockrepair.move.backlog import Backlog, drain, take_listeners
from sockrepair.move.freeze import Freezer
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import (
    ProcSocket,
    fd_holders,
    fd_links,
    process_name,
    stat,
    tcp_sockets,
    tcp_table,
)
from sockrepair.move.quiesce import Freeze, Quiescence, quiescent_freeze
from sockrepair.move.stages import Stage, Timings
from sockrepair.netns import inside
from sockrepair.sigmask import deferred_signals
from sockrepair.state import TCP_LISTEN, ConnectionState, ConnTuple

KILL_TIMEOUT = 5.0


@dataclass
class Captured:
    """Sockets taken from a process, still frozen (repair mode on) and locked: `sockets[i]` (the process's fd and
    the tuple) is held here as the pidfd_getfd copy `fds[i]` and was read as `states[i]`."""

    pid: int
    sockets: list[ProcSocket]
    fds: list[int]
    states: list[ConnectionState]
    freeze: Freeze  # how and when it was frozen (downtime counts from freeze.frozen_at), and whether quiescent
    pidfd: PidFd
    freezer: Freezer
    ended: bool = False  # end_source() began discarding: the source cannot go on any more
    # found stopped, with these of its fds already in repair mode: what a sockrepair killed mid-move leaves when its
    # guard died too (a SIGSTOP or cgroup freeze); a resume puts them right, and the process is continued then
    left_behind: list[int] = field(default_factory=list)
    stopped: bool = False  # found stopped (state T) before the freeze
    lost: list[Unmovable] = field(default_factory=list)  # connections left behind, accepted with allow_loss
    # per state, whether its old socket may owe its peer an ACK (owed_acks; restore_with's `owed`), found when
    # captured() was asked to (`owed`); empty: unknown, every one may
    owed: list[bool] = field(default_factory=list)
    # the process's listeners no other process holds (from the look), when captured() was asked for its `backlog`;
    # end_source() takes them right before the kill, accepts what waits in them right after it into `backlog`
    # (sockrepair.move.backlog), and closes them: the caller hands those connections off, carries them, or resets them
    listeners: list[ProcSocket] = field(default_factory=list)
    backlog: Backlog = field(default_factory=Backlog)

    @property
    def freeze_method(self) -> str:
        return self.freeze.method

    @property
    def frozen_at(self) -> float:
        return self.freeze.frozen_at


# A socket in these states holds no connection: ending its process loses nothing a peer could notice (procfs lists
# a socket in CLOSE only while it holds its peer: the unread bytes and error of a closed connection).
_NO_CONNECTION = frozenset({TCP_LISTEN})
# What getxattr(system.sockprotoname) calls the sockets the engine can repair.
_TCP_PROTOCOLS = frozenset({"TCP", "TCPv6"})


@dataclass(frozen=True)
class Unmovable:
    """A connection of the process that a move does not take, and that ending the process destroys: `sock` (the
    process's fd, tuple and state), `protocol` (the kernel's name: "TCP", "TCPv6", "MPTCP"...) and `reason`."""

    sock: ProcSocket
    protocol: str
    reason: str

    def __str__(self) -> str:
        s = self.sock
        return f"fd {s.fd} {self.protocol} {s.tuple} {s.state_name} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        s = self.sock
        return {"fd": s.fd, "protocol": self.protocol, "tuple": str(s.tuple), "state": s.state_name,
                "reason": self.reason}


def socket_protocol(pid: int, fd: int) -> str:
    """The protocol of the process's socket `fd` as the kernel names it (sock->sk_prot->name: "TCP", "TCPv6",
    "MPTCP", "MPTCPv6"...): MPTCP subflows share their socket's inode, so /proc/net/tcp lists an MPTCP socket as a
    TCP one. "" when the fd is gone."""
    try:
        return os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname").rstrip(b"\0").decode("ascii", "replace")
    except OSError:
        return ""


def _why_not(sock: ProcSocket, protocol: str, keep_errors: bool = False) -> str | None:
    """Why a move cannot take this connection, or None when it can. `keep_errors`: the process goes on, so a
    socket in CLOSE with an error pending is not taken (its checkpoint would read the error, which clears it)."""
    if protocol and protocol not in _TCP_PROTOCOLS:
        return f"{protocol} is not plain TCP: TCP_REPAIR cannot take it"
    if sock.tcp_state not in REPAIRABLE:
        return f"only {REPAIRABLE_NAMES} connections can be moved"
    if keep_errors and sock.error_pending:
        return "an error is pending in CLOSE, which a checkpoint would clear while the process goes on"
    return None


def select_sockets(pid: int, wanted: Sequence[int] | None, keep_errors: bool = False,
                   links: dict[int, str] | None = None, found: list[ProcSocket] | None = None) -> list[ProcSocket]:
    """The process's sockets to take: the fds in `wanted` (each must be a plain TCP socket in a state the engine
    repairs: ESTABLISHED, half-closed, SYN_SENT or CLOSE after a connection), or every such one, among the fds of
    `links` (procfs.fd_links(), when the caller read them; `found`: the tcp_sockets() of those links, when the caller
    read them too). Raises ProcessError (no such fd, an empty `wanted`, no connection to take) or SocketStateError
    (naming the process's pid and fd, the protocol, the tuple and the state). `keep_errors`: see _why_not."""
    if wanted is not None and not wanted:
        # not "every connection": a caller's filter that kept nothing must not end the program with all of them
        raise ProcessError(f"no fd of process {pid} asked for (wanted=[]; None takes every connection)", pid=pid)
    if found is None:
        found = tcp_sockets(pid, links)
    if wanted:
        by_fd = {s.fd: s for s in found}
        chosen = []
        for fd in wanted:
            if fd not in by_fd:
                raise ProcessError(f"fd {fd} of process {pid} is not a TCP socket (or not open)", pid=pid, fd=fd)
            s = by_fd[fd]
            protocol = socket_protocol(pid, fd)
            why = _why_not(s, protocol, keep_errors)
            if why is not None:
                raise SocketStateError(f"fd {fd} of process {pid} ({protocol} {s.tuple}) is {s.state_name}: {why}",
                                       pid=pid, fd=fd, tuple=s.tuple, tcp_state=s.tcp_state)
            chosen.append(s)
        _refuse_twice(pid, chosen)
        return chosen
    chosen = [s for s in found if _why_not(s, socket_protocol(pid, s.fd), keep_errors) is None]
    if not chosen:
        raise ProcessError(f"process {pid} ({process_name(pid)}) holds no TCP connection that can be moved (only plain "
                           f"TCP ones in {REPAIRABLE_NAMES} can)", pid=pid)
    _refuse_twice(pid, chosen)
    return chosen


def _refuse_twice(pid: int, chosen: Sequence[ProcSocket]) -> None:
    """SocketStateError (`.pid`, `.fd`, `.tuple`, `.tcp_state` of the second fd) when two of the `chosen` fds hold
    the same socket (dup, dup2): each connection is checkpointed and restored once, and a second restore of its
    4-tuple would fail once the process is gone. The caller's error path leaves the process as it was."""
    first: dict[int, int] = {}
    for s in chosen:
        if s.inode in first:
            raise SocketStateError(
                f"fds {first[s.inode]} and {s.fd} of process {pid} ({process_name(pid)}) hold the same connection "
                f"({s.tuple}): a move takes each connection once; leave one of them out (--fd, wanted=...). Nothing "
                "was moved", pid=pid, fd=s.fd, tuple=s.tuple, tcp_state=s.tcp_state)
        first[s.inode] = s.fd


def left_behind(pid: int, chosen: Sequence[ProcSocket], keep_errors: bool = False,
                shared: Collection[int] = (), links: dict[int, str] | None = None,
                found: list[ProcSocket] | None = None) -> list[Unmovable]:
    """Every connection of the process (any TCP state but LISTEN, any protocol /proc/net/tcp lists, and CLOSE ones
    that hold a peer) that is not in `chosen`, with the reason it is not: what ending the process would destroy.
    Those whose inode is in `shared` (another process has them open: procfs.fd_holders) are not: it keeps them.
    `links`: the fd_links() `chosen` was selected from (a connection accepted since is no loss yet: the look
    under the freeze finds it), else read now; `found`: their tcp_sockets(), when read already."""
    taken = {s.fd for s in chosen}
    moved = {s.inode for s in chosen}  # another fd of a chosen socket is no loss: its connection moves
    out = []
    for s in tcp_sockets(pid, links) if found is None else found:
        if s.fd in taken or s.inode in moved or s.tcp_state in _NO_CONNECTION or s.inode in shared:
            continue
        protocol = socket_protocol(pid, s.fd)
        out.append(Unmovable(s, protocol, _why_not(s, protocol, keep_errors) or "not among the fds asked for"))
    return out


def screen(pid: int, pidfd: PidFd, chosen: Sequence[ProcSocket], wanted: Sequence[int] | None,
           allow_loss: bool) -> tuple[list[ProcSocket], list[Unmovable]]:
    """Check each chosen socket, through a pidfd_getfd copy, for what TCP_REPAIR cannot move (the REFUSED entries
    of sockrepair.engine.registry: urgent data, TCP-MD5 keys, kTLS, TCP-AO...), before anything is frozen. Returns
    (the sockets to take, those that cannot be taken). A socket asked for by fd (`wanted`) that cannot be taken
    raises SocketStateError naming the process's pid and fd, the protocol, the tuple and each refused entry; one
    found by itself is refused the same way unless `allow_loss`. A connection the process closed since it was listed
    is in neither list (nothing to take, nothing lost: a busy server closes connections all the time), unless it was
    asked for (ProcessError)."""
    take, cannot = [], []
    for s in chosen:
        # None too when its number went to another file since: the look under the freeze finds that one as new
        copy = pidfd.getfd_if_same(s.fd, s.inode)
        if copy is None:
            if wanted:
                raise ProcessError(f"fd {s.fd} of process {pid} ({s.tuple}) was closed by the process while being "
                                   "looked at; nothing was frozen", pid=pid, fd=s.fd)
            continue
        try:
            found = refusals_of(copy)
        finally:
            os.close(copy)
        if not found:
            take.append(s)
            continue
        protocol = socket_protocol(pid, s.fd)
        why = "uses what TCP_REPAIR cannot move: " + "; ".join(f"{detail} ({entry})" for entry, detail in found)
        if wanted or not allow_loss:
            raise SocketStateError(f"fd {s.fd} of process {pid} ({protocol} {s.tuple}) {why}; nothing was frozen",
                                   pid=pid, fd=s.fd, tuple=s.tuple, tcp_state=s.tcp_state)
        cannot.append(Unmovable(s, protocol, why))
    return take, cannot


def refuse_losses(pid: int, lost: Sequence[Unmovable]) -> None:
    """Raise SocketStateError (`.pid`; `.fd`, `.tuple`, `.tcp_state` of the first) naming every connection in
    `lost`, when there is any: raised before anything is frozen."""
    if not lost:
        return
    first = lost[0].sock
    listed = "; ".join(map(str, lost))
    raise SocketStateError(
        f"process {pid} ({process_name(pid)}) holds {len(lost)} connection(s) that cannot be moved, and ending the "
        f"process would close or reset them: {listed}. Nothing was frozen; accept losing them with --allow-loss "
        "(allow_loss=True), or leave the process running", pid=pid, fd=first.fd, tuple=first.tuple,
        tcp_state=first.tcp_state)


def refuse_shared(pid: int, chosen: Sequence[ProcSocket], holders: dict[int, set[int]]) -> None:
    """Raise SocketStateError (`.pid`, `.fd`, `.tuple`, `.tcp_state` of the first) when another process than `pid`
    has one of the `chosen` sockets open (`holders`: procfs.fd_holders() of their inodes, `pid` and sockrepair's
    own processes skipped): a child that inherited it, one it was passed to. Only `pid` is frozen, and a move ends
    the socket where it is (repair mode, then gone): the other process would lose the connection under its feet,
    its writes meanwhile refused. Raised before anything is frozen."""
    shared = [(s, sorted(holders[s.inode])) for s in chosen if s.inode in holders]
    if not shared:
        return
    listed = "; ".join(f"fd {s.fd} ({s.tuple}) is open in process "
                       + ", ".join(f"{other} ({process_name(other)})" for other in others)
                       for s, others in shared)
    first = shared[0][0]
    raise SocketStateError(
        f"process {pid} ({process_name(pid)}) shares {len(shared)} connection(s) with processes sockrepair does not "
        f"freeze: {listed}. Nothing was frozen; move the other processes' connections first or end them, or leave "
        "those fds out (--fd with the others, wanted=...)", pid=pid, fd=first.fd, tuple=first.tuple, tcp_state=first.tcp_state)


def refuse_one_tuple_twice(pid: int, chosen: Sequence[ProcSocket]) -> None:
    """Raise SocketStateError (`.pid`, `.fd`, `.tuple`, `.tcp_state` of the second) when two of the `chosen` sockets
    have one 4-tuple: the peer reset the first (the process holds it in CLOSE, its reset not yet read) and connected
    again from the same port, and the process accepted that one too. Two sockets of one 4-tuple cannot be restored
    (the repair-mode connect of the second fails, EADDRINUSE), and a move that found out after the kill would lose
    every connection it holds: raised under the freeze, before the lock, and the process goes on."""
    seen: dict[ConnTuple, ProcSocket] = {}
    for sock in chosen:
        first = seen.setdefault(sock.tuple.wire(), sock)
        if first is not sock:
            raise SocketStateError(
                f"process {pid} ({process_name(pid)}) holds fd {first.fd} ({first.state_name}) and fd {sock.fd} "
                f"({sock.state_name}) on one 4-tuple, {sock.tuple}: its peer reset one and connected again from the "
                "same port. Two sockets of one 4-tuple cannot be restored; nothing was moved and the process goes "
                "on: move it once it has read the reset and closed that fd", pid=pid, fd=sock.fd, tuple=sock.tuple,
                tcp_state=sock.tcp_state)


def process_locker(pid: int) -> Locker:
    """A lock socket in the process's own network namespace, where its connections' packets flow. Raises
    ProcessError (`.pid`) when there is no such process, NetnsError when its namespace cannot be entered."""
    # /proc/PID itself first: for a pid that does not exist, "no network namespace at /proc/PID/ns/net" would
    # send the caller to `ip netns list`
    if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
        raise ProcessError(f"no such process: {pid}", pid=pid)
    with inside(f"/proc/{pid}/ns/net"):
        return Locker()


def _in_process(exc: SocketStateError, pid: int, sock: ProcSocket, copy: int) -> SocketStateError:
    """The engine's error names the pidfd_getfd copy's fd, which means nothing to the caller: name the process's
    own fd, its pid, the protocol, the tuple and the state the kernel shows now."""
    reason = str(exc).removeprefix(f"fd {copy} ").removeprefix(f"({sock.tuple}) ")
    now = tcp_table(pid).get(sock.inode)
    protocol = socket_protocol(pid, sock.fd) or "TCP"
    return SocketStateError(f"fd {sock.fd} of process {pid} ({protocol} {sock.tuple}) {reason}", pid=pid, fd=sock.fd,
                            tuple=sock.tuple, tcp_state=now[1] if now is not None else exc.tcp_state)


def _in_process_of(exc: SocketStateError, pid: int, socks: Sequence[ProcSocket],
                   copies: Sequence[int]) -> SocketStateError:
    """_in_process() for the copy among `copies` (of `socks`, in that order) the engine's error names; `exc` itself
    when it names none of them."""
    for sock, copy in zip(socks, copies):
        if copy == exc.fd:
            return _in_process(exc, pid, sock, copy)
    return exc


def checkpoint_taken(pid: int, sock: ProcSocket, copy: int, leave_in_repair: bool = False) -> ConnectionState:
    """checkpoint() of `copy`, process `pid`'s socket `sock` taken with pidfd_getfd; with `leave_in_repair` a
    failure leaves it in repair mode instead of resuming it (for one found so). Raises SocketStateError naming the
    process's pid and fd, the tuple and the TCP state."""
    try:
        if not leave_in_repair:
            return checkpoint(copy)
        session = session_of(copy)
        return checkpoint_session(session, *first_look(session), resume_on_error=False)
    except SocketStateError as exc:
        raise _in_process(exc, pid, sock, copy) from None


def checkpoint_all_taken(pid: int, chosen: Sequence[ProcSocket], copies: Sequence[int]) -> list[ConnectionState]:
    """checkpoint_many() of `copies`, process `pid`'s sockets `chosen` taken with pidfd_getfd (one sock_diag dump
    for all of them). Raises SocketStateError naming the process's pid and fd, the tuple and the TCP state of the
    socket that failed; every copy is then out of repair mode again."""
    try:
        return checkpoint_many(copies)
    except SocketStateError as exc:
        raise _in_process_of(exc, pid, chosen, copies) from None


def _other_fds(pid: int, chosen: Sequence[ProcSocket]) -> dict[int, str]:
    """fd -> link target of the process's fds that are not `chosen`, read now: a link for each fd not chosen only
    (few in a program whose fds are mostly its connections). Raises ProcessError."""
    return fd_links(pid, skip={s.fd for s in chosen})


def _sockets(links: dict[int, str]) -> dict[int, str]:
    return {fd: target for fd, target in links.items() if target.startswith("socket:[")}


def _same_fds(pid: int, chosen: Sequence[ProcSocket], others: dict[int, str]) -> bool:
    """Whether the process's sockets besides `chosen` (whose fds it still holds) are still those of `others` (fd ->
    link of the fds not chosen, from the listing they were chosen from: procfs.fd_links). Its count of open fds
    (the size of /proc/PID/fd, Linux 6.2+: 0 before) equal to the chosen and the others, each other fd still linked
    as it was, means the same fds, without listing /proc/PID/fd (0.6-2 ms at 1,000 fds); otherwise the list is read
    and its sockets compared, as it always is while a thread waits in accept() (the fd it reserved counts,
    unlisted). Raises ProcessError (_other_fds)."""
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        if os.stat(fd_dir).st_size == len(chosen) + len(others) and all(
                os.readlink(f"{fd_dir}/{fd}") == target for fd, target in others.items()):
            return True
    return _sockets(_other_fds(pid, chosen)) == _sockets(others)


def _taken_if_same(pid: int, pidfd: PidFd, chosen: Sequence[ProcSocket], others: dict[int, str]) -> list[int] | None:
    """pidfd_getfd copies of the process's `chosen` sockets, in their order, when each of their fds still holds the
    socket (inode) it held when they were chosen and its other sockets are still those of `others` (_same_fds);
    None, with no copy left open, when not (the process closed one, opened another file at its number, or accepted
    or made a connection, since): the fd -> inode map must then be read again. The copies are needed anyway, and
    comparing their inodes spares reading the links of the chosen fds under the freeze (a readlink per fd of the
    process: 5-8 ms at 1,000 connections). Raises ProcessError (_other_fds), no copy left open then."""
    same = False
    # short when one is closed; the map read again says whether the process itself is gone
    fds = pidfd.getfds([s.fd for s in chosen])
    try:
        fstat = os.fstat
        if len(fds) == len(chosen) and all(fstat(fd).st_ino == s.inode for fd, s in zip(fds, chosen)):
            # a connection accepted or made since the look: read again, it is taken or refused, never left to die
            # with the process
            same = _same_fds(pid, chosen, others)
    finally:
        if not same:
            for fd in fds:
                os.close(fd)
    return fds if same else None


@contextlib.contextmanager
def captured(pid: int, wanted: Sequence[int] | None, locker: Locker | None, timings: Timings,
             ttl: float = 60.0, quiescence: Quiescence = Quiescence(),
             freezer: Freezer | None = None, allow_loss: bool = False,
             keep_errors: bool = False, owed: bool = False, group: int | None = None,
             backlog: bool = False) -> Iterator[Captured]:
    """Freeze `pid` where every thread waits, as `quiescence` says (sockrepair.move.quiesce), take and checkpoint
    its connections (see select_sockets), lock them with `locker` for `ttl` seconds, and yield them frozen and
    locked; the freeze, lock and checkpoint stages are timed into `timings`. On an error (KeyboardInterrupt
    included) before end_source() began, every socket is resumed, the lock released and the process thawed, with
    SIGINT, SIGTERM and SIGHUP held off until that is done; after it, the lock is kept for the restore. On success
    the caller decides (resume, or end_source()). The freeze goes through `freezer` (sockrepair.move.freeze; one of
    its own when None), whose guard undoes all this if sockrepair dies. Raises ProcessError and SocketStateError
    naming the process's pid and fd; ProcessError too when the process stayed busy and the policy refuses (nothing
    was taken), or is sockrepair itself or one of its ancestors. Every other connection of the process is listed in
    Captured.lost; unless `allow_loss`, any such connection is refused before the freeze (refuse_losses).
    `keep_errors` (the caller resumes the process): a socket in CLOSE with an error pending is not taken.
    `owed` (the caller restores the states it is given): Captured.owed says which sockets may owe their peer an
    ACK, from their tcpi_segs_out read before the lock and again after the checkpoint (owed_acks). `group`: the
    nfnetlink_log group of the caller's recorder there (Recorder.group), which the lock copies the peers' packets to.
    `backlog` (the caller takes the connections waiting in the process's listeners too: migrate() of every connection,
    dump() that kills): Captured.listeners are the process's listeners that no other process holds, whose accept
    queues end_source() keeps from the kill."""
    with contextlib.ExitStack() as owned:
        # the caller's guard, when it is to outlive the capture (migrate() hands it the restored sockets)
        if freezer is None:
            freezer = owned.enter_context(Freezer(pid))
        pidfd = freezer.pidfd
        # /proc/PID/fd and /proc/PID/net/tcp are read before the freeze (reading them costs ms with many
        # connections); under the freeze the inodes of the sockets taken are compared with these, and both are read
        # again only if the process changed its sockets meanwhile (_taken_if_same). The fds not chosen are compared
        # as they were in the very listing the sockets were chosen from: a connection accepted after it is new
        # under the freeze, one accepted before it was chosen, or refused as lost
        links = fd_links(pid)
        found = tcp_sockets(pid, links)
        chosen = select_sockets(pid, wanted, keep_errors, links, found)
        lost = left_behind(pid, chosen, keep_errors, links=links, found=found)
        # one look through every process's fds (a few ms), before the freeze, for: the connections left out (one
        # another process holds is not lost with this one: refuse_shared's advice is to leave the shared fds out),
        # the chosen (refuse_shared) and the listeners whose accept queue the move keeps from the kill (one another
        # process holds, a pre-forked sibling's, goes on accepting there). A listener this process holds too, a
        # supervisor's, is shared; a connection this process holds is not (the copies it takes)
        listening = [s for s in found if s.tcp_state == TCP_LISTEN] if backlog else []
        holders = fd_holders([s.inode for s in (*chosen, *(u.sock for u in lost), *listening)], {pid, freezer.child})
        me = os.getpid()
        shared = {ino: pids - {me} for ino, pids in holders.items() if pids - {me}}
        lost = [u for u in lost if u.sock.inode not in shared]
        if not allow_loss:
            refuse_losses(pid, lost)
        listed = chosen
        chosen, unmovable = screen(pid, pidfd, chosen, wanted, allow_loss)
        if not chosen:
            why = "; ".join(map(str, unmovable)) or "those it held were closed"
            # a caller that resumes the process (keep_errors) would have resumed these with the ones it moved
            resumed = resume_in_repair(pidfd, unmovable) if keep_errors else []
            if resumed:
                now = stat(pid)
                halted = now is not None and now.state == "T"
                if halted:
                    os.kill(pid, signal.SIGCONT)
                why += (f"; fd(s) {', '.join(map(str, resumed))} were in repair mode (an interrupted move): taken "
                        "out of it" + (", and the stopped process continued" if halted else ""))
            raise ProcessError(f"process {pid} holds no connection that can be moved: {why}", pid=pid)
        lost += unmovable
        refuse_shared(pid, chosen, shared)
        listeners = [s for s in listening if s.inode not in holders]
        taken_fds = {s.fd for s in chosen}
        # what screen() found closed is no longer among the process's fds either
        gone = {s.fd for s in listed} - taken_fds - {u.sock.fd for u in unmovable}
        others = {fd: target for fd, target in links.items() if fd not in taken_fds and fd not in gone}
        before = stat(pid)
        stopped_before = before is not None and before.state == "T"
        # the guard gives these back if sockrepair dies before ending the source
        freezer.watch([s.fd for s in chosen], [s.tuple for s in chosen])
        with timings.timed(Stage.FREEZE), contextlib.ExitStack() as freezing:
            freeze = freezing.enter_context(quiescent_freeze(pid, quiescence, freezer))
            thaw = freezing.pop_all()
        with thaw:
            taken = _taken_if_same(pid, pidfd, chosen, others)
            if taken is None:
                # the process closed a chosen fd, or has another file at its number, or another socket, since the
                # look: what was screened out stays out; anything new is checked by checkpoint() itself
                skipped = {u.sock.fd for u in unmovable}
                chosen = [s for s in select_sockets(pid, wanted, keep_errors) if s.fd not in skipped]
                lost = [u for u in left_behind(pid, chosen, keep_errors, shared) if u.sock.fd not in skipped] + unmovable
                if not allow_loss:
                    refuse_losses(pid, lost)
                freezer.watch([s.fd for s in chosen], [s.tuple for s in chosen])
            fds: list[int] = taken if taken is not None else []
            states: list[ConnectionState] = []
            cap = Captured(pid, chosen, fds, states, freeze, pidfd, freezer, lost=lost, listeners=listeners)
            try:
                if taken is None:
                    for s in chosen:
                        fds.append(pidfd.getfd(s.fd))
                if stopped_before:
                    cap.stopped = True
                    cap.left_behind = [s.fd for s, fd in zip(chosen, fds) if in_repair(fd)]
                refuse_one_tuple_twice(pid, chosen)
                # before the lock: what a socket sends from there on is dropped, and owed_acks must see it
                sent = segs_out_of(fds) if owed else []
                if locker is not None:
                    with timings.timed(Stage.LOCK):
                        locker.lock([s.tuple for s in chosen], ttl=ttl, group=group)
                with timings.timed(Stage.CHECKPOINT):
                    # all or none: a failing batch resumes what it froze itself
                    states.extend(checkpoint_all_taken(pid, chosen, fds))
                    freezer.reuse([s.fd for s, st in zip(chosen, states) if st.sockopts.reuseaddr])
                    if owed:
                        cap.owed = owed_acks(fds, states, sent)
                yield cap
            except BaseException:
                # past the point of no return the source is gone and the lock must hold for the restore
                if not cap.ended:
                    with deferred_signals():
                        for fd in fds[: len(states)]:
                            with contextlib.suppress(OSError):
                                resume(fd)
                        if locker is not None:
                            locker.unlock([s.tuple for s in chosen])
                raise
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def resume_in_repair(pidfd: PidFd, lost: Sequence[Unmovable]) -> list[int]:
    """Take the sockets of `lost` (a capture's, or the screen's unmovable) that are in repair mode out of it (no
    window probe), for a process that goes on: a move killed half-way leaves its program stopped with its sockets
    in repair mode, some of which no move can take (urgent data...). Returns their fds; one that cannot be read, or
    whose fd now holds another file, is left as it is."""
    resumed = []
    for u in lost:
        try:
            copy = pidfd.getfd_if_same(u.sock.fd, u.sock.inode)
        except ProcessError:
            continue
        if copy is None:
            continue
        try:
            if in_repair(copy):
                resume(copy)
                resumed.append(u.sock.fd)
        except SocketCallError:
            continue
        finally:
            os.close(copy)
    return resumed


def end_source(cap: Captured, timeout: float = KILL_TIMEOUT, passed: Callable[[], object] | None = None,
               wait: bool = True) -> None:
    """End the source of a capture once the states are safe elsewhere: check that no frozen socket sent or received
    since its checkpoint, SIGKILL the frozen process and disconnect and close our copies of its sockets (no FIN, no
    RST: every copy, the process's own included, is in repair mode), so that their 4-tuples are free for a restore
    on this host (discard_all), and, with `wait`, wait for the process to exit (else call wait_exited() later).

    Raises SocketStateError (pid, the process's fd, tuple, state) before discarding anything when a socket changed:
    the captured() context then resumes every socket and the process goes on. Raises ProcessError when the process
    has not exited `timeout` seconds after SIGKILL.

    From the kill on, the source is ended whatever happens (`cap.ended`): a socket discarded here is still in repair
    mode in the process, which must not run again. SIGINT, SIGTERM and SIGHUP wait until it is done.
    `passed` runs right after the guard was told the point of no return is passed, before the kill (the
    movers mark their image directory there: sockrepair.move.journal.mark_ended); when it raises, the source is
    ended all the same and its exception passes. The connections waiting in `cap.listeners` (captured()'s
    `backlog`) are accepted right after the kill into `cap.backlog`, which the caller then owns."""
    try:
        ensure_all_unchanged(cap.fds, cap.states)
    except SocketStateError as exc:
        raise _in_process_of(exc, cap.pid, cap.sockets, cap.fds) from None
    disconnected = False
    with deferred_signals():
        cap.freezer.ending()
        cap.ended = True
        try:
            # the guard was told: a mark that fails (ENOSPC, EIO) still ends the source, which must never run on with
            # its sockets in repair mode, and still closes our copies (left open, they would hold the tuples)
            if passed is not None:
                passed()
        finally:
            # killed first: its exit (closing its own copies, freeing its memory: milliseconds) runs on another CPU
            # while ours are discarded here and the move goes on
            listening: list[socket.socket] = []
            try:
                try:
                    # held open by these duplicates, the listeners outlive the kill, and their accept queues with them
                    listening = take_listeners(cap.pidfd, cap.listeners)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(cap.pid, signal.SIGKILL)
            finally:
                try:
                    disconnected = discard_all(cap.fds, [s.inode for s in cap.sockets])
                finally:
                    cap.fds.clear()
                    # what connected while the process was frozen, accepted; the listeners closed as its exit would
                    # (the restore makes a socket per moved connection: those fds are kept free too)
                    cap.backlog = drain(listening, reserve=len(cap.sockets))
    if wait or not disconnected:  # a tuple still hashed is freed only by the process's exit
        wait_exited(cap, timeout)


def wait_exited(cap: Captured, timeout: float = KILL_TIMEOUT) -> None:
    """Wait until the process end_source() killed has exited and its files are closed. Raises ProcessError when it
    has not within `timeout` seconds of this call (the SIGKILL was sent earlier, in end_source())."""
    # a ptrace stop holds the killed threads as zombies until their tracer, the guard, collects them
    cap.freezer.reap()
    # the pidfd turns readable once the process has exited and its files are closed
    poller = select.poll()
    poller.register(cap.pidfd.fd, select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise ProcessError(f"process {cap.pid} did not exit within {timeout:.0f} s of SIGKILL", pid=cap.pid)
