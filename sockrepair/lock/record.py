"""Keeping what the lock stops: the packets a peer sends to a locked connection, copied whole by the lock to the
nfnetlink_log group of the mover that locked it (the element's `jump keep_G`, lock/ruleset.py), read here in the
namespace of the lock.

A Recorder binds the group when it is made and reads the copies when asked (`drain`): the kernel queues them in the
socket's receive buffer meanwhile, so no thread is needed. The packets themselves are dropped by the rule whatever
happens here: a recorder that dies, falls behind or hits its cap loses copies, never lets a packet through, and the
peer then resends after its retransmission timeout as it would under a plain dropping lock. Copies that were lost
are counted (`Held.lost`): nfnetlink_log numbers its messages (NFULA_SEQ), and a full socket buffer is reported by
the kernel (ENOBUFS).

Only one socket in a network namespace can bind a group (the kernel answers EPERM to the others): a Recorder binds the
first free one from NFLOG_GROUP on (Recorder.group), and its mover locks its connections with that group, so that
several movers record in one namespace at once, each receiving only its own peers' packets."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from sockrepair.errors import LockError, NftError
from sockrepair.lock import nfconst as c
from sockrepair.lock.netlink import attr
from sockrepair.lock.ruleset import NFLOG_GROUP, NFLOG_GROUPS, SNAPLEN
from sockrepair.netns import named
from sockrepair.packet import packet_length, packet_tuple
from sockrepair.state import ConnTuple

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_ULOG_CONFIG = (c.NFNL_SUBSYS_ULOG << 8) | c.NFULNL_MSG_CONFIG
_ULOG_PACKET = (c.NFNL_SUBSYS_ULOG << 8) | c.NFULNL_MSG_PACKET
_SO_RCVBUFFORCE = 33
# Copies wait in the socket until drained: room for a burst from many peers during a long move.
RECV_BUFFER = 64 << 20
# Defaults of the caps: beyond them copies are not kept and the peer's retransmission covers the packet.
MAX_PACKETS_PER_CONNECTION = 4096
MAX_BYTES_PER_CONNECTION = 16 << 20
MAX_PACKETS = 1 << 18
MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class KeepCaps:
    """Limits on what one recorder keeps, so on what one mover's lock keeps in one network namespace: at most
    `packets_per_connection` packets and `bytes_per_connection` bytes (whole IP packets) for each connection, and
    `total_packets` packets and `total_bytes` bytes in all. A copy past any of them is not kept: the lock drops that
    packet as a plain dropping lock does, the peer resends it after its retransmission timeout, and the move's
    report counts it (`Kept.fell_back`). Raises ValueError for a cap that is not an int >= 0."""

    packets_per_connection: int = MAX_PACKETS_PER_CONNECTION
    bytes_per_connection: int = MAX_BYTES_PER_CONNECTION
    total_packets: int = MAX_PACKETS
    total_bytes: int = MAX_BYTES

    def __post_init__(self) -> None:
        for name in ("packets_per_connection", "bytes_per_connection", "total_packets", "total_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KeepCaps.{name} must be an int >= 0, not {value!r}")

    def refuses(self, size: int, packets: int, used: int, all_packets: int, all_used: int) -> bool:
        """Whether a copy of `size` bytes goes past a cap when `packets` copies of `used` bytes are kept for its
        connection, and `all_packets` of `all_used` bytes in all."""
        return (packets >= self.packets_per_connection or used + size > self.bytes_per_connection
                or all_packets >= self.total_packets or all_used + size > self.total_bytes)


@dataclass
class Held:
    """What was kept for a set of connections: `packets` (whole IP packets, peer to us, in the order the lock saw
    them), `over_cap` (copies not kept because a cap was reached), `lost` (copies the kernel could not deliver to
    the recorder), `truncated` (copies shorter than their packet)."""

    packets: list[bytes] = field(default_factory=list)
    over_cap: int = 0
    lost: int = 0
    truncated: int = 0

    @property
    def fell_back(self) -> int:
        """Packets the peer will have to resend after its retransmission timeout (a lower bound when lost > 0)."""
        return self.over_cap + self.lost + self.truncated

    def extend(self, other: Held) -> None:
        self.packets += other.packets
        self.over_cap += other.over_cap
        self.lost += other.lost
        self.truncated += other.truncated


def wire_key(conn: ConnTuple) -> ConnTuple:
    """The tuple a connection's packets carry (v4-mapped connections as IPv4), as packet_tuple() gives it."""
    return conn.wire() if conn.family == socket.AF_INET6 else conn


class WireKeys(frozenset[ConnTuple]):
    """The wire_key() of every connection of `conns`, as a set: what Recorder.take() matches kept packets with."""

    def __new__(cls, conns: Iterable[ConnTuple]) -> WireKeys:
        return super().__new__(cls, map(wire_key, conns))


_NLATTR = struct.Struct("=HH")  # struct nlattr: nla_len, nla_type
_SEQ = struct.Struct(">I")
_PAYLOAD, _SEQ_ATTR = c.NFULA_PAYLOAD, c.NFULA_SEQ  # the attributes _parse() reads


class _Queue(list[bytes]):
    """The packets kept for one connection, in arrival order, and their bytes (`size`)."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


class _GroupTaken(Exception):
    """nfnetlink_log refused a group: bound by another socket, or no CAP_NET_ADMIN."""


class Recorder:
    """Binds a free nfnetlink_log group in `netns` (a name from `ip netns list`, or None for this thread's
    namespace): the first of NFLOG_GROUP .. NFLOG_GROUP + NFLOG_GROUPS - 1 that no other socket there has bound,
    as `group`, which its mover gives the lock (Locker.lock(..., group=)) so that the copies of what peers send to
    those connections come here. Raises LockError when every one of those groups is bound (as many movers recording
    there), CAP_NET_ADMIN is missing there, or nfnetlink_log is missing. `bound`: a recorder's socket taken over
    from another process (`socket`, passed with SCM_RIGHTS), with the `next_seq` it expected; its `group` is then
    None (unknown here: the locks it records for are in place already, and a renewal keeps their group). Use as a
    context manager, or close()."""

    group: int | None

    def __init__(self, netns: str | None = None, caps: KeepCaps = KeepCaps(), *, bound: socket.socket | None = None,
                 next_seq: int | None = None) -> None:
        self.netns = netns
        self.caps = caps
        self.group = None
        if bound is not None:
            # a recorder handed over by another process (sockrepair.move.keepd): the socket keeps its binding, its
            # namespace and the copies queued in it, so nothing is lost between the two owners
            self._sock = bound
            self._start(next_seq)
            return
        with named(netns):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, c.NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECV_BUFFER)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            self._seq = 0
            group = self.group = self._bind_free_group()
            self._configure(
                attr(c.NFULA_CFG_MODE, struct.pack(">IBB", SNAPLEN, c.NFULNL_COPY_PACKET, 0))
                + attr(c.NFULA_CFG_QTHRESH, struct.pack(">I", 1))
                + attr(c.NFULA_CFG_TIMEOUT, struct.pack(">I", 0))
                + attr(c.NFULA_CFG_FLAGS, struct.pack(">H", c.NFULNL_CFG_F_SEQ)),
                "configure the log group",
                group,
            )
        except BaseException:
            self._sock.close()
            raise
        self._start(None)

    def _start(self, next_seq: int | None) -> None:
        self._sock.setblocking(False)
        self._buf = bytearray(SNAPLEN + 4096)
        self._kept: dict[ConnTuple, _Queue] = {}
        self._total = 0  # bytes kept, in all
        self._count = 0  # packets kept, in all
        self._next_seq = next_seq
        self._stats = Held()

    @property
    def socket(self) -> socket.socket:
        """The bound nfnetlink_log socket (to poll, or to hand over to another process with its binding)."""
        return self._sock

    @property
    def next_seq(self) -> int | None:
        """The NFULA_SEQ the next copy should carry (None before the first): a new owner of the socket counts
        copies lost from there."""
        return self._next_seq

    def _bind_free_group(self) -> int:
        """Bind the first group no other socket in the namespace has. nfnetlink_log answers EPERM both for a group
        bound by another socket (nfulnl_recv_config) and without CAP_NET_ADMIN, so every candidate is tried."""
        for group in range(NFLOG_GROUP, NFLOG_GROUP + NFLOG_GROUPS):
            try:
                self._configure(attr(c.NFULA_CFG_CMD, bytes((c.NFULNL_CFG_CMD_BIND,))), "bind the log group", group)
                return group
            except _GroupTaken:
                continue
        raise LockError(f"cannot bind an nfnetlink_log group to record for the lock: groups {NFLOG_GROUP}.."
                        f"{NFLOG_GROUP + NFLOG_GROUPS - 1} are all bound (as many processes record in this network "
                        "namespace), or this one lacks CAP_NET_ADMIN there")

    def _configure(self, payload: bytes, what: str, group: int) -> None:
        self._seq += 1
        msg = (_NLMSGHDR.pack(_NLMSGHDR.size + _NFGENMSG.size + len(payload), _ULOG_CONFIG,
                              c.NLM_F_REQUEST | c.NLM_F_ACK, self._seq, 0)
               + _NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + payload)
        self._sock.send(msg)
        self._sock.settimeout(2.0)
        try:
            data = self._sock.recv(4096)
        except TimeoutError:
            raise LockError(f"nfnetlink_log did not answer ({what})") from None
        finally:
            self._sock.settimeout(None)
        _length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, 0)
        if kind == c.NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, _NLMSGHDR.size)[0]
            if err in (errno.EPERM, errno.EBUSY):
                raise _GroupTaken(group)
            if err:
                raise NftError(f"nfnetlink_log: {what}", err)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drain(self) -> None:
        """Read every copy queued so far and keep it, within the caps. Never blocks."""
        while True:
            try:
                size = self._sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped copies: counted through the sequence numbers
                    continue
                raise NftError("nfnetlink_log: read", exc.errno or errno.EIO) from None
            self._parse(memoryview(self._buf)[: min(size, len(self._buf))])

    def _parse(self, view: memoryview) -> None:
        # one loop over the messages and their attributes, without a dict per message: a move parses a thousand
        # copies or more inside its downtime, and the calls and lookups cost microseconds each
        pos, end = 0, len(view)
        head, unpack, attr_unpack = _NLMSGHDR.size, _NLMSGHDR.unpack_from, _NLATTR.unpack_from
        body = head + _NFGENMSG.size
        while pos + head <= end:
            length, kind, _flags, _seq, _pid = unpack(view, pos)
            if length < head or pos + length > end:
                return
            if kind == _ULOG_PACKET:
                seq: int | None = None
                payload: memoryview | None = None
                at, stop = pos + body, pos + length
                while at + 4 <= stop:
                    size, attr_kind = attr_unpack(view, at)
                    if size < 4 or at + size > stop:
                        raise LockError(f"malformed netlink attribute at byte {at - pos - body}")
                    attr_kind &= 0x3FFF
                    if attr_kind == _PAYLOAD:
                        payload = view[at + 4 : at + size]
                    elif attr_kind == _SEQ_ATTR:
                        if size != 8:
                            raise LockError(f"malformed NFULA_SEQ at byte {at - pos - body}")
                        seq = _SEQ.unpack_from(view, at + 4)[0]
                    at += (size + 3) & ~3
                self._keep(seq, payload)
            pos += (length + 3) & ~3

    def _keep(self, seq: int | None, payload: memoryview | None) -> None:
        if seq is not None:
            if self._next_seq is not None and seq != self._next_seq:
                self._stats.lost += (seq - self._next_seq) & 0xFFFFFFFF
            self._next_seq = (seq + 1) & 0xFFFFFFFF
        if payload is None:
            return
        packet = bytes(payload)
        conn = packet_tuple(packet)
        if conn is None:
            return
        size = len(packet)
        if packet_length(packet) != size:
            self._stats.truncated += 1
            return
        queue = self._kept.get(conn)  # one lookup per packet: a ConnTuple hashes its five fields every time
        used, count = (queue.size, len(queue)) if queue is not None else (0, 0)
        if self.caps.refuses(size, count, used, self._count, self._total):
            self._stats.over_cap += 1
            return
        if queue is None:
            queue = self._kept[conn] = _Queue()
        queue.append(packet)
        queue.size = used + size
        self._total += size
        self._count += 1

    def pending(self, conns: Iterable[ConnTuple]) -> int:
        """Drain, then count the packets kept for `conns` (they stay kept)."""
        self.drain()
        return sum(len(self._kept.get(wire_key(conn), ())) for conn in conns)

    def peek(self, conns: Iterable[ConnTuple]) -> list[list[bytes]]:
        """Drain once, then the packets kept for each of `conns` so far, in arrival order (they stay kept)."""
        self.drain()
        return [list(self._kept.get(wire_key(conn), ())) for conn in conns]

    def take(self, conns: Iterable[ConnTuple] | WireKeys) -> Held:
        """Drain, then hand over (and forget) the packets kept for `conns` (or their WireKeys, made once by a
        caller that takes repeatedly), each connection's in arrival order, the connections in the order their first
        packet came. The counts of copies lost or over a cap are those of the whole recorder so far (a lost copy
        names no connection)."""
        self.drain()
        held = Held(over_cap=self._stats.over_cap, lost=self._stats.lost, truncated=self._stats.truncated)
        if not self._kept:  # the usual case of a delivery's later rounds: no need to look at every connection
            return held
        keys = conns if isinstance(conns, WireKeys) else WireKeys(conns)
        # only the connections something was kept for, not every one asked for (1,000 lookups a round at 1,000)
        for key in [key for key in self._kept if key in keys]:
            queue = self._kept.pop(key)
            held.packets += queue
            self._total -= queue.size
            self._count -= len(queue)
        return held

    def forget(self) -> None:
        """Drop every copy kept so far (the counts stay): a keeper that wants only some connections sheds the
        copies of the others, which only the process that locked them could deliver."""
        self._kept.clear()
        self._total = self._count = 0
