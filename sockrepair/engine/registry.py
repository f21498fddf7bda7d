"""Every piece of per-connection state the kernel holds, and what sockrepair does with it: CARRIED (checkpoint reads
it, the image keeps it, restore puts it back; `fields` names where in ConnectionState), REFUSED (checkpoint, and a
process dump before its freeze, refuse a connection that uses it; `reason` says why it cannot be carried) or
IRRELEVANT (`reason` says why losing it changes nothing the application or the peer can see).

The lists walked: the socket options of net/core/sock.c (sk_getsockopt), net/ipv4/ip_sockglue.c, net/ipv6/ipv6_sockglue.c
and net/ipv4/tcp.c (do_tcp_getsockopt), the fields of struct tcp_info, and the attributes of inet_diag
(include/uapi/linux/inet_diag.h). What criu carries (criu/sk-tcp.c, soccr/soccr.c, criu/sockets.c) is marked `criu`:
the checkpoint of `sockrepair criu compare` reads those fields from criu's images; for the others it reports
"not kept". Tests hold this table to SocketOptions (every field carried exactly once), to the engine's reads and
writes (sockrepair/engine/_sockopts.py), and to the refusals (sockrepair/engine/_refuse.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(str, Enum):
    CARRIED = "carried"
    REFUSED = "refused"
    IRRELEVANT = "irrelevant"


@dataclass(frozen=True)
class Entry:
    """`name`: the kernel's name; `level`: SOL_SOCKET, IPPROTO_TCP, IPPROTO_IP, IPPROTO_IPV6 (getsockopt levels), or
    TCP_INFO, sock_diag, ioctl, socket (where else the state shows); `optname`: the option number (None for the
    other levels); `kind`: the value's type; `fields`: the ConnectionState paths of a CARRIED entry; `criu`: criu's
    images hold it too."""

    name: str
    level: str
    optname: int | None
    kind: str
    status: Status
    reason: str
    fields: tuple[str, ...] = ()
    criu: bool = False


C, R, IRR = Status.CARRIED, Status.REFUSED, Status.IRRELEVANT
SOL, TCP, IP, IP6 = "SOL_SOCKET", "IPPROTO_TCP", "IPPROTO_IP", "IPPROTO_IPV6"
AS_READ = "restored as read"
_NOT_A_CONNECTION = "applies to listening sockets or the handshake: a connection that moves is past both"
_DATAGRAM = "ancillary data of datagram sockets: TCP's recvmsg never delivers it"
_STATS = "a statistic: the restored socket counts from zero, as any new socket"
_LEARNED = "an estimate the kernel keeps learning from the traffic: the restored connection learns it again"


def _so(name: str, opt: int, kind: str, *fields: str, criu: bool = True, why: str = AS_READ) -> Entry:
    return Entry(name, SOL, opt, kind, C, why, tuple(f"sockopts.{f}" for f in fields), criu)


def _tcp(name: str, opt: int, kind: str, *fields: str, criu: bool = True, why: str = AS_READ) -> Entry:
    return Entry(name, TCP, opt, kind, C, why, tuple(f"sockopts.{f}" for f in fields), criu)


ENTRIES: tuple[Entry, ...] = (
    # ---- the connection itself: TCP_REPAIR, TCP_INFO, getsockname/getpeername --------------------------------------
    Entry("getsockname/getpeername", "socket", None, "sockaddr", C, "the 4-tuple", ("tuple",), True),
    Entry("tcpi_state", "TCP_INFO", None, "u8", C, "ESTABLISHED, SYN_SENT (the connect runs again from the same "
          "initial sequence number), FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, CLOSING and LAST_ACK (restore replays the "
          "close: engine/_states.py), and CLOSE after a connection (restore re-creates it with the peer's RST); "
          "checkpoint refuses LISTEN, SYN_RECV and a CLOSE socket without a peer by name", ("tcp_state",), True),
    Entry("TCP_QUEUE_SEQ", TCP, 21, "u32", C, "per queue, in repair mode", ("send_seq", "recv_seq"), True),
    Entry("receive queue", "ioctl", 0x541B, "bytes", C, "SIOCINQ bytes, peeked in repair mode", ("recv_queue",),
          True),
    Entry("send queue", "ioctl", 0x5411, "bytes", C, "SIOCOUTQ bytes, peeked in repair mode; SIOCOUTQNSD of them "
          "never sent", ("send_queue", "unsent_len"), True),
    Entry("TCP_MAXSEG", TCP, 2, "int", C, "in repair mode: the MSS clamp; restored with TCP_REPAIR_OPTIONS and as "
          "the clamp of the repair-mode connect", ("options.mss",), True),
    Entry("tcpi_options", "TCP_INFO", None, "bits", C, "SACK, timestamps, window scaling: TCP_REPAIR_OPTIONS",
          ("options.sack", "options.timestamps", "options.wscale"), True),
    Entry("tcpi_snd_wscale/tcpi_rcv_wscale", "TCP_INFO", None, "u4", C, "TCP_REPAIR_OPTIONS TCPOPT_WINDOW",
          ("options.snd_wscale", "options.rcv_wscale"), True),
    Entry("TCP_TIMESTAMP", TCP, 24, "u32", C, "the TSval clock, microsecond flag included", ("timestamp",), True),
    Entry("TCP_REPAIR_WINDOW", TCP, 29, "struct tcp_repair_window", C, "the window edges; snd_wnd, rcv_wnd and "
          "max_window of TCP_INFO follow from it", ("window",), True),
    Entry("tcpi_snd_mss", "TCP_INFO", None, "u32", C, "follows from the MSS clamp and max_window, which restore sets "
          "before the repair-mode connect syncs the MSS (half the largest window the peer offered, as a new "
          "connection bounds it)", ("options.mss", "window.max_window"), True),
    Entry("urgent data (MSG_OOB)", "socket", None, "byte and mark", R, "TCP_REPAIR has no call for the urgent "
          "pointer: the byte and everything after the mark would be lost (SIOCINQ stops at the mark while "
          "TCP_QUEUE_SEQ is the queue's true end), and a sender's urgent byte would leave as plain data; a "
          "sender's urgent pointer is not visible to any call and is not refused"),
    Entry("shutdown(SHUT_RD)", "sock_diag", 8, "u8", R, "INET_DIAG_SHUTDOWN: a receive side shut down in "
          "ESTABLISHED has no repair call; recv would block where it returned 0"),
    Entry("IPPROTO_MPTCP", "socket", 262, "protocol", R, "an MPTCP socket has subflows and a data-level sequence "
          "space that TCP_REPAIR does not reach"),
    # ---- SOL_SOCKET ------------------------------------------------------------------------------------------------
    _so("SO_KEEPALIVE", 9, "bool", "keepalive"),
    _so("SO_SNDBUF", 7, "int", "sndbuf", why="restored at least as large (the queues must fit)"),
    _so("SO_RCVBUF", 8, "int", "rcvbuf", why="restored at least as large (the queues must fit)"),
    _so("SO_REUSEADDR", 2, "bool", "reuseaddr", why="read before repair mode, set after it"),
    _so("SO_REUSEPORT", 15, "bool", "reuseport"),
    _so("SO_PRIORITY", 12, "int", "priority"),
    _so("SO_MARK", 36, "int", "mark", why="set before bind: routing reads it"),
    _so("SO_LINGER", 13, "struct linger", "linger_on", "linger_secs", criu=False),
    _so("SO_BINDTODEVICE", 25, "string", "bindtodevice", why="set before bind"),
    _so("SO_RCVLOWAT", 18, "int", "rcvlowat"),
    _so("SO_RCVTIMEO", 20, "struct timeval", "rcvtimeo_us", criu=False),
    _so("SO_SNDTIMEO", 21, "struct timeval", "sndtimeo_us", criu=False),
    _so("SO_OOBINLINE", 10, "bool", "oobinline", criu=False),
    _so("SO_BUSY_POLL", 46, "int", "busy_poll", criu=False),
    _so("SO_MAX_PACING_RATE", 47, "u32", "max_pacing_rate", criu=False),
    Entry("SO_ATTACH_FILTER/SO_ATTACH_BPF", SOL, 26, "program", R, "a socket filter is code: an eBPF one cannot "
          "be read back at all (SO_GET_FILTER: EACCES)"),
    Entry("SO_DONTROUTE", SOL, 5, "bool", R, "not carried yet: it changes routing, which must hold before bind"),
    Entry("SO_TIMESTAMP/SO_TIMESTAMPNS/SO_TIMESTAMPING", SOL, 29, "flags", R, "not carried yet: TCP receive "
          "timestamps (and SO_TIMESTAMPING's transmit reports and key) would stop without an error"),
    Entry("SO_ZEROCOPY", SOL, 60, "bool", R, "completions of MSG_ZEROCOPY sends arrive on the error queue of the "
          "socket that sent them: pending ones would never arrive"),
    Entry("SO_PEEK_OFF", SOL, 42, "int", R, "not carried yet: a peek offset would restart at the queue's head"),
    Entry("SO_ERROR", SOL, 4, "int", C, "in CLOSE: the error the application has still to see, with whether the "
          "peer's FIN came first (SOCK_DONE), re-created by a reset (ECONNRESET, EPIPE; any other is refused). "
          "Reading it clears it: a resumed socket loses it. In the other states it is not read: an open "
          "connection with a pending error is about to fail anyway", ("sk_err", "fin_received")),
    Entry("SO_TYPE/SO_PROTOCOL/SO_DOMAIN/SO_ACCEPTCONN", SOL, 3, "int", IRR, "fixed by socket(2), which restore "
          "calls with the same family and type"),
    Entry("SO_PEERCRED/SO_PEERSEC/SO_PASSCRED/SO_PASSSEC/SO_PASSPIDFD", SOL, 17, "struct", IRR, "UNIX-socket "
          "credentials: TCP has none (Linux 6.16 refuses SO_PASSCRED on TCP)"),
    Entry("SO_INCOMING_CPU/SO_INCOMING_NAPI_ID", SOL, 49, "int", IRR, "set by the kernel from the packets received"),
    Entry("SO_COOKIE", SOL, 57, "u64", IRR, "the socket's identity, not its state: a new socket gets a new cookie"),
    Entry("SO_BROADCAST/SO_SNDLOWAT/SO_NO_CHECK/SO_TXTIME/SO_RCVMARK/SO_RXQ_OVFL/SO_WIFI_STATUS", SOL, 6, "int",
          IRR, "datagram or packet-socket options: TCP ignores them"),
    Entry("SO_TXREHASH", SOL, 74, "int", IRR, "only whether the flow hash changes on retransmission timeouts; a new "
          "socket follows the host's net.core.txrehash"),
    # ---- IPPROTO_TCP -----------------------------------------------------------------------------------------------
    _tcp("TCP_NODELAY", 1, "bool", "nodelay"),
    _tcp("TCP_CORK", 3, "bool", "cork", criu=False),
    _tcp("TCP_KEEPIDLE", 4, "int", "keepidle"),
    _tcp("TCP_KEEPINTVL", 5, "int", "keepintvl"),
    _tcp("TCP_KEEPCNT", 6, "int", "keepcnt"),
    _tcp("TCP_LINGER2", 8, "int", "linger2", criu=False),
    _tcp("TCP_WINDOW_CLAMP", 10, "int", "window_clamp", criu=False),
    _tcp("TCP_CONGESTION", 13, "string", "congestion", criu=False),
    _tcp("TCP_THIN_LINEAR_TIMEOUTS", 16, "bool", "thin_linear", criu=False),
    _tcp("TCP_USER_TIMEOUT", 18, "int", "user_timeout", criu=False),
    _tcp("TCP_NOTSENT_LOWAT", 25, "int", "notsent_lowat", criu=False,
         why="set once the never-sent bytes are written: it would refuse them"),
    _tcp("TCP_INQ", 36, "bool", "tcp_inq", criu=False),
    _tcp("TCP_RTO_MAX_MS", 44, "int", "rto_max_ms", criu=False, why="restored as read (Linux 6.15+)"),
    _tcp("TCP_RTO_MIN_US", 45, "int", "rto_min_us", criu=False, why="restored as read (Linux 6.15+)"),
    _tcp("TCP_DELACK_MAX_US", 46, "int", "delack_max_us", criu=False, why="restored as read (Linux 6.15+)"),
    Entry("TCP_MD5SIG/TCP_MD5SIG_EXT", TCP, 14, "keys", R, "not carried yet: the keys show only through sock_diag "
          "(INET_DIAG_MD5SIG); restored without them, the peer drops every segment"),
    Entry("TCP_ULP", TCP, 31, "string", R, "kTLS (\"tls\") and other upper-layer protocols keep state (record "
          "sequence numbers, keys) that TCP_REPAIR does not reach"),
    Entry("TCP_AO_INFO/TCP_AO_GET_KEYS/TCP_AO_REPAIR", TCP, 40, "keys", R, "not carried yet: TCP-AO keys and "
          "sequence number extensions"),
    Entry("TCP_TX_DELAY", TCP, 37, "int", R, "not carried yet: a delay the application set for every packet"),
    Entry("TCP_REPAIR/TCP_REPAIR_QUEUE/TCP_REPAIR_OPTIONS", TCP, 19, "int", IRR, "the repair interface itself"),
    Entry("TCP_SYNCNT/TCP_DEFER_ACCEPT/TCP_FASTOPEN/TCP_FASTOPEN_CONNECT/TCP_FASTOPEN_KEY/TCP_FASTOPEN_NO_COOKIE/"
          "TCP_SAVE_SYN/TCP_SAVED_SYN", TCP, 7, "int", IRR, _NOT_A_CONNECTION),
    Entry("TCP_QUICKACK", TCP, 12, "bool", IRR, "a transient mode the kernel leaves by itself after a few ACKs"),
    Entry("TCP_THIN_DUPACK", TCP, 17, "bool", IRR, "accepted and ignored: the kernel dropped the feature (Linux 4.18)"),
    Entry("TCP_CC_INFO", TCP, 26, "struct", IRR, "the congestion control's estimates: " + _LEARNED),
    Entry("TCP_ZEROCOPY_RECEIVE", TCP, 35, "struct", IRR, "an operation on the receive queue, not state"),
    Entry("TCP_IS_MPTCP", TCP, 43, "bool", IRR, "read-only: 0 for every socket checkpoint accepts"),
    Entry("TCP_INFO", TCP, 11, "struct tcp_info", IRR, "the fields not listed here: " + _STATS + ", or " + _LEARNED),
    Entry("tcpi_rtt/tcpi_rttvar/tcpi_rto/tcpi_snd_cwnd/tcpi_snd_ssthresh/tcpi_pacing_rate/tcpi_delivery_rate",
          "TCP_INFO", None, "u32", IRR, _LEARNED),
    Entry("tcpi_options ECN", "TCP_INFO", None, "bit", IRR, "TCP_REPAIR cannot set ECN: the connection goes on "
          "without ECN marks, which RFC 3168 lets either end do"),
    # ---- IPPROTO_IP / IPPROTO_IPV6 ---------------------------------------------------------------------------------
    Entry("IP_TOS/IPV6_TCLASS", IP, 1, "int", C, AS_READ, ("sockopts.tos",), True),
    Entry("IP_TTL/IPV6_UNICAST_HOPS", IP, 2, "int", C, AS_READ, ("sockopts.ttl",), True),
    Entry("IP_FREEBIND", IP, 15, "bool", C, "set before bind", ("sockopts.freebind",), True),
    Entry("IPV6_V6ONLY", IP6, 26, "bool", C, "set before bind", ("sockopts.v6only",), True),
    Entry("IP_MTU_DISCOVER/IPV6_MTU_DISCOVER", IP, 10, "int", C, AS_READ, ("sockopts.mtu_discover",)),
    Entry("IP_OPTIONS/IPV6_HOPOPTS/IPV6_RTHDR/IPV6_DSTOPTS/IPV6_RTHDRDSTOPTS", IP, 4, "bytes", R, "not carried yet: "
          "IP options and IPv6 extension headers on every packet"),
    Entry("IP_TRANSPARENT/IPV6_TRANSPARENT", IP, 19, "bool", R, "not carried yet: a transparent-proxy socket binds "
          "addresses that are not local"),
    Entry("IP_RECVERR/IPV6_RECVERR", IP, 11, "bool", R, "not carried yet: ICMP errors would stop being queued"),
    Entry("IP_MINTTL/IPV6_MINHOPCOUNT", IP, 21, "int", R, "not carried yet: the GTSM check (RFC 5082) would stop"),
    Entry("IP_PKTINFO/IP_RECVTOS/IP_RECVTTL/IP_RECVOPTS/IP_RETOPTS/IPV6_RECVPKTINFO/IPV6_RECVTCLASS", IP, 8, "bool",
          IRR, _DATAGRAM),
    Entry("IP_MULTICAST_*/IPV6_MULTICAST_*/IP_ADD_MEMBERSHIP", IP, 32, "int", IRR, "multicast: TCP has none"),
    Entry("IP_BIND_ADDRESS_NO_PORT/IP_LOCAL_PORT_RANGE", IP, 24, "int", IRR, "used by bind/connect to choose a port: "
          "the port is chosen"),
    Entry("IPV6_FLOWINFO/IPV6_FLOWLABEL_MGR/IPV6_AUTOFLOWLABEL", IP6, 11, "int", IRR, "the flow label is a per-flow "
          "hash the peer must not rely on (RFC 6437); a new socket picks one"),
    # ---- sock_diag attributes not covered above --------------------------------------------------------------------
    Entry("INET_DIAG_MD5SIG", "sock_diag", 18, "keys", R, "TCP_MD5SIG above"),
    Entry("INET_DIAG_ULP_INFO", "sock_diag", 19, "struct", R, "TCP_ULP above"),
    Entry("INET_DIAG_MEMINFO/INET_DIAG_SKMEMINFO", "sock_diag", 7, "struct", IRR, "memory accounting of the queues, "
          "which are carried"),
    Entry("INET_DIAG_CONG/INET_DIAG_TOS/INET_DIAG_TCLASS/INET_DIAG_MARK", "sock_diag", 4, "attr", IRR,
          "TCP_CONGESTION, IP_TOS, IPV6_TCLASS and SO_MARK above"),
    Entry("INET_DIAG_CLASS_ID/INET_DIAG_CGROUP_ID", "sock_diag", 17, "u32", IRR, "taken from the cgroup of the "
          "process that creates the socket, as for any socket that process makes"),
    Entry("INET_DIAG_SOCKOPT", "sock_diag", 22, "bits", IRR, "its bits are the IP options above"),
    Entry("INET_DIAG_SK_BPF_STORAGES", "sock_diag", 20, "maps", IRR, "belongs to the host's BPF programs, which see "
          "the restored socket as a new one"),
)


def carried_sockopts() -> dict[str, Entry]:
    """SocketOptions field -> the CARRIED entry that keeps it."""
    return {f.removeprefix("sockopts."): e for e in ENTRIES if e.status is C for f in e.fields
            if f.startswith("sockopts.")}


def not_in_criu() -> tuple[str, ...]:
    """The SocketOptions fields criu's images have no value for."""
    return tuple(name for name, e in carried_sockopts().items() if not e.criu)


def entry(name: str) -> Entry:
    """The entry called `name`; KeyError when there is none."""
    for e in ENTRIES:
        if e.name == name:
            return e
    raise KeyError(name)
