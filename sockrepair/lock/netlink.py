"""A small nfnetlink client: attribute packing, nf_tables batches (one atomic transaction per send), per-message
ACK checking and dumps, over one AF_NETLINK socket opened in a chosen network namespace."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from sockrepair.errors import LockError, NftError
from sockrepair.lock import nfconst as c

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_HEADERS = _NLMSGHDR.size + _NFGENMSG.size
_RECV_BUF = 1 << 17
# A message must fit in the socket's send buffer (netlink_sendmsg: len <= sk_sndbuf - 32); big transactions raise it.
_SNDBUF_MAX = 32 << 20


def attr(kind: int, payload: bytes) -> bytes:
    size = _NLATTR.size + len(payload)
    return _NLATTR.pack(size, kind) + payload + b"\0" * (-size & 3)


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attr_be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">i" if value < 0 else ">I", value))


def attr_be64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">Q", value))


def nest(kind: int, *children: bytes) -> bytes:
    return attr(kind | c.NLA_F_NESTED, b"".join(children))


def iter_attrs(data: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """(type without the nested/byte-order flags, payload) for each attribute in `data`."""
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos + _NLATTR.size <= end:
        size, kind = _NLATTR.unpack_from(view, pos)
        if size < _NLATTR.size or pos + size > end:
            raise LockError(f"malformed netlink attribute at byte {pos}")
        yield kind & 0x3FFF, view[pos + _NLATTR.size : pos + size]
        pos += (size + 3) & ~3


def attrs(data: bytes | memoryview, wanted: Collection[int] | None = None) -> dict[int, memoryview]:
    """iter_attrs() as a dict (the last of a repeated type wins), only the types in `wanted` (None: every one), in
    one loop: the recorder parses a dozen attributes per packet it keeps and wants two, and a generator's steps and
    the views of the others cost microseconds per packet inside the downtime. Raises LockError for a malformed
    attribute."""
    view = memoryview(data)
    found: dict[int, memoryview] = {}
    pos, end, head, unpack = 0, len(view), _NLATTR.size, _NLATTR.unpack_from
    while pos + head <= end:
        size, kind = unpack(view, pos)
        if size < head or pos + size > end:
            raise LockError(f"malformed netlink attribute at byte {pos}")
        kind &= 0x3FFF
        if wanted is None or kind in wanted:
            found[kind] = view[pos + head : pos + size]
        pos += (size + 3) & ~3
    return found


def be64(value: memoryview) -> int:
    return int(struct.unpack(">Q", value)[0])


def cstr(value: memoryview) -> str:
    return bytes(value).split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class Request:
    """One nf_tables message of a transaction; `op` says what it does, for error messages."""

    msg_type: int
    flags: int
    family: int
    payload: bytes
    op: str


def _message(msg_type: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    return (
        _NLMSGHDR.pack(_HEADERS + len(payload), msg_type, c.NLM_F_REQUEST | flags, seq, 0)
        + _NFGENMSG.pack(family, 0, socket.htons(res_id))
        + payload
    )


def _nft_type(msg_type: int) -> int:
    return (c.NFNL_SUBSYS_NFTABLES << 8) | msg_type


class NfSocket:
    """One AF_NETLINK/NETLINK_NETFILTER socket. Created inside `netns` (a name under /run/netns) when given: a netlink
    socket keeps the namespace it was created in, so later calls need no setns."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = _open_socket(netns)
        self.netns = netns
        self._seq = 0
        self._buf = bytearray(_RECV_BUF)
        self._sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def transact(self, requests: Sequence[Request], commit: bool = True) -> None:
        """Send `requests` as one batch (all applied or none) and check every message's ACK. Without `commit` the
        batch has no END message: the kernel validates every message, reports errors, and applies nothing."""
        seq_begin = self._next_seq()
        parts = [_message(c.NFNL_MSG_BATCH_BEGIN, 0, seq_begin, socket.AF_UNSPEC, b"", c.NFNL_SUBSYS_NFTABLES)]
        pending: dict[int, Request] = {}
        for req in requests:
            seq = self._next_seq()
            pending[seq] = req
            parts.append(_message(_nft_type(req.msg_type), req.flags | c.NLM_F_ACK, seq, req.family, req.payload))
        if commit:
            parts.append(
                _message(c.NFNL_MSG_BATCH_END, 0, self._next_seq(), socket.AF_UNSPEC, b"", c.NFNL_SUBSYS_NFTABLES)
            )
        batch = b"".join(parts)
        self._fit_sndbuf(len(batch))
        self._send(batch, requests[0].op if len(requests) == 1 else f"transaction of {len(requests)} messages")
        first_error: tuple[Request, int, str] | None = None
        # nfnetlink handles the batch inside sendmsg(), so every answer is already queued when we read.
        while pending:
            for seq, err, detail in self._read_acks():
                if seq == seq_begin and err:
                    raise NftError("nf_tables transaction", err, detail)
                if seq not in pending:
                    continue  # an answer to an earlier, abandoned request
                req = pending.pop(seq)
                if err and first_error is None:
                    first_error = (req, err, detail)
        if first_error is not None:
            req, err, detail = first_error
            raise NftError(req.op, err, detail)

    def dump(self, msg_type: int, family: int, payload: bytes, op: str) -> Iterator[memoryview]:
        """The payloads (after nfgenmsg) of every message a GET dump returns."""
        seq = self._next_seq()
        self._send(_message(_nft_type(msg_type), c.NLM_F_DUMP, seq, family, payload), op)
        while True:
            for kind, mseq, body in self._read():
                if mseq != seq:
                    continue
                if kind == c.NLMSG_DONE:
                    return
                if kind == c.NLMSG_ERROR:
                    err, detail = _parse_error(body)
                    if err:
                        raise NftError(op, err, detail)
                    return
                yield body[_NFGENMSG.size :]

    def _fit_sndbuf(self, size: int) -> None:
        if size + 64 <= self._sndbuf:
            return
        if size + 64 > _SNDBUF_MAX:
            raise LockError(
                f"nf_tables transaction of {size} bytes is too big (limit {_SNDBUF_MAX}); lock fewer at once"
            )
        want = max(size + 64, 1 << 20)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 32, want)  # SO_SNDBUFFORCE: root may pass net.core.wmem_max
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        self._sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        if size + 64 > self._sndbuf:
            raise LockError(f"nf_tables transaction of {size} bytes exceeds the socket buffer ({self._sndbuf})")

    def _send(self, data: bytes, op: str) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise NftError(op, exc.errno or errno.EIO, "sending to nf_tables") from None

    def _read(self) -> list[tuple[int, int, memoryview]]:
        """One datagram from the kernel as (type, seq, body) messages."""
        try:
            size = self.sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
        except BlockingIOError:
            raise LockError("no answer from nf_tables within the socket timeout") from None
        except OSError as exc:
            raise NftError("reading the answer of nf_tables", exc.errno or errno.EIO) from None
        if size > len(self._buf):
            raise LockError(f"nf_tables answer of {size} bytes was truncated")
        view = memoryview(self._buf)[:size]
        out = []
        pos = 0
        while pos + _NLMSGHDR.size <= size:
            length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(view, pos)
            if length < _NLMSGHDR.size or pos + length > size:
                raise LockError("malformed netlink message from the kernel")
            out.append((kind, seq, view[pos + _NLMSGHDR.size : pos + length]))
            pos += (length + 3) & ~3
        return out

    def _read_acks(self) -> Iterator[tuple[int, int, str]]:
        for kind, _seq, body in self._read():
            if kind == c.NLMSG_ERROR:
                err, detail = _parse_error(body)
                orig_seq = _NLMSGHDR.unpack_from(body, 4)[3]
                yield orig_seq, err, detail


def _parse_error(body: memoryview) -> tuple[int, str]:
    """struct nlmsgerr: negative errno (0 = ACK), the request's header (payload capped by NETLINK_CAP_ACK), then
    extended-ACK attributes when the kernel has a message for us."""
    err = -struct.unpack_from("=i", body, 0)[0]
    detail = ""
    tlvs = body[4 + _NLMSGHDR.size :]
    if len(tlvs) >= _NLATTR.size:
        msg = attrs(tlvs).get(c.NLMSGERR_ATTR_MSG)
        if msg is not None:
            detail = cstr(msg)
    return err, detail


def check_netns_name(netns: str) -> str:
    """A name as `ip netns` knows it (a file under /run/netns), never a path."""
    if not netns or "/" in netns or netns in (".", "..") or "\0" in netns:
        raise LockError(f"not a network namespace name: {netns!r}")
    return netns


def _open_socket(netns: str | None) -> socket.socket:
    if netns is None:
        return _new_socket()
    from sockrepair.errors import NetnsError
    from sockrepair.netns import NetNS

    check_netns_name(netns)
    try:
        with NetNS(netns).entered():
            return _new_socket()
    except FileNotFoundError:
        raise LockError(f"no network namespace named {netns!r} (see `ip netns list`)") from None
    except NetnsError as exc:
        raise LockError(f"cannot enter network namespace {netns!r}: {exc}") from None


def _new_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, c.NETLINK_NETFILTER)
    except OSError as exc:
        raise NftError("socket(AF_NETLINK, NETLINK_NETFILTER)", exc.errno or errno.EIO, "no nfnetlink here") from None
    try:
        sock.bind((0, 0))
        # Errors then echo only the failing message's header, not its (possibly 64 KiB) payload.
        sock.setsockopt(c.SOL_NETLINK, c.NETLINK_CAP_ACK, 1)
        sock.setsockopt(c.SOL_NETLINK, c.NETLINK_EXT_ACK, 1)
        # A kernel that never answers must not hang the caller (the answer is normally queued before send returns).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("=qq", 5, 0))
    except OSError as exc:
        sock.close()
        raise NftError("setting up the nf_tables netlink socket", exc.errno or errno.EIO) from None
    return sock
