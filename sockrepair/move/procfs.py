"""A process's TCP sockets as /proc shows them: which fd holds which connection, in the process's own namespace."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from sockrepair.errors import ProcessError
from sockrepair.state import ConnTuple, state_name


@dataclass(frozen=True)
class ProcSocket:
    fd: int
    inode: int
    tuple: ConnTuple
    tcp_state: int

    @property
    def state_name(self) -> str:
        return state_name(self.tcp_state)


def _hex_addr(text: str, family: int) -> str:
    raw = bytes.fromhex(text)
    # /proc prints the address as host-order 32-bit words
    packed = b"".join(struct.pack("<I", struct.unpack(">I", raw[i : i + 4])[0]) for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, packed)


def tcp_table(pid: int) -> dict[int, tuple[ConnTuple, int]]:
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


def socket_inodes(pid: int) -> dict[int, int]:
    """fd -> socket inode for every socket the process holds."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        raise ProcessError(f"no such process: {pid}") from None
    except PermissionError:
        raise ProcessError(f"not permitted to read the fds of process {pid} (run as root)") from None
    inodes = {}
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            inodes[int(name)] = int(target[8:-1])
    return inodes


def tcp_sockets(pid: int) -> list[ProcSocket]:
    """The process's TCP sockets (every state), ordered by fd."""
    inodes = socket_inodes(pid)
    table = tcp_table(pid)
    found = [ProcSocket(fd, ino, *table[ino]) for fd, ino in sorted(inodes.items()) if ino in table]
    return found


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        raise ProcessError(f"no such process: {pid}") from None
