"""The numbers and field lists of the image layout, shared by its construct definition (format.py) and the fast
codec (_codec.py); importing this module imports neither construct nor anything else outside the standard library."""

from __future__ import annotations

from sockrepair.state import TCP_CLOSE, TCP_STATES

MAGIC = b"SKRP"
# Version 2 appends the MORE_SOCKOPTS record after the receive queue; everything before it is version 1's layout.
# Version 3 has version 2's body and two changes: header flag FLAG_CLOSE may announce the CLOSE record (without the
# flag the body is version 2's), and the trailer is an 8-byte XXH3-64 instead of the 4-byte CRC-32, which ran at about
# 4 GB/s here (a quarter of a 1 MiB queue's whole cycle), where XXH3 runs at memory speed.
VERSION = 3
VERSIONS = (1, 2, 3)
# the trailer's size, per version
CHECKSUM_SIZE = {1: 4, 2: 4, 3: 8}
# the version whose trailer is XXH3-64 rather than CRC-32
FIRST_XXH3 = 3
FLAG_WINDOW = 0x0001
# Since version 3: the body ends with the CLOSE record (after version 2's): a connection in CLOSE with a pending
# error or the peer's FIN (ConnectionState.sk_err, .fin_received), written only then.
FLAG_CLOSE = 0x0002
FLAGS_OF_VERSION = {1: FLAG_WINDOW, 2: FLAG_WINDOW, 3: FLAG_WINDOW | FLAG_CLOSE}
CLOSE_STATE = TCP_CLOSE
MAX_ERRNO = 0xFFFF
# Every TCP state but LISTEN: a listening socket has no connection to put in an image.
VALID_TCP_STATES = frozenset(s for s, name in TCP_STATES.items() if name != "LISTEN")
MAX_WSCALE = 14  # TCP_MAX_WSCALE (RFC 7323)
MAX_NAME = 15  # IFNAMSIZ and TCP_CA_NAME_MAX, less the NUL
U32_MAX = 0xFFFFFFFF

SOCKOPT_FLAGS = ("nodelay", "cork", "keepalive", "reuseaddr", "reuseport", "linger_on", "freebind", "v6only")
# Stored as the C int that getsockopt/setsockopt exchange, as the engine reads and applies them: a mark of
# 0xffffffff is -1 here.
SOCKOPT_INTS = (
    "keepidle", "keepintvl", "keepcnt", "sndbuf", "rcvbuf", "priority", "linger_secs", "rcvlowat", "tos", "ttl",
    "mark", "user_timeout", "notsent_lowat",
)  # fmt: skip
WINDOW_FIELDS = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")
# Version 2's trailing record: one flag byte (oobinline is bit 0), then i32s, then i64s (microseconds).
MORE_SOCKOPT_FLAGS = ("oobinline", "thin_linear", "tcp_inq")
MORE_SOCKOPT_INTS = (
    "busy_poll", "max_pacing_rate", "linger2", "window_clamp", "mtu_discover", "rto_max_ms", "rto_min_us",
    "delack_max_us",
)  # fmt: skip
MORE_SOCKOPT_LONGS = ("rcvtimeo_us", "sndtimeo_us")
