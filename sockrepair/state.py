"""What a checkpoint holds: typed records for one established TCP connection, independent of any socket.

Each field names the kernel call it comes from (engine/_checkpoint.py reads them, engine/_restore.py puts them back);
the kernel's names for the values (tp->write_seq, tp->rcv_nxt, tp->rx_opt.mss_clamp...) are those of struct tcp_sock
in include/linux/tcp.h. Sequence numbers are u32 and wrap: compare them modulo 2**32."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from sockrepair.errors import shown

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
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LISTEN = 10


def state_name(state: int) -> str:
    """The kernel's name of a TCP state number (tcpi_state), e.g. 1 -> "ESTABLISHED"; never raises."""
    return TCP_STATES.get(state, f"unknown state {state}")


@dataclass(frozen=True, order=True)
class ConnTuple:
    """The 4-tuple of a connection as its own socket sees it, local first: `local_addr`/`local_port` from
    getsockname(2), `remote_addr`/`remote_port` from getpeername(2). `family` is the socket's AF_INET or AF_INET6;
    addresses are text as socket.inet_ntop spells them; ports are host-order ints 1-65535. An AF_INET6 socket
    talking IPv4 has v4-mapped addresses (::ffff:a.b.c.d); wire() gives the tuple packets carry. Frozen, ordered
    and hashable: usable as a dict key. str() is `ADDR:PORT->ADDR:PORT` (IPv6 in brackets), which parse() reads."""

    family: int
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int

    @property
    def local(self) -> tuple[str, int]:
        """(local_addr, local_port), the form socket.bind() takes."""
        return (self.local_addr, self.local_port)

    @property
    def remote(self) -> tuple[str, int]:
        """(remote_addr, remote_port), the form socket.connect() takes."""
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
        """Parse `ADDR:PORT->ADDR:PORT` (IPv6 in brackets), the form str() prints; raises ValueError (not a
        SockrepairError: this is argument parsing) on anything else, a port outside 1-65535, or mixed families."""
        quoted = shown(text)
        sides = text.split("->")
        if len(sides) != 2:
            raise ValueError(f"not a connection tuple {quoted} (want ADDR:PORT->ADDR:PORT: two ends joined by ->)")
        try:
            (la, lp), (ra, rp) = (_split_hostport(sides[0]), _split_hostport(sides[1]))
            lip, rip = ipaddress.ip_address(la), ipaddress.ip_address(ra)
        except ValueError as exc:
            why = str(exc) if len(str(exc)) <= 160 else str(exc)[:150] + "..."
            raise ValueError(f"not a connection tuple {quoted} (want ADDR:PORT->ADDR:PORT): {why}") from None
        if lip.version != rip.version:
            raise ValueError(f"mixed address families in {quoted}")
        family = socket.AF_INET if lip.version == 4 else socket.AF_INET6
        for port in (lp, rp):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range in {quoted}")
        # as inet_ntop(3) prints them, the form the kernel's addresses take everywhere else: Python 3.11's str() of a
        # v4-mapped address is "::ffff:7f00:1", which compared unequal to the same tuple read from a socket
        return cls(family, socket.inet_ntop(family, lip.packed), lp, socket.inet_ntop(family, rip.packed), rp)


def _split_hostport(text: str) -> tuple[str, int]:
    """`ADDR:PORT` or `[ADDR6]:PORT`: a bare IPv6 address is ambiguous with its port, and a port is 1-5 ASCII digits
    (int() alone would take " 5", "+5", "5_0" and other scripts' digits)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: no ]:PORT after the bracketed address")
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets, [ADDR]:PORT")
    if not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise ValueError(f"{port!r} is not a port number")
    return host, int(port)


@dataclass
class TcpOptions:
    """Options negotiated at the handshake, which restore puts back with TCP_REPAIR_OPTIONS (struct tcp_repair_opt
    entries, accepted only between the repair-mode connect and the first byte sent) since there is no handshake.

    - `mss`: getsockopt(TCP_MAXSEG) read in repair mode, where the kernel returns tp->rx_opt.mss_clamp (the MSS the
      peer announced, capped by a user MSS), in bytes; put back as TCPOPT_MAXSEG, and as the user MSS before
      the repair-mode connect so that the new socket sizes its segments from it.
    - `sack`, `timestamps`, `wscale`: the TCPI_OPT_SACK (2), TCPI_OPT_TIMESTAMPS (1) and TCPI_OPT_WSCALE (4) bits
      of TCP_INFO's tcpi_options, i.e. both ends agreed on SACK, RFC 7323 timestamps, window scaling; put back as
      TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP, TCPOPT_WINDOW.
    - `snd_wscale`: tcpi_snd_wscale (tp->rx_opt.snd_wscale), the shift the PEER's advertised windows are scaled by;
      `rcv_wscale`: tcpi_rcv_wscale (tp->rx_opt.rcv_wscale), the shift of our own advertised windows; each 0-14,
      meaningful only when `wscale` is set; put back as TCPOPT_WINDOW = snd_wscale | rcv_wscale << 16."""

    mss: int
    sack: bool
    timestamps: bool
    wscale: bool
    snd_wscale: int
    rcv_wscale: int


@dataclass
class RepairWindow:
    """struct tcp_repair_window from getsockopt(TCP_REPAIR_WINDOW) (Linux 4.8+), in field order, each a u32: the
    window edges the peer already knows about, so the restored socket neither shrinks a window it advertised nor
    sends beyond the one it was offered. Sequence numbers are absolute (mod 2**32), windows are bytes, already
    scaled.

    - `snd_wl1`: tp->snd_wl1, the sequence number of the segment that last updated our send window;
    - `snd_wnd`: tp->snd_wnd, the window the peer offers us now;
    - `max_window`: tp->max_window, the largest window the peer ever offered;
    - `rcv_wnd`: tp->rcv_wnd, the window we advertised last;
    - `rcv_wup`: tp->rcv_wup, rcv_nxt as it was when we advertised it.

    The kernel refuses (EINVAL) a window with max_window < snd_wnd, snd_wl1 after rcv_nxt + rcv_wnd, or rcv_wup
    after rcv_nxt (net/ipv4/tcp.c tcp_repair_set_window)."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int


@dataclass
class SocketOptions:
    """Application-visible socket options of the connection, read with getsockopt(2) before repair mode (which
    forces the reuse flag) and set again on the restored socket. Integers are the C int the kernel exchanges; the
    defaults are a fresh socket's on a stock host. Level and name of each (IPv6 sockets use the IPv6 name where
    two are given):

    - SOL_SOCKET: `keepalive` SO_KEEPALIVE, `sndbuf`/`rcvbuf` SO_SNDBUF/SO_RCVBUF (bytes, as getsockopt reports
      them: twice what setsockopt was given), `reuseaddr` SO_REUSEADDR, `reuseport` SO_REUSEPORT, `priority`
      SO_PRIORITY, `mark` SO_MARK (a mark of 0xffffffff is -1), `linger_on`/`linger_secs` SO_LINGER (struct linger:
      l_onoff, l_linger in seconds), `bindtodevice` SO_BINDTODEVICE (interface name, "" for none), `rcvlowat`
      SO_RCVLOWAT (bytes);
    - IPPROTO_TCP: `nodelay` TCP_NODELAY, `cork` TCP_CORK, `keepidle` TCP_KEEPIDLE (seconds), `keepintvl`
      TCP_KEEPINTVL (seconds), `keepcnt` TCP_KEEPCNT (probes), `user_timeout` TCP_USER_TIMEOUT (milliseconds, 0 the
      kernel default), `congestion` TCP_CONGESTION (algorithm name), `notsent_lowat` TCP_NOTSENT_LOWAT (bytes, 0
      for the net.ipv4.tcp_notsent_lowat sysctl);
    - IPPROTO_IP / IPPROTO_IPV6: `tos` IP_TOS / IPV6_TCLASS, `ttl` IP_TTL / IPV6_UNICAST_HOPS (hops), `freebind`
      IP_FREEBIND, `v6only` IPV6_V6ONLY (IPv6 only).

    Since image version 2: `rcvtimeo_us` / `sndtimeo_us` SO_RCVTIMEO / SO_SNDTIMEO (struct timeval, as
    microseconds; 0 for none), `oobinline` SO_OOBINLINE, `busy_poll` SO_BUSY_POLL (microseconds),
    `max_pacing_rate` SO_MAX_PACING_RATE (bytes per second as the kernel's u32 view, -1 for unlimited), `linger2`
    TCP_LINGER2 (seconds in FIN_WAIT2), `thin_linear` TCP_THIN_LINEAR_TIMEOUTS, `tcp_inq` TCP_INQ, `window_clamp`
    TCP_WINDOW_CLAMP (bytes; 0 for not recorded), `mtu_discover` IP_MTU_DISCOVER / IPV6_MTU_DISCOVER (-1 for not
    recorded), `rto_max_ms` TCP_RTO_MAX_MS, `rto_min_us` TCP_RTO_MIN_US, `delack_max_us` TCP_DELACK_MAX_US
    (Linux 6.15+; 0 for not recorded or a kernel without them). A version 1 image holds none of them: they read
    as these defaults, which restore leaves alone.

    Which option is carried, refused (and why) or irrelevant (and why) is sockrepair.engine.registry; criu's images
    keep none of the fields its entries mark `criu=False`."""

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
    rcvtimeo_us: int = 0
    sndtimeo_us: int = 0
    oobinline: bool = False
    busy_poll: int = 0
    max_pacing_rate: int = -1
    linger2: int = 0
    thin_linear: bool = False
    tcp_inq: bool = False
    window_clamp: int = 0
    mtu_discover: int = -1
    rto_max_ms: int = 0
    rto_min_us: int = 0
    delack_max_us: int = 0


# A queue's bytes: bytes, or a read-only view of the image they were decoded from (ConnectionState says when).
Payload = bytes | memoryview


@dataclass
class ConnectionState:
    """An established connection frozen in time: what checkpoint() returns and restore() takes. Plain data: it
    holds no socket, compares by value, and to_bytes()/from_bytes() turn it into a connection image and back
    (docs/image-format.md).

    - `tuple`: the ConnTuple (getsockname/getpeername).
    - `tcp_state`: tcpi_state of TCP_INFO, a Linux TCP state number (TCP_STATES; checkpoint takes ESTABLISHED,
      SYN_SENT, the half-closed FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, CLOSING, LAST_ACK, and CLOSE after a
      connection; in SYN_SENT `send_seq` is
      the initial sequence number plus one). In a half-closed state `send_seq` counts
      our FIN once shutdown queued it and `recv_seq` the peer's once it arrived (TCP_QUEUE_SEQ counts a FIN as one
      sequence number, as criu's images keep them); the queues and `unsent_len` hold bytes only.
    - `send_seq`: getsockopt(TCP_QUEUE_SEQ) with TCP_REPAIR_QUEUE = TCP_SEND_QUEUE, which is tp->write_seq: the
      sequence number after the LAST byte of the send queue, never-sent bytes included. It is not snd_nxt:
      snd_una = send_seq - len(send_queue) and snd_nxt = send_seq - unsent_len (mod 2**32; one less when our FIN is
      counted).
    - `recv_seq`: getsockopt(TCP_QUEUE_SEQ) with TCP_REPAIR_QUEUE = TCP_RECV_QUEUE, which is tp->rcv_nxt: the
      sequence number after the last byte received in order; the receive queue starts at recv_seq - len(recv_queue)
      (the application's copied_seq). Restore sets each queue's START (seq - length) on the closed socket, then
      refills it.
    - `send_queue`: the bytes recv(MSG_PEEK) returns in repair mode with the send queue selected, SIOCOUTQ of them:
      first the sent-but-unacknowledged bytes (unacked), then the never-sent ones (unsent).
    - `unsent_len`: ioctl SIOCOUTQNSD (write_seq - snd_nxt), bytes at the end of send_queue that never left; read
      with no repair queue selected (engine/_queues.py says why).
    - `recv_queue`: the bytes recv(MSG_PEEK) returns in repair mode with the receive queue selected, SIOCINQ of
      them: received in order, not yet read by the application. With urgent data pending and SO_OOBINLINE off,
      SIOCINQ stops at the urgent mark while recv_seq is the queue's true end.
      Both queues are `Payload`: bytes, or a read-only memoryview (copying a queue of megabytes would cost as much
      as the rest of the move): of the image's bytes in a state read from an immutable image by from_bytes, of the
      engine's peek buffer in a checkpoint's state when the queue held 64 KiB to 4 MiB (engine/_pool.py: the buffer
      is used again only once no view of it is alive). A view compares, slices, hashes and writes like the bytes
      and pickles (or deep-copies) as bytes; where an API wants bytes itself (`view + b"..."`, `.decode()`), take
      `bytes(state.recv_queue)`.
    - `options`: TcpOptions (TCP_INFO tcpi_options and wscales, TCP_MAXSEG = mss_clamp).
    - `window`: RepairWindow (TCP_REPAIR_WINDOW), None on kernels before 4.8, which lack it.
    - `timestamp`: getsockopt(TCP_TIMESTAMP), the u32 the socket's TSval clock reads now (the kernel's TCP clock
      plus tp->tsoffset), unpacked as unsigned; since Linux 6.7 (microsecond TCP timestamps) its low bit is the
      microsecond-mode flag, so it is stored and set back as is, never taken as a number of milliseconds. Restored
      only when options.timestamps is set.
    - `sockopts`: SocketOptions, read before repair mode.
    - `sk_err`, `fin_received`: in CLOSE only (a connection that was reset or whose close ended while the
      application still holds it), the error the application has still to see (sk_err, an errno read with SO_ERROR;
      0 for none) and whether the peer's FIN had arrived before it (SOCK_DONE: recv then returns b"" where it would
      return the error; False when no error is pending). The send queue of a closed connection is empty: nothing
      in it could ever be sent (engine/_states.py).
    """

    tuple: ConnTuple
    tcp_state: int
    send_seq: int
    recv_seq: int
    send_queue: Payload
    unsent_len: int
    recv_queue: Payload
    options: TcpOptions
    window: RepairWindow | None
    timestamp: int
    sockopts: SocketOptions = field(default_factory=SocketOptions)
    sk_err: int = 0
    fin_received: bool = False

    def __getstate__(self) -> dict[str, Any]:
        # a memoryview does not pickle: its bytes do
        return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in self.__dict__.items()}

    @property
    def unacked(self) -> Payload:
        """The send queue's first len(send_queue) - unsent_len bytes: sent, not yet acknowledged by the peer."""
        return self.send_queue[: len(self.send_queue) - self.unsent_len]

    @property
    def unsent(self) -> Payload:
        """The send queue's last unsent_len bytes: written by the application, never sent."""
        return self.send_queue[len(self.send_queue) - self.unsent_len :]

    def to_bytes(self) -> bytes:
        """The connection image (docs/image-format.md); raises ImageError naming the field (`.field`, e.g.
        "window.snd_wnd") when a value does not fit the format."""
        from sockrepair.image import encode

        return encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> ConnectionState:
        """The state an image holds; raises ImageError with `.offset` (the byte) and `.field` (the record path, e.g.
        "tuple.local_port") on any malformed input."""
        from sockrepair.image import decode

        return decode(data)

    def to_dict(self, payload: bool = False) -> dict[str, Any]:
        """A JSON-ready view. Queue contents are summarised by length and sha256 unless `payload` asks for hex."""
        from sockrepair.image.jsonview import state_to_dict

        return state_to_dict(self, payload=payload)

    def replace(self, **changes: Any) -> ConnectionState:
        """A copy with the given fields changed (dataclasses.replace); raises TypeError for an unknown field."""
        return dataclasses.replace(self, **changes)
