"""Reading criu's images of TCP connections into ConnectionState: tcp-stream-<ino>.img (the queues and the TCP
state) and the inet socket entries of files.img (the 4-tuple and socket options).

The framing is parsed with construct; the protobuf entries are decoded by the protobuf runtime from message
definitions built here at import, field numbers as in criu's images/*.proto (tcp-stream, sk-inet, sk-opts, fdinfo).
Fields not defined here are skipped by the runtime, so newer criu images still read.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import construct as cs
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from sockrepair.errors import ImageError
from sockrepair.image._codec import problem_of
from sockrepair.private import open_dir, read_regular
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)

MAGIC_COMMON = 0x54564319
MAGIC_TCP_STREAM = 0x51465506
MAGIC_FILES = 0x56303138
FD_TYPE_INETSK = 4
# tcp_stream_entry.opt_mask holds tcpi_options bits (linux/tcp.h TCPI_OPT_*).
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
# Bounds on what is read from disk: files.img of 100000 fds is about 10 MB; a stream image holds two queues.
MAX_FILES_BYTES = 64 << 20
MAX_STREAM_BYTES = 1 << 31

_F = descriptor_pb2.FieldDescriptorProto
_U32, _U64, _BOOL, _STR, _MSG = _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_BOOL, _F.TYPE_STRING, _F.TYPE_MESSAGE
_PACKAGE = "sockrepair.criu"

# name -> [(field, number, type, repeated, message type)]; all optional so a partial definition parses.
_MESSAGES: dict[str, list[tuple[str, int, int, bool, str]]] = {
    "tcp_stream_entry": [
        ("inq_len", 1, _U32, False, ""), ("inq_seq", 2, _U32, False, ""), ("outq_len", 3, _U32, False, ""),
        ("outq_seq", 4, _U32, False, ""), ("opt_mask", 5, _U32, False, ""), ("snd_wscale", 6, _U32, False, ""),
        ("mss_clamp", 7, _U32, False, ""), ("rcv_wscale", 8, _U32, False, ""), ("timestamp", 9, _U32, False, ""),
        ("cork", 10, _BOOL, False, ""), ("nodelay", 11, _BOOL, False, ""), ("unsq_len", 12, _U32, False, ""),
        ("snd_wl1", 13, _U32, False, ""), ("snd_wnd", 14, _U32, False, ""), ("max_window", 15, _U32, False, ""),
        ("rcv_wnd", 16, _U32, False, ""), ("rcv_wup", 17, _U32, False, ""),
    ],
    "sk_opts_entry": [
        ("so_sndbuf", 1, _U32, False, ""), ("so_rcvbuf", 2, _U32, False, ""), ("reuseaddr", 7, _BOOL, False, ""),
        ("so_priority", 8, _U32, False, ""), ("so_rcvlowat", 9, _U32, False, ""), ("so_mark", 10, _U32, False, ""),
        ("so_bound_dev", 15, _STR, False, ""), ("so_reuseport", 17, _BOOL, False, ""),
        ("so_keepalive", 19, _BOOL, False, ""), ("tcp_keepcnt", 20, _U32, False, ""),
        ("tcp_keepidle", 21, _U32, False, ""), ("tcp_keepintvl", 22, _U32, False, ""),
    ],
    "ip_opts_entry": [("freebind", 1, _BOOL, False, ""), ("tos", 6, _U32, False, ""), ("ttl", 7, _U32, False, "")],
    "tcp_opts_entry": [
        ("cork", 1, _BOOL, False, ""), ("nodelay", 2, _BOOL, False, ""), ("keepcnt", 3, _U32, False, ""),
        ("keepidle", 4, _U32, False, ""), ("keepintvl", 5, _U32, False, ""),
    ],
    "inet_sk_entry": [
        ("id", 1, _U32, False, ""), ("ino", 2, _U32, False, ""), ("family", 3, _U32, False, ""),
        ("type", 4, _U32, False, ""), ("proto", 5, _U32, False, ""), ("state", 6, _U32, False, ""),
        ("src_port", 7, _U32, False, ""), ("dst_port", 8, _U32, False, ""), ("flags", 9, _U32, False, ""),
        ("backlog", 10, _U32, False, ""), ("src_addr", 11, _U32, True, ""), ("dst_addr", 12, _U32, True, ""),
        ("opts", 14, _MSG, False, "sk_opts_entry"), ("v6only", 15, _BOOL, False, ""),
        ("ip_opts", 16, _MSG, False, "ip_opts_entry"), ("ifname", 17, _STR, False, ""),
        ("ns_id", 18, _U32, False, ""), ("tcp_opts", 20, _MSG, False, "tcp_opts_entry"),
    ],
    # `type` is the fd_types enum in criu; as a plain varint it decodes the same and never rejects a new value.
    "file_entry": [("type", 1, _U32, False, ""), ("id", 2, _U32, False, ""), ("isk", 4, _MSG, False, "inet_sk_entry")],
}


def _build_classes() -> dict[str, type[message.Message]]:
    proto = descriptor_pb2.FileDescriptorProto(name="sockrepair_criu_images.proto", package=_PACKAGE, syntax="proto2")
    for name, fields in _MESSAGES.items():
        msg = proto.message_type.add(name=name)
        for fname, number, ftype, repeated, type_name in fields:
            msg.field.add(
                name=fname, number=number, type=ftype,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
                type_name=f".{_PACKAGE}.{type_name}" if type_name else None,
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in _MESSAGES
    }


_CLASSES = _build_classes()
TcpStreamEntry = _CLASSES["tcp_stream_entry"]
InetSkEntry = _CLASSES["inet_sk_entry"]
FileEntry = _CLASSES["file_entry"]

_Head = cs.Struct("common" / cs.Int32ul, "magic" / cs.Int32ul)
_Entry = cs.Prefixed(cs.Int32ul, cs.GreedyBytes)


@dataclass(frozen=True)
class TcpStreamImage:
    """A tcp-stream-<ino>.img: `entry` is the decoded tcp_stream_entry, then the queues' bytes it announces."""

    entry: Any
    recv_queue: bytes
    send_queue: bytes


@dataclass(frozen=True)
class InetSocket:
    """An inet socket of files.img: `id` is criu's file id, `ino` names its tcp-stream-<ino in hex>.img."""

    id: int
    ino: int
    tuple: ConnTuple
    state: int
    proto: int
    entry: Any


def _head(data: bytes, magic: int, name: str) -> int:
    if len(data) < 8:
        raise ImageError(f"{name}: {len(data)} bytes, shorter than criu's 8-byte image header")
    head = _Head.parse(data)
    if head.common != MAGIC_COMMON or head.magic != magic:
        raise ImageError(
            f"{name}: image magic {head.common:#010x} {head.magic:#010x} at byte 0, want {MAGIC_COMMON:#010x} "
            f"{magic:#010x}"
        )
    return 8


def _entry(data: bytes, offset: int, cls: type[message.Message], name: str) -> tuple[Any, int]:
    try:
        raw = _Entry.parse(data[offset:])
    except cs.ConstructError:
        raise ImageError(f"{name}: entry at byte {offset} runs past the end of the file ({len(data)} bytes)") from None
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except message.DecodeError as exc:
        raise ImageError(f"{name}: entry at byte {offset} is not a valid {cls.DESCRIPTOR.name}: {exc}") from None
    return msg, offset + 4 + len(raw)


def parse_tcp_stream(data: bytes, name: str = "tcp-stream image") -> TcpStreamImage:
    """Decode a whole tcp-stream image (criu/sk-tcp.c, images/tcp-stream.proto). Raises ImageError, naming `name`
    and the byte, for a short file, a wrong magic, a malformed entry or queue lengths that do not match the file."""
    offset = _head(data, MAGIC_TCP_STREAM, name)
    entry, offset = _entry(data, offset, TcpStreamEntry, name)
    end = offset + entry.inq_len + entry.outq_len
    if end != len(data):
        raise ImageError(
            f"{name}: entry says {entry.inq_len} + {entry.outq_len} queue bytes from byte {offset}, "
            f"the file has {len(data) - offset}"
        )
    return TcpStreamImage(entry, data[offset : offset + entry.inq_len], data[offset + entry.inq_len : end])


def _address(family: int, words: list[int], name: str, what: str) -> str:
    # criu keeps each address as u32 words holding the network-order bytes in host memory order.
    want = 1 if family == socket.AF_INET else 4
    if len(words) != want:
        raise ImageError(f"{name}: inet socket {what} address has {len(words)} u32 word(s), want {want}")
    return socket.inet_ntop(family, struct.pack(f"<{want}I", *words))


def parse_inet_sockets(data: bytes, name: str = "files.img") -> list[InetSocket]:
    """The inet sockets (FD_TYPE_INETSK entries) of a criu 4.x files.img, in file order; other entries are skipped.
    Raises ImageError for a wrong magic, a malformed entry or an address family other than AF_INET/AF_INET6."""
    offset = _head(data, MAGIC_FILES, name)
    found = []
    while offset < len(data):
        entry, offset = _entry(data, offset, FileEntry, name)
        if entry.type != FD_TYPE_INETSK or not entry.HasField("isk"):
            continue
        isk = entry.isk
        if isk.family not in (socket.AF_INET, socket.AF_INET6):
            raise ImageError(f"{name}: inet socket id {isk.id} has address family {isk.family}")
        conn = ConnTuple(
            isk.family, _address(isk.family, list(isk.src_addr), name, "source"), isk.src_port,
            _address(isk.family, list(isk.dst_addr), name, "destination"), isk.dst_port,
        )
        found.append(InetSocket(isk.id, isk.ino, conn, isk.state, isk.proto, isk))
    return found


def _sockopts(isk: Any, stream: Any) -> SocketOptions:
    opts, ip, tcp = isk.opts, isk.ip_opts, isk.tcp_opts
    defaults = SocketOptions()
    return SocketOptions(
        nodelay=tcp.nodelay if isk.HasField("tcp_opts") else stream.nodelay,
        cork=tcp.cork if isk.HasField("tcp_opts") else stream.cork,
        keepalive=opts.so_keepalive,
        keepidle=opts.tcp_keepidle if opts.HasField("tcp_keepidle") else defaults.keepidle,
        keepintvl=opts.tcp_keepintvl if opts.HasField("tcp_keepintvl") else defaults.keepintvl,
        keepcnt=opts.tcp_keepcnt if opts.HasField("tcp_keepcnt") else defaults.keepcnt,
        sndbuf=opts.so_sndbuf,
        rcvbuf=opts.so_rcvbuf,
        reuseaddr=opts.reuseaddr,
        reuseport=opts.so_reuseport,
        priority=opts.so_priority,
        mark=opts.so_mark - (1 << 32) if opts.so_mark >= 1 << 31 else opts.so_mark,  # the C int setsockopt takes
        bindtodevice=opts.so_bound_dev,
        rcvlowat=opts.so_rcvlowat if opts.HasField("so_rcvlowat") else defaults.rcvlowat,
        tos=ip.tos,
        ttl=ip.ttl if ip.HasField("ttl") else defaults.ttl,
        freebind=ip.freebind,
        v6only=isk.v6only,
    )


def to_connection_state(sock: InetSocket, stream: TcpStreamImage) -> ConnectionState:
    """sockrepair's view of one dumped connection: sequence numbers are those at the end of each queue
    (TCP_QUEUE_SEQ), `window` is None when the image has no repair window. Raises ImageError (`.field`) for a
    connection that breaks the rules sockrepair's own images follow (sockrepair.image.find_problem: ports, TCP
    state, MSS, window scales, options, more bytes said never sent than the send queue holds)."""
    state = _state(sock, stream)
    problem = problem_of(state)
    if problem is not None:
        raise ImageError(f"tcp-stream-{sock.ino:x}.img ({state.tuple}): {problem[1]}", field=problem[0])
    return state


def _state(sock: InetSocket, stream: TcpStreamImage) -> ConnectionState:
    e = stream.entry
    window = (
        RepairWindow(e.snd_wl1, e.snd_wnd, e.max_window, e.rcv_wnd, e.rcv_wup) if e.HasField("snd_wl1") else None
    )
    return ConnectionState(
        tuple=sock.tuple,
        tcp_state=sock.state,
        send_seq=e.outq_seq,
        recv_seq=e.inq_seq,
        send_queue=stream.send_queue,
        unsent_len=e.unsq_len,
        recv_queue=stream.recv_queue,
        options=TcpOptions(
            mss=e.mss_clamp,
            sack=bool(e.opt_mask & TCPI_OPT_SACK),
            timestamps=bool(e.opt_mask & TCPI_OPT_TIMESTAMPS),
            wscale=bool(e.opt_mask & TCPI_OPT_WSCALE),
            snd_wscale=e.snd_wscale,
            rcv_wscale=e.rcv_wscale,
        ),
        window=window,
        timestamp=e.timestamp,
        sockopts=_sockopts(sock.entry, e),
    )


def _read(name: str, dir_fd: int, path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file `name` (None when there is none), at most `limit`; ImageError otherwise."""
    try:
        return read_regular(name, limit, dir_fd, shown=path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}", path=str(path)) from None


def load_connections(directory: Path) -> list[ConnectionState]:
    """Every TCP connection criu dumped into `directory` (one per socket with a tcp-stream image), sorted by
    tuple. The directory must be the caller's or root's, writable by nobody else, and the images regular files
    (files.img at most MAX_FILES_BYTES, a tcp-stream image at most MAX_STREAM_BYTES), as sockrepair.private
    checks. Raises ImageError when it is refused, there is no files.img, or an image is malformed (file and byte
    named) or holds a connection sockrepair's images could not (to_connection_state)."""
    try:
        dir_fd = open_dir(directory)
    except OSError as exc:
        raise ImageError(f"{directory}: {exc.strerror}", path=str(directory)) from None
    try:
        files = directory / "files.img"
        data = _read("files.img", dir_fd, files, MAX_FILES_BYTES)
        if data is None:
            raise ImageError(f"{directory}: no files.img: not a criu 4.x image directory, or the dump failed")
        states = []
        for sock in parse_inet_sockets(data, str(files)):
            name = f"tcp-stream-{sock.ino:x}.img"
            if sock.proto != socket.IPPROTO_TCP:
                continue
            stream = _read(name, dir_fd, directory / name, MAX_STREAM_BYTES)
            if stream is None:
                continue
            try:
                states.append(to_connection_state(sock, parse_tcp_stream(stream, str(directory / name))))
            except ImageError as exc:
                raise ImageError(str(exc), path=str(directory / name), offset=exc.offset, field=exc.field) from None
        return sorted(states, key=lambda s: s.tuple)
    finally:
        os.close(dir_fd)
