"""Application-visible socket options: read from the old socket, put back on the new one at the right moment.

Options that steer routing or binding must be on the socket before bind/connect; SO_REUSEADDR only after repair is
off, because leaving repair mode resets the socket's reuse flag."""

from __future__ import annotations

import errno
import operator
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from operator import truth
from typing import Any, NamedTuple

from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._session import _Session, setsockopt
from sockrepair.errors import SocketCallError
from sockrepair.state import SocketOptions

TCP, SOL, IP, IPV6 = lib.IPPROTO_TCP, lib.SOL_SOCKET, lib.IPPROTO_IP, lib.IPPROTO_IPV6
SO_PRIORITY = lib.SO_PRIORITY
AF_INET6 = socket.AF_INET6
IFNAMSIZ = 16  # TCP_CA_NAME_MAX is 16 as well: one buffer reads both names
# SO_RCVTIMEO / SO_SNDTIMEO: (SocketOptions field, option, name)
TIMEOUTS = (("rcvtimeo_us", lib.SO_RCVTIMEO_OLD, "SO_RCVTIMEO"), ("sndtimeo_us", lib.SO_SNDTIMEO_OLD, "SO_SNDTIMEO"))


@dataclass(frozen=True)
class IntOpt:
    """An int-valued option. `fresh` is the value every new socket has whatever the host's settings, when there is
    one: restore skips setting an option to it."""

    field: str
    level: int
    opt: int
    name: str
    fresh: int | None = None


GENERIC_INT_OPTS = [
    IntOpt("nodelay", TCP, lib.TCP_NODELAY, "TCP_NODELAY", fresh=0),
    IntOpt("keepalive", SOL, lib.SO_KEEPALIVE, "SO_KEEPALIVE", fresh=0),
    # the keepalive timing, unless set, follows the host's sysctls: restored as read, so it does not change hosts
    IntOpt("keepidle", TCP, lib.TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    IntOpt("keepintvl", TCP, lib.TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    IntOpt("keepcnt", TCP, lib.TCP_KEEPCNT, "TCP_KEEPCNT"),
    IntOpt("reuseport", SOL, lib.SO_REUSEPORT, "SO_REUSEPORT", fresh=0),
    # setting IP_TOS changes the priority too: apply_in_repair sets the priority after a TOS it set, even to 0
    IntOpt("priority", SOL, lib.SO_PRIORITY, "SO_PRIORITY", fresh=0),
    IntOpt("rcvlowat", SOL, lib.SO_RCVLOWAT, "SO_RCVLOWAT", fresh=1),
    IntOpt("user_timeout", TCP, lib.TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT", fresh=0),
    IntOpt("cork", TCP, lib.TCP_CORK, "TCP_CORK", fresh=0),
    IntOpt("oobinline", SOL, lib.SO_OOBINLINE, "SO_OOBINLINE", fresh=0),
    IntOpt("busy_poll", SOL, lib.SO_BUSY_POLL, "SO_BUSY_POLL", fresh=0),
    # the kernel's u32 view of an unsigned long: ~0U (unlimited) reads as -1
    IntOpt("max_pacing_rate", SOL, lib.SO_MAX_PACING_RATE, "SO_MAX_PACING_RATE", fresh=-1),
    # reads the net.ipv4.tcp_fin_timeout sysctl when unset: restored as read, like the keepalive timing
    IntOpt("linger2", TCP, lib.TCP_LINGER2, "TCP_LINGER2", fresh=0),
    IntOpt("thin_linear", TCP, lib.TCP_THIN_LINEAR_TIMEOUTS, "TCP_THIN_LINEAR_TIMEOUTS", fresh=0),
    IntOpt("tcp_inq", TCP, lib.TCP_INQ, "TCP_INQ", fresh=0),
    # tp->window_clamp, never 0 on a connected socket; 0 (a version 1 image) leaves the new socket's own
    IntOpt("window_clamp", TCP, lib.TCP_WINDOW_CLAMP, "TCP_WINDOW_CLAMP", fresh=0),
]
# Linux 6.15+: on older kernels they read as 0 (ENOPROTOOPT), which restore leaves alone. Their values on a new
# socket follow sysctls and routes: restored as read.
OPTIONAL_INT_OPTS = [
    IntOpt("rto_max_ms", TCP, lib.TCP_RTO_MAX_MS, "TCP_RTO_MAX_MS", fresh=0),
    IntOpt("rto_min_us", TCP, lib.TCP_RTO_MIN_US, "TCP_RTO_MIN_US", fresh=0),
    IntOpt("delack_max_us", TCP, lib.TCP_DELACK_MAX_US, "TCP_DELACK_MAX_US", fresh=0),
]
# Set only once the never-sent bytes are written (after_repair): the limit would refuse them (EAGAIN).
NOTSENT_LOWAT = IntOpt("notsent_lowat", TCP, lib.TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT", fresh=0)
# What TCP_NOTSENT_LOWAT is raised to while restore writes the never-sent bytes: no limit at all.
NO_NOTSENT_LIMIT = 0x7FFFFFFF
# The TTL of a socket that never set one follows the host's sysctl: restored as read, like the keepalive timing.
INT_OPTS: dict[int, list[IntOpt]] = {
    socket.AF_INET: [
        IntOpt("tos", IP, lib.IP_TOS, "IP_TOS", fresh=0),
        IntOpt("ttl", IP, lib.IP_TTL, "IP_TTL"),
        IntOpt("mtu_discover", IP, lib.IP_MTU_DISCOVER, "IP_MTU_DISCOVER", fresh=-1),
        *GENERIC_INT_OPTS,
    ],
    socket.AF_INET6: [
        IntOpt("tos", IPV6, lib.IPV6_TCLASS, "IPV6_TCLASS", fresh=0),
        IntOpt("ttl", IPV6, lib.IPV6_UNICAST_HOPS, "IPV6_UNICAST_HOPS"),
        IntOpt("mtu_discover", IPV6, lib.IPV6_MTU_DISCOVER, "IPV6_MTU_DISCOVER", fresh=-1),
        *GENERIC_INT_OPTS,
    ],
}
# Route and bind decisions read these, so they go on before bind() and connect().
PRE_BIND_INT_OPTS = [
    IntOpt("mark", SOL, lib.SO_MARK, "SO_MARK"),
    IntOpt("freebind", IP, lib.IP_FREEBIND, "IP_FREEBIND"),
]
V6ONLY = IntOpt("v6only", IPV6, lib.IPV6_V6ONLY, "IPV6_V6ONLY")
BOOL_FIELDS = {f.name for f in fields(SocketOptions) if f.type in ("bool", bool)}
_BUFFER_OPTS = [
    IntOpt("reuseaddr", SOL, lib.SO_REUSEADDR, "SO_REUSEADDR"),
    IntOpt("sndbuf", SOL, lib.SO_SNDBUF, "SO_SNDBUF"),
    IntOpt("rcvbuf", SOL, lib.SO_RCVBUF, "SO_RCVBUF"),
]
# SocketOptions is built positionally (keywords cost about 3 us): each field's position
SOCKOPT_POSITION = {f.name: i for i, f in enumerate(fields(SocketOptions))}
# What read_sockopts reads, per family: (field, level, option, name, a bool field, its position)
_READS = {
    family: [
        (o.field, o.level, o.opt, o.name, o.field in BOOL_FIELDS, SOCKOPT_POSITION[o.field])
        for o in opts + PRE_BIND_INT_OPTS + ([V6ONLY] if family == AF_INET6 else []) + _BUFFER_OPTS + [NOTSENT_LOWAT]
    ]
    for family, opts in INT_OPTS.items()
}
_OPTIONAL_LEVELS = tuple(o.level for o in OPTIONAL_INT_OPTS)
_OPTIONAL_OPTS = tuple(o.opt for o in OPTIONAL_INT_OPTS)
_LINGER = struct.Struct("ii")
_TIMEVAL = struct.Struct("ll")
# The options whose value is a struct or a name: (field, level, option, name, buffer size); those after the first
# three are the ones a sock_diag answer shows too
_STRUCT_READS = [("linger", SOL, lib.SO_LINGER, "SO_LINGER", _LINGER.size),
                 *((field, SOL, opt, name, _TIMEVAL.size) for field, opt, name in TIMEOUTS),
                 ("bindtodevice", SOL, lib.SO_BINDTODEVICE, "SO_BINDTODEVICE", IFNAMSIZ),
                 ("congestion", TCP, lib.TCP_CONGESTION, "TCP_CONGESTION", IFNAMSIZ)]
# The fields a sock_diag answer shows as getsockopt does (engine/_diag.py SockView; engine/_checkpoint.py
# dumped_sockopts says how), in the order sockopts_of() takes their values: a checkpoint in repair mode takes them
# from its sock_diag round trip
DUMPED = ("tos", "mark", "freebind", "sndbuf", "rcvbuf", "congestion", "bindtodevice", "priority", "max_pacing_rate")


class ReadPlan(NamedTuple):
    """What read_plain() reads for one family, each group in one map() over the socket method (no bytecode runs per
    option): the bool options, the int options, Linux 6.15's optional ones, then the struct and name options
    (`struct_levels`, `struct_opts`, `struct_sizes`). read_plain() lists their values in that order, SO_LINGER's
    and the timeouts' decoded; `order` picks the SocketOptions fields from that list followed by the DUMPED values
    (when `dumped`) and `constants` (the defaults of fields the family has not: v6only for IPv4). `reads`: (level,
    option, name, buffer size or 0) of each read, in order, for naming the one that failed; `reuseaddr_at`: where
    SO_REUSEADDR is in read_plain()'s list."""

    bool_levels: tuple[int, ...]
    bool_opts: tuple[int, ...]
    int_levels: tuple[int, ...]
    int_opts: tuple[int, ...]
    struct_levels: tuple[int, ...]
    struct_opts: tuple[int, ...]
    struct_sizes: tuple[int, ...]
    dumped: bool
    constants: tuple[object, ...]
    order: Callable[[list[object]], tuple[object, ...]]
    reads: tuple[tuple[int, int, str, int], ...]
    reuseaddr_at: int


def _plan(family: int, dumped: bool) -> ReadPlan:
    skip = set(DUMPED) if dumped else set()
    ints = [r for r in _READS[family] if r[0] not in skip]
    bools = [r for r in ints if r[4]]
    ints = [r for r in ints if not r[4]]
    structs = [r for r in _STRUCT_READS if r[0] not in skip]
    listed = ([r[0] for r in bools] + [r[0] for r in ints] + [o.field for o in OPTIONAL_INT_OPTS]
              + ["linger_on", "linger_secs", *(field for field, _, _ in TIMEOUTS)]
              + [r[0] for r in structs[3:]] + (list(DUMPED) if dumped else []))
    defaults = SocketOptions()
    missing = [name for name in SOCKOPT_POSITION if name not in listed]
    listed += missing
    return ReadPlan(
        tuple(r[1] for r in bools), tuple(r[2] for r in bools), tuple(r[1] for r in ints), tuple(r[2] for r in ints),
        tuple(r[1] for r in structs), tuple(r[2] for r in structs), tuple(r[4] for r in structs), dumped,
        tuple(getattr(defaults, name) for name in missing),
        operator.itemgetter(*(listed.index(name) for name in SOCKOPT_POSITION)),
        tuple((r[1], r[2], r[3], 0) for r in bools + ints) + tuple((r[1], r[2], r[3], r[4]) for r in structs),
        listed.index("reuseaddr"),
    )


# per family: the plan that reads every option, and the one that leaves the DUMPED ones to a sock_diag answer
PLANS = {family: _plan(family, False) for family in INT_OPTS}
DUMPED_PLANS = {family: _plan(family, True) for family in INT_OPTS}
# What apply_in_repair sets, per family, in its order: (field, level, option, name, the value a new socket has or
# None, whether it is SO_PRIORITY). The fields are the same for both families.
_WRITES = {
    family: [(o.field, o.level, o.opt, o.name, o.fresh, o.level == SOL and o.opt == SO_PRIORITY)
             for o in opts + OPTIONAL_INT_OPTS]
    for family, opts in INT_OPTS.items()
}
# Every field apply_in_repair looks at, in one call: _WRITES' fields, then these.
_LAST_WRITTEN = ("tos", "linger_on", "linger_secs", *(field for field, _, _ in TIMEOUTS), "congestion")
_WRITTEN_VALUES = operator.attrgetter(*(w[0] for w in _WRITES[socket.AF_INET]), *_LAST_WRITTEN)
# Options whose value on a new socket is a copy made when the socket is created (of a sysctl of its network
# namespace, or a constant) that nothing changes later, and whose setsockopt writes that one field and nothing else:
# set to the value a new socket has, or never set, the socket is the same, and reads back the same.
#   IP_MTU_DISCOVER: inet->pmtudisc, from net.ipv4.ip_no_pmtu_disc in inet_create (net/ipv4/af_inet.c);
#   IPV6_MTU_DISCOVER: np->pmtudisc, IPV6_PMTUDISC_WANT in inet6_create (net/ipv6/af_inet6.c);
#   TCP_RTO_MAX_MS, TCP_RTO_MIN_US: icsk_rto_max, icsk_rto_min, from net.ipv4.tcp_rto_max_ms and tcp_rto_min_us,
#   and TCP_DELACK_MAX_US: icsk_delack_max, TCP_DELACK_MAX, all in tcp_init_sock (net/ipv4/tcp.c); they read back
#   through jiffies_to_msecs / jiffies_to_usecs, one value per jiffy, so equal reads are equal fields.
# Not here, although a new socket reads the same as most saved ones: IP_TTL / IPV6_UNICAST_HOPS, TCP_KEEPIDLE,
# TCP_KEEPINTVL, TCP_KEEPCNT and TCP_LINGER2 read the sysctl while never set (uc_ttl -1, keepalive_time 0...): a
# socket that never set them follows a later change of the sysctl (or the route's hop limit), one that set them
# does not, so setting them is not the same as leaving them. TCP_CONGESTION: a route's congctl may replace the
# algorithm at connect (tcp_ca_dst_init), and a new socket, never connected, shows only the namespace's default.
# TCP_WINDOW_CLAMP: the connect computes it (tcp_select_initial_window); a new socket reads 0.
FRESH_COPIES = ("mtu_discover", "rto_max_ms", "rto_min_us", "delack_max_us")
# What apply_in_repair remembers of the calls it made for saved values (engine restores of one program share most
# of their values); emptied when it holds this many.
PLAN_CACHE = 256


def read_sockopts(session: _Session, family: int) -> SocketOptions:
    """Must run before repair mode is switched on: repair mode forces the reuse flag, which SO_REUSEADDR reports."""
    plan = PLANS[family]
    return sockopts_of(plan, read_plain(session, plan))


def read_plain(session: _Session, plan: ReadPlan) -> list[object]:
    """The values of the options `plan` reads (ReadPlan says in which order), before repair mode. Raises
    SocketCallError naming the option whose getsockopt failed."""
    getsockopt = session.sock.getsockopt
    try:
        values: list[object] = list(map(truth, map(getsockopt, plan.bool_levels, plan.bool_opts)))
        values += map(getsockopt, plan.int_levels, plan.int_opts)
        linger, rcvtimeo, sndtimeo, *names = map(getsockopt, plan.struct_levels, plan.struct_opts,
                                                 plan.struct_sizes)
    except OSError as exc:
        raise _failed_read(session, plan, exc) from None
    if _Kernel.optional:
        try:
            values += tuple(map(getsockopt, _OPTIONAL_LEVELS, _OPTIONAL_OPTS))
        except OSError:
            values += _optional_reads(session)
    else:
        values += (0,) * len(_OPTIONAL_OPTS)
    linger_on, linger_secs = _LINGER.unpack(linger)
    rcv_secs, rcv_usecs = _TIMEVAL.unpack(rcvtimeo)
    snd_secs, snd_usecs = _TIMEVAL.unpack(sndtimeo)
    values += (linger_on != 0, linger_secs, rcv_secs * 1_000_000 + rcv_usecs, snd_secs * 1_000_000 + snd_usecs)
    if names:
        values += map(decode_name, names)
    return values


def sockopts_of(plan: ReadPlan, values: list[object], dumped: Sequence[object] = ()) -> SocketOptions:
    """SocketOptions from read_plain()'s `values` (which this extends) and, for a plan that leaves the DUMPED
    fields out, their `dumped` values in DUMPED's order."""
    values += dumped
    values += plan.constants
    return SocketOptions(*plan.order(values))  # type: ignore[arg-type]


class _Kernel:
    # ENOPROTOOPT for an optional option (Linux before 6.15): not asked again this boot, read as 0
    optional = True


def _optional_reads(session: _Session) -> tuple[int, ...]:
    """The optional options one by one: 0 for those this kernel lacks (ENOPROTOOPT)."""
    getsockopt = session.sock.getsockopt
    values = []
    absent = 0
    for o in OPTIONAL_INT_OPTS:
        try:
            values.append(getsockopt(o.level, o.opt))
        except OSError as exc:
            if exc.errno != errno.ENOPROTOOPT:
                raise session.failed(f"getsockopt({o.name})", exc) from None
            values.append(0)
            absent += 1
    if absent == len(values):
        _Kernel.optional = False
    return tuple(values)


def _failed_read(session: _Session, plan: ReadPlan, first: OSError) -> SocketCallError:
    """The error of the read that failed in a group: the reads again one by one, up to the first that fails."""
    getsockopt = session.sock.getsockopt
    for level, opt, name, size in plan.reads:
        try:
            getsockopt(level, opt, size) if size else getsockopt(level, opt)
        except OSError as exc:
            return session.failed(f"getsockopt({name})", exc)
    return session.failed("getsockopt(the socket options)", first)


def decode_name(raw: bytes) -> str:
    """A NUL-terminated name as getsockopt gives it (IFNAMSIZ, TCP_CA_NAME_MAX)."""
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def apply_pre_bind(session: _Session, family: int, so: SocketOptions) -> None:
    for o in PRE_BIND_INT_OPTS:
        value = int(getattr(so, o.field))
        if value:
            session.set(o.level, o.opt, value, o.name)
    if family == AF_INET6:
        session.set(IPV6, lib.IPV6_V6ONLY, int(so.v6only), "IPV6_V6ONLY")
    if so.bindtodevice:
        session.set_bytes(SOL, lib.SO_BINDTODEVICE, so.bindtodevice.encode(), "SO_BINDTODEVICE")


def size_buffers(session: _Session, so: SocketOptions, send_bytes: int, recv_bytes: int) -> None:
    """Give the new socket room for its queues. The kernel charges roughly twice the payload (skb overhead), and
    getsockopt reports the doubled figure that setsockopt will double again, hence the halving."""
    sndbuf = max(so.sndbuf, 2 * send_bytes + (64 << 10))
    rcvbuf = max(so.rcvbuf, 2 * recv_bytes + (64 << 10))
    session.set(SOL, lib.SO_SNDBUFFORCE, sndbuf // 2, "SO_SNDBUFFORCE")
    session.set(SOL, lib.SO_RCVBUFFORCE, rcvbuf // 2, "SO_RCVBUFFORCE")


# What apply_in_repair does for one set of saved values: (level, option, int value, the call as an error names it)
# of the int options, then (level, option, struct) of those that take a struct or a name, in order.
_ApplyPlan = tuple[tuple[tuple[int, int, int, str], ...], tuple[tuple[int, int, bytes, str], ...]]


class FreshValues:
    """What a new TCP socket of each family reports, in one network namespace at one moment, for FRESH_COPIES: a
    restore given it (restore_with's `fresh`) does not set those whose saved value it holds. Read once per batch
    and namespace (fresh_values()), never kept longer: the sysctls they come from may change between moves. Should
    one change during the batch, the sockets made after it hold the new value: the batch asks unchanged() at its
    end, and sets them all again (set_fresh_copies) when it says no."""

    __slots__ = ("plans", "values")

    def __init__(self, values: dict[int, dict[str, int]]) -> None:
        """`values`: per address family, FRESH_COPIES' fields as a new socket of it reads them."""
        self.values = values
        # apply_in_repair's calls for the saved values it met, with these values: this batch's only
        self.plans: dict[tuple[object, ...], _ApplyPlan] = {}

    def unchanged(self) -> bool:
        """Whether a new socket of each family still reports these values (read again, in this thread's network
        namespace); False when they cannot be read again (fresh_values' OSError): the caller sets them all."""
        try:
            return fresh_values(tuple(self.values)).values == self.values
        except OSError:
            return False


def fresh_values(families: tuple[int, ...] = (socket.AF_INET, AF_INET6)) -> FreshValues:
    """FreshValues read from a new TCP socket of each of `families` in this thread's network namespace (one
    socket and four getsockopt each; an option the kernel does not know (ENOPROTOOPT, before Linux 6.15) reads 0,
    as checkpoint reads it). A family the kernel has no sockets of (EAFNOSUPPORT: IPv6 disabled) is left out: no
    socket of it is restored there either. Raises OSError when a socket cannot be made or read otherwise."""
    values: dict[int, dict[str, int]] = {}
    for family in families:
        by_field = {w[0]: w for w in _WRITES[family]}
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno != errno.EAFNOSUPPORT:
                raise
            continue
        with sock:
            read: dict[str, int] = {}
            for field in FRESH_COPIES:
                _, level, opt, _, _, _ = by_field[field]
                try:
                    read[field] = sock.getsockopt(level, opt)
                except OSError as exc:
                    if exc.errno != errno.ENOPROTOOPT:
                        raise
                    read[field] = 0
        values[family] = read
    return FreshValues(values)


# A batch reads the fresh values twice (before its first restore, and after its last: FreshValues.unchanged), each
# time a new socket and four getsockopt per family, about 15 us per family here; they spare four setsockopt per
# connection, about 2.5 us. Below this many connections they cost more than they spare.
FRESH_WORTH = 16


def batch_fresh_values(families: Iterable[int], count: int) -> FreshValues | None:
    """fresh_values() of `families` for a batch of `count` restores in this thread's network namespace; None where
    reading them costs more than it spares (fewer than FRESH_WORTH) or they cannot be read (OSError: every option
    is set then)."""
    if count < FRESH_WORTH:
        return None
    try:
        return fresh_values(tuple(sorted(set(families))))
    except OSError:
        return None


def _apply_plan(family: int, values: tuple[Any, ...], fresh: dict[str, int] | None) -> _ApplyPlan:
    """The calls apply_in_repair makes for the saved `values` (_WRITTEN_VALUES' fields) on a socket of `family`.
    An option whose saved value is the one every new socket starts with (IntOpt.fresh; 0 for one this kernel may
    not have), or, with `fresh`, the one a new socket of this namespace holds (FRESH_COPIES), is left alone: it
    reads back the same."""
    writes = _WRITES[family]
    tos, linger_on, linger_secs, *timeouts, congestion = values[len(writes):]
    ints: list[tuple[int, int, int, str]] = []
    for (field, level, opt, name, new, priority), value in zip(writes, values):
        # a bool field compares equal to its int (False == 0)
        if value == new and not (priority and tos):
            continue
        if fresh is not None and field in fresh and value == fresh[field]:
            continue
        ints.append((level, opt, int(value), f"setsockopt({name}={int(value)})"))
    structs: list[tuple[int, int, bytes, str]] = []
    if linger_on or linger_secs:
        structs.append((SOL, lib.SO_LINGER, _LINGER.pack(int(linger_on), linger_secs), "setsockopt(SO_LINGER)"))
    for (_, opt, name), usecs in zip(TIMEOUTS, timeouts):
        if usecs:
            structs.append((SOL, opt, _TIMEVAL.pack(*divmod(usecs, 1_000_000)), f"setsockopt({name}={usecs} us)"))
    if congestion:
        algorithm = congestion.encode()
        structs.append((TCP, lib.TCP_CONGESTION, algorithm, f"setsockopt(TCP_CONGESTION={algorithm!r})"))
    return tuple(ints), tuple(structs)


_APPLY_PLANS: dict[tuple[object, ...], _ApplyPlan] = {}


def apply_in_repair(session: _Session, family: int, so: SocketOptions, fresh: FreshValues | None = None) -> None:
    """Everything but the reuse flag, while still in repair mode: cork and nodelay must hold before the never-sent
    bytes are written. An option whose saved value the new socket holds already is left alone (_apply_plan): it reads
    back the same, and a restore makes a dozen calls fewer. `fresh`: what a new socket of this namespace holds
    now (FreshValues). The calls for a set of saved values are worked out once (per `fresh`). A struct or a name
    goes through cffi: the socket method tries it as an int and as None first, formatting an error each time."""
    values = _WRITTEN_VALUES(so)
    key = (family, values)
    plans = _APPLY_PLANS if fresh is None else fresh.plans
    plan = plans.get(key)
    if plan is None:
        plan = _apply_plan(family, values, None if fresh is None else fresh.values.get(family))
        if len(plans) >= PLAN_CACHE:
            plans.clear()
        plans[key] = plan
    ints, structs = plan
    set_int = session.sock.setsockopt
    # a try costs nothing until it catches (Python 3.11)
    for level, opt, value, op in ints:
        try:
            set_int(level, opt, value)
        except OSError as exc:
            raise session.failed(op, exc) from None
    fd = session.fd
    for level, opt, raw, op in structs:
        if setsockopt(fd, level, opt, raw, len(raw)) < 0:
            err = ffi.errno
            if opt == lib.TCP_CONGESTION and level == TCP and err == errno.ENOENT:
                raise session.fail(
                    f"setsockopt(TCP_CONGESTION={so.congestion!r}): congestion control {so.congestion!r} is not "
                    f"available on this host (modprobe tcp_{so.congestion})", err
                )
            raise session.fail(op, err)


def set_fresh_copies(session: _Session, family: int, so: SocketOptions) -> None:
    """Set FRESH_COPIES to their saved values on a restored socket of `family`, repair mode on or off (each is a
    field the kernel reads when it needs it), but an optional one the saved state does not hold (0). For the
    sockets of a batch during which a new socket's values changed (FreshValues.unchanged)."""
    set_int = session.sock.setsockopt
    for field, level, opt, name, new, _ in _WRITES[family]:
        value = getattr(so, field)
        if field in FRESH_COPIES and not (value == 0 and new == 0):
            try:
                set_int(level, opt, value)
            except OSError as exc:
                raise session.failed(f"setsockopt({name}={value})", exc) from None


def lift_send_limit(session: _Session) -> None:
    """Before the never-sent bytes are written: TCP_NOTSENT_LOWAT (the saved value, or the
    net.ipv4.tcp_notsent_lowat sysctl when the socket has none) bounds how many never-sent bytes a send accepts, and
    restore must write them all (a peer that stopped reading leaves them all never sent)."""
    session.set(TCP, NOTSENT_LOWAT.opt, NO_NOTSENT_LIMIT, NOTSENT_LOWAT.name)


def apply_after_repair(session: _Session, so: SocketOptions, lifted: bool) -> None:
    """Leaving repair mode cleared the reuse flag, so only a set one needs putting back; TCP_NOTSENT_LOWAT goes to
    the saved value (0: the sysctl), once lift_send_limit let the never-sent bytes in when it was `lifted`; a new
    socket has 0 already."""
    if lifted or so.notsent_lowat != NOTSENT_LOWAT.fresh:
        session.set(TCP, NOTSENT_LOWAT.opt, so.notsent_lowat, NOTSENT_LOWAT.name)
    if so.reuseaddr:
        session.set(SOL, lib.SO_REUSEADDR, 1, "SO_REUSEADDR")
