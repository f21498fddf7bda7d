"""Everything sockrepair reads from /proc about a process: its TCP sockets (which fd holds which connection, in the
process's own namespace), its /proc/PID/stat fields (parent, process group, session, state, start time) and those of
its threads, its cgroup and its network namespace.

The kernel writes /proc/PID/stat in fs/proc/array.c (do_task_stat): `pid (comm) state ppid pgrp session ...`, where
comm is the task's name as the program set it, spaces and parentheses included: the fields after it start after
the LAST ')'."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

from sockrepair.engine._states import closed_tuple
from sockrepair.errors import ProcessError, refused_advice
from sockrepair.move.pidfd import PidFd
from sockrepair.state import TCP_CLOSE, ConnTuple, state_name


@dataclass(frozen=True)
class ProcSocket:
    """`error_pending`: in CLOSE, an error (sk_err) the program has still to see, found with poll (POLLERR), which
    leaves it there: a checkpoint reads it, and so clears it."""

    fd: int
    inode: int
    tuple: ConnTuple
    tcp_state: int
    error_pending: bool = False

    @property
    def state_name(self) -> str:
        return state_name(self.tcp_state)


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that sockrepair uses; `starttime` (clock ticks after boot) tells a reused pid
    from the process that had it."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int
    flags: int = 0  # the kernel's task->flags (PF_*, include/linux/sched.h)

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def stopped(self) -> bool:
        """Stopped by a signal or a tracer, or past stopping at all (a zombie)."""
        return self.state in ("T", "t", "Z", "X")


def parse_stat(pid: int, text: str) -> ProcStat:
    """One /proc/PID/stat (or /proc/PID/task/TID/stat) line; `pid` is the number it was read for."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    # after comm: state(3) ppid(4) pgrp(5) session(6) ... flags(9) ... starttime(22), numbered as in proc(5)
    return ProcStat(pid, head.partition("(")[2], fields[0], int(fields[1]), int(fields[2]), int(fields[3]),
                    int(fields[19]), int(fields[6]))


def _read_stat(path: str, pid: int) -> ProcStat | None:
    try:
        with open(path) as f:
            return parse_stat(pid, f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def stat(pid: int) -> ProcStat | None:
    """None when no process has this pid (any more)."""
    return _read_stat(f"/proc/{pid}/stat", pid)


def thread_stats(pid: int) -> list[ProcStat]:
    """Every thread of `pid` (threads that end while being read are left out). Raises ProcessError when the
    process is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessError(f"no such process: {pid}", pid=pid) from None
    found = (_read_stat(f"/proc/{pid}/task/{tid}/stat", int(tid)) for tid in tids)
    return [st for st in found if st is not None]


def all_stats() -> dict[int, ProcStat]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st is not None:
                found[st.pid] = st
    return found


def descendants(root: int, stats: dict[int, ProcStat]) -> list[int]:
    """`root` and every process below it, parents before children."""
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    order, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        order.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return order


def process_name(pid: int) -> str:
    """The process's comm. Raises ProcessError when it is gone."""
    st = stat(pid)
    if st is None:
        raise ProcessError(f"no such process: {pid}", pid=pid)
    return st.comm


def describe(pid: int) -> str:
    """`PID (comm)`, or the bare pid when the process is gone."""
    st = stat(pid)
    return f"{pid} ({st.comm})" if st is not None else str(pid)


def cgroup(pid: int) -> str | None:
    """The process's cgroup v2 path (from /proc/PID/cgroup's `0::` line), None on a host without cgroup v2.
    Raises ProcessError when the process is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except FileNotFoundError:
        raise ProcessError(f"no such process: {pid}", pid=pid) from None
    return None


def netns_inode(pid: int) -> int:
    """The inode of the process's network namespace (equal inodes: the same namespace). Raises OSError."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _hex_addr(text: str, family: int) -> str:
    raw = bytes.fromhex(text)
    # /proc prints the address as host-order 32-bit words
    packed = b"".join(struct.pack("<I", struct.unpack(">I", raw[i : i + 4])[0]) for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, packed)


def tcp_table(pid: int) -> dict[int, tuple[ConnTuple, int]]:
    """socket inode -> (tuple, TCP state) for every TCP socket of the process's network namespace
    (/proc/PID/net/tcp and tcp6)."""
    table: dict[int, tuple[ConnTuple, int]] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, st, inode = fields[1], fields[2], int(fields[3], 16), int(fields[9])
            laddr, lport = local.split(":")
            raddr, rport = remote.split(":")
            table[inode] = (
                ConnTuple(family, _hex_addr(laddr, family), int(lport, 16), _hex_addr(raddr, family), int(rport, 16)),
                st,
            )
    return table


def fd_links(pid: int, skip: Collection[int] = ()) -> dict[int, str]:
    """fd -> link target (socket:[inode], a path, anon_inode:...) of every fd the process holds but those in
    `skip` (whose links are not read), from one listing of /proc/PID/fd. Raises ProcessError (gone, or not
    permitted)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        raise ProcessError(f"no such process: {pid}", pid=pid) from None
    except PermissionError:
        raise _not_permitted(pid) from None
    links = {}
    for name in names:
        fd = int(name)
        if fd in skip:
            continue
        try:
            links[fd] = os.readlink(f"{fd_dir}/{name}")
        except PermissionError:
            # the links are refused where the listing is not (no ptrace access): "no sockets" would be a lie
            raise _not_permitted(pid) from None
        except OSError:
            continue  # closed while we looked
    return links


def _not_permitted(pid: int) -> ProcessError:
    return ProcessError(f"not permitted to read the fds of process {pid} ({refused_advice('run as root')})", pid=pid)


def socket_inodes(pid: int, links: dict[int, str] | None = None) -> dict[int, int]:
    """fd -> socket inode for every socket the process holds (in `links`, fd_links() read by the caller, when
    given). Raises ProcessError (gone, or not permitted)."""
    if links is None:
        links = fd_links(pid)
    return {fd: int(target[8:-1]) for fd, target in links.items() if target.startswith("socket:[")}


def fd_holders(inodes: Collection[int], skip: Collection[int] = ()) -> dict[int, set[int]]:
    """inode -> the pids (beside those in `skip`) that have the socket open, for each of `inodes` some process
    holds, from one look at every /proc/PID/fd (a process or fd gone meanwhile is passed over)."""
    wanted = {f"socket:[{ino}]": ino for ino in inodes}
    skipped = set(map(str, skip))
    found: dict[int, set[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid in skipped:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    ino = wanted.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                    if ino is not None:
                        found.setdefault(ino, set()).add(int(pid))
    return found


def tcp_sockets(pid: int, links: dict[int, str] | None = None) -> list[ProcSocket]:
    """The process's TCP sockets (every state), ordered by fd: those /proc/net/tcp lists, and those in CLOSE that
    still hold their peer (a connection reset, or whose close ended, while the process holds it), which it does not
    list (closed_connections). `links`: the process's fd_links(), when the caller read them. Raises ProcessError."""
    inodes = socket_inodes(pid, links)
    table = tcp_table(pid)
    listed = [ProcSocket(fd, ino, *table[ino]) for fd, ino in sorted(inodes.items()) if ino in table]
    unlisted = {fd: ino for fd, ino in inodes.items() if ino not in table}
    if not unlisted:
        return listed
    return sorted(listed + closed_connections(pid, unlisted), key=lambda s: s.fd)


def closed_connections(pid: int, sockets: dict[int, int]) -> list[ProcSocket]:
    """The TCP sockets among `sockets` (fd -> inode, none of them in /proc/net/tcp) that are in CLOSE with a peer,
    each with whether an error is pending, read through pidfd_getfd copies (the kernel's protocol name,
    system.sockprotoname, picks the TCP ones first).
    Raises ProcessError when the process's fds cannot be taken."""
    found: list[ProcSocket] = []
    pidfd: PidFd | None = None
    try:
        for fd, inode in sorted(sockets.items()):
            try:
                name = os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname").rstrip(b"\0")
            except OSError:
                continue  # closed meanwhile
            if name not in (b"TCP", b"TCPv6"):
                continue
            if pidfd is None:
                pidfd = PidFd(pid)
            try:
                copy = pidfd.getfd(fd)
            except ProcessError:
                if not os.path.lexists(f"/proc/{pid}/fd/{fd}"):
                    continue  # closed meanwhile
                raise
            try:
                conn = closed_tuple(copy)
                poller = select.poll()
                poller.register(copy, select.POLLERR)
                # a socket in CLOSE always shows POLLHUP too
                pending = any(events & select.POLLERR for _, events in poller.poll(0))
            finally:
                os.close(copy)
            if conn is not None:
                found.append(ProcSocket(fd, inode, conn, TCP_CLOSE, pending))
    finally:
        if pidfd is not None:
            pidfd.close()
    return found
