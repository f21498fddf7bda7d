"""What a checkpoint holds: typed records for one established TCP connection, independent of any socket."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
TCP_ESTABLISHED = 1


def state_name(state: int) -> str:
    return TCP_STATES.get(state, f"unknown state {state}")


@dataclass(frozen=True, order=True)
class ConnTuple:
    """The 4-tuple of a connection as its own socket sees it (local first). `family` is AF_INET or AF_INET6; an
    AF_INET6 socket talking IPv4 has v4-mapped addresses (::ffff:a.b.c.d)."""

    family: int
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int

    @property
    def local(self) -> tuple[str, int]:
        return (self.local_addr, self.local_port)

    @property
    def remote(self) -> tuple[str, int]:
        return (self.remote_addr, self.remote_port)

    def reversed(self) -> ConnTuple:
        """The same connection as the peer's socket sees it."""
        return ConnTuple(self.family, self.remote_addr, self.remote_port, self.local_addr, self.local_port)

    def wire(self) -> ConnTuple:
        """The tuple as packets carry it: v4-mapped IPv6 addresses become plain IPv4 (what a firewall matches)."""
        if self.family == socket.AF_INET6:
            local = ipaddress.IPv6Address(self.local_addr).ipv4_mapped
            remote = ipaddress.IPv6Address(self.remote_addr).ipv4_mapped
            if local is not None and remote is not None:
                return ConnTuple(socket.AF_INET, str(local), self.local_port, str(remote), self.remote_port)
        return self

    def __str__(self) -> str:
        def fmt(addr: str, port: int) -> str:
            return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

        return f"{fmt(self.local_addr, self.local_port)}->{fmt(self.remote_addr, self.remote_port)}"

    @classmethod
    def parse(cls, text: str) -> ConnTuple:
        """Parse `ADDR:PORT->ADDR:PORT` (IPv6 in brackets), the form str() prints."""
        try:
            left, right = text.split("->")
            (la, lp), (ra, rp) = (_split_hostport(left), _split_hostport(right))
            lip, rip = ipaddress.ip_address(la), ipaddress.ip_address(ra)
        except ValueError as exc:
            raise ValueError(f"not a connection tuple {text!r} (want ADDR:PORT->ADDR:PORT): {exc}") from None
        if lip.version != rip.version:
            raise ValueError(f"mixed address families in {text!r}")
        family = socket.AF_INET if lip.version == 4 else socket.AF_INET6
        for port in (lp, rp):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range in {text!r}")
        return cls(family, str(lip), lp, str(rip), rp)


def _split_hostport(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return host, int(port)


@dataclass
class TcpOptions:
    """Options negotiated at the handshake, which TCP_REPAIR_OPTIONS puts back without one."""

    mss: int
    sack: bool
    timestamps: bool
    wscale: bool
    snd_wscale: int
    rcv_wscale: int


@dataclass
class RepairWindow:
    """struct tcp_repair_window: the window edges the peer already knows about."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int


@dataclass
class SocketOptions:
    """Application-visible socket options of the connection (the last three are ones criu does not keep)."""

    nodelay: bool = False
    cork: bool = False
    keepalive: bool = False
    keepidle: int = 7200
    keepintvl: int = 75
    keepcnt: int = 9
    sndbuf: int = 0
    rcvbuf: int = 0
    reuseaddr: bool = False
    reuseport: bool = False
    priority: int = 0
    mark: int = 0
    linger_on: bool = False
    linger_secs: int = 0
    bindtodevice: str = ""
    rcvlowat: int = 1
    tos: int = 0
    ttl: int = 64
    freebind: bool = False
    v6only: bool = False
    user_timeout: int = 0
    congestion: str = ""
    notsent_lowat: int = 0


@dataclass
class ConnectionState:
    """An established connection frozen in time. Sequence numbers are those at the END of each queue, as
    TCP_QUEUE_SEQ reports them; `send_queue[:len - unsent_len]` was sent and awaits an ACK, the rest never left."""

    tuple: ConnTuple
    tcp_state: int
    send_seq: int
    recv_seq: int
    send_queue: bytes
    unsent_len: int
    recv_queue: bytes
    options: TcpOptions
    window: RepairWindow | None
    timestamp: int
    sockopts: SocketOptions = field(default_factory=SocketOptions)

    @property
    def unacked(self) -> bytes:
        return self.send_queue[: len(self.send_queue) - self.unsent_len]

    @property
    def unsent(self) -> bytes:
        return self.send_queue[len(self.send_queue) - self.unsent_len :]

    def to_bytes(self) -> bytes:
        from sockrepair.image import encode

        return encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> ConnectionState:
        from sockrepair.image import decode

        return decode(data)

    def to_dict(self, payload: bool = False) -> dict[str, Any]:
        """A JSON-ready view. Queue contents are summarised by length and sha256 unless `payload` asks for hex."""
        from sockrepair.image.jsonview import state_to_dict

        return state_to_dict(self, payload=payload)

    def replace(self, **changes: Any) -> ConnectionState:
        return dataclasses.replace(self, **changes)
