"""Delivering the packets a lock kept (lock/record.py) to the restored socket, as if the peer had just sent them.

Each packet goes out of a raw IPPROTO_RAW socket (the header is ours: IP_HDRINCL, or IPV6_HDRINCL which Linux
implies for IPPROTO_RAW) in the namespace of the restored socket, marked SOCCR_MARK so that the lock's mark-accept
rules let it through while the connection is still locked; its destination is local, so it loops back and the
kernel hands it to the socket that holds the 4-tuple now. Checksums are computed again first: a copy taken where
the sender offloads them (loopback, veth) may hold only the pseudo-header's partial sum (CHECKSUM_PARTIAL)."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from sockrepair.errors import LockError
from sockrepair.lock.ruleset import SOCCR_MARK
from sockrepair.netns import named
from sockrepair.packet import with_checksums

_IPV6_HDRINCL = 36  # linux/in6.h


class Injector:
    """Raw sockets in `netns` (a name from `ip netns list`, or None for this thread's namespace) that send kept
    packets, marked SOCCR_MARK, one per address family in `families` (a packet of another family raises
    LockError). Use as a context manager, or close()."""

    def __init__(self, netns: str | None = None,
                 families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)) -> None:
        self._socks: dict[int, socket.socket] = {}
        with named(netns):
            for family in families:
                sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
                self._socks[family] = sock
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCCR_MARK)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_HDRINCL, 1)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_segment(self, segment: bytes, family: int, dest: str) -> None:
        """Send one packet of `family` whose checksums are right already (packet.tcp_segment) to `dest`, its
        destination address as the socket module spells it. Raises LockError when no raw socket of `family` is open
        or the kernel refuses the packet."""
        sock = self._socks.get(family)
        if sock is None:
            raise LockError(f"cannot send a segment to {dest}: no raw socket of its address family")
        try:
            sock.sendto(segment, (dest, 0))
        except OSError as exc:
            raise LockError(f"cannot send a segment to {dest}: {exc.strerror}") from None

    def send(self, packets: Iterable[bytes]) -> int:
        """Send each packet in order, checksums made right; returns how many went out. Raises LockError naming the
        packet when the kernel refuses one (the rest are not sent: order matters to the receiver)."""
        sent = 0
        # the destinations as sendto() takes them, made once per address: a move delivers thousands of packets to
        # a handful of local addresses, inside the downtime
        dests: dict[bytes, tuple[socket.socket | None, tuple[str, int]]] = {}
        for packet in packets:
            try:
                fixed = with_checksums(packet)
            except ValueError as exc:
                raise LockError(f"cannot deliver kept packet {sent + 1}: {exc}") from None
            raw = fixed[16:20] if fixed[0] >> 4 == 4 else fixed[24:40]
            target = dests.get(raw)
            if target is None:
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                target = dests[raw] = (self._socks.get(family), (socket.inet_ntop(family, raw), 0))
            sock, dest = target
            if sock is None:
                raise LockError(f"cannot deliver kept packet {sent + 1}: no raw socket of its address family")
            try:
                sock.sendto(fixed, dest)
            except OSError as exc:
                raise LockError(f"cannot deliver kept packet {sent + 1} to {dest[0]}: {exc.strerror}") from None
            sent += 1
        return sent
