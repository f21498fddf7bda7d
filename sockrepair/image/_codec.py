"""The fast codec of the connection image: encode and decode with the struct module, in the layout that
sockrepair.image.format defines with construct (the unit tests hold the two together).

Every ImageError raised here carries `.field`, the record path of the field to blame as format.py names it
("tuple.local_port", "options.flags", "window.snd_wnd", "sockopts.congestion", "send_queue"; header and trailer fields
are "magic", "version", "flags", "crc32", "xxh3_64"), or None when a length rather than one field is at fault
(truncated input, trailing junk); decode's errors also carry `.offset`, the byte the message names."""

from __future__ import annotations

import dataclasses
import socket
import struct
import zlib
from operator import attrgetter, itemgetter
from typing import Any

from xxhash import xxh3_64, xxh3_64_intdigest

from sockrepair.errors import ImageError
from sockrepair.image.layout import (
    CHECKSUM_SIZE,
    CLOSE_STATE,
    FIRST_XXH3,
    FLAG_CLOSE,
    FLAG_WINDOW,
    FLAGS_OF_VERSION,
    MAGIC,
    MAX_ERRNO,
    MAX_NAME,
    MAX_WSCALE,
    MORE_SOCKOPT_FLAGS,
    MORE_SOCKOPT_INTS,
    MORE_SOCKOPT_LONGS,
    SOCKOPT_FLAGS,
    SOCKOPT_INTS,
    U32_MAX,
    VALID_TCP_STATES,
    VERSION,
    VERSIONS,
    WINDOW_FIELDS,
)
from sockrepair.state import (
    TCP_STATES,
    ConnectionState,
    ConnTuple,
    Payload,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)

_HEADER = struct.Struct(">4sHHI")
HEADER_SIZE = _HEADER.size
_CRC = struct.Struct(">I")
_XXH3 = struct.Struct(">Q")
CRC_SIZE = _CRC.size
# the shortest image whose version can be read: a header and the shortest trailer
MIN_SIZE = HEADER_SIZE + min(CHECKSUM_SIZE.values())
_QUEUE_HEAD = struct.Struct(">II")  # unsent_len, then the send queue's length prefix
_U32 = struct.Struct(">I")
_CLOSE = struct.Struct(">HB")  # format.CloseRecord: sk_err, flags (bit 0 fin_received)
# Version 2's record after the receive queue (format.MoreSocketOptionsRecord).
_MORE = struct.Struct(">B" + "i" * len(MORE_SOCKOPT_INTS) + "q" * len(MORE_SOCKOPT_LONGS))
_MORE_OFFSETS = {
    f"more_sockopts.{name}": struct.calcsize(">B" + "i" * i) for i, name in enumerate(MORE_SOCKOPT_INTS)
} | {
    f"more_sockopts.{name}": struct.calcsize(">B" + "i" * len(MORE_SOCKOPT_INTS) + "q" * i)
    for i, name in enumerate(MORE_SOCKOPT_LONGS)
}
_more_flags = attrgetter(*MORE_SOCKOPT_FLAGS)
_more_numbers = attrgetter(*MORE_SOCKOPT_INTS, *MORE_SOCKOPT_LONGS)


class _FixedBody:
    """The fixed-size start of a body (everything before the two strings) for one address size, with or without
    the window: one struct call packs or unpacks it, and `offsets` gives the byte each field starts at, keyed by
    its record path."""

    def __init__(self, addr_size: int, window: bool) -> None:
        spec = [
            ("tuple.ip_version", "B"), ("tuple.local_port", "H"), ("tuple.remote_port", "H"),
            ("tuple.local_addr", f"{addr_size}s"), ("tuple.remote_addr", f"{addr_size}s"),
            ("tcp_state", "B"), ("send_seq", "I"), ("recv_seq", "I"), ("timestamp", "I"),
            ("options.mss", "H"), ("options.flags", "B"), ("options.snd_wscale", "B"), ("options.rcv_wscale", "B"),
            *((f"window.{name}", "I") for name in (WINDOW_FIELDS if window else ())),
            ("sockopts.flags", "B"),
            *((f"sockopts.{name}", "i") for name in SOCKOPT_INTS),
        ]  # fmt: skip
        self.offsets: dict[str, int] = {}
        fmt = ">"
        for name, code in spec:
            self.offsets[name] = HEADER_SIZE + struct.calcsize(fmt)
            fmt += code
        self.body = struct.Struct(fmt)
        # Encoding packs the header, this and the bindtodevice length byte in one call.
        self.image_head = struct.Struct(_HEADER.format + fmt[1:] + "B")

    def field_cut_at(self, end: int) -> str:
        """The first fixed-size field that does not end before byte `end`."""
        starts = list(self.offsets.items())
        ends = [start for _, start in starts[1:]] + [HEADER_SIZE + self.body.size]
        return next(name for (name, _), stop in zip(starts, ends, strict=True) if stop > end)


_LAYOUTS = {(v, w): _FixedBody(size, w) for v, size in ((4, 4), (6, 16)) for w in (False, True)}
_FAMILY_OF = {4: socket.AF_INET, 6: socket.AF_INET6}
_IP_VERSION_OF: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 6}
_window_values = attrgetter(*WINDOW_FIELDS)
_sockopt_flags = attrgetter(*SOCKOPT_FLAGS)
_sockopt_numbers = attrgetter(*SOCKOPT_INTS)
# Decoding builds SocketOptions positionally (keywords cost 3 us): the wire order, permuted to the field order.
_MORE_FIELDS = (*MORE_SOCKOPT_FLAGS, *MORE_SOCKOPT_INTS, *MORE_SOCKOPT_LONGS)
_SOCKOPT_WIRE_ORDER = (*SOCKOPT_FLAGS, *SOCKOPT_INTS, "bindtodevice", "congestion", *_MORE_FIELDS)
_to_field_order = itemgetter(*(_SOCKOPT_WIRE_ORDER.index(f.name) for f in dataclasses.fields(SocketOptions)))
_FLAG_BITS = [tuple(bool(flags >> bit & 1) for bit in range(len(SOCKOPT_FLAGS))) for flags in range(256)]
_MORE_FLAG_BITS = [tuple(bool(flags >> bit & 1) for bit in range(len(MORE_SOCKOPT_FLAGS)))
                   for flags in range(1 << len(MORE_SOCKOPT_FLAGS))]
# A version 1 image holds none of version 2's options: they read as SocketOptions' defaults.
_V1_MORE = tuple(getattr(SocketOptions(), name) for name in _MORE_FIELDS)
# Encoding looks a flag byte up by its flags (a generator summing bits cost 0.5 us per byte); flags that are not all
# bools (any truthy value counts as set) miss and are summed.
_FLAG_BYTE = {bits: flags for flags, bits in enumerate(_FLAG_BITS)}
_MORE_FLAG_BYTE = {bits: flags for flags, bits in enumerate(_MORE_FLAG_BITS)}
_LENGTH_BYTE = [bytes((n,)) for n in range(MAX_NAME + 1)]
# Below this many queue bytes an image is joined first and its checksum taken in one call: cheaper than a call per
# piece. Above it the checksum is taken piece by piece, so that the queues are read once for it and copied once, by
# the join (joining first and checksumming the result would copy them twice: bytes cannot be appended to).
SMALL_QUEUES = 16 << 10


def _flag_byte(table: dict[tuple[bool, ...], int], flags: tuple[Any, ...]) -> int:
    try:
        return table[flags]
    except (KeyError, TypeError):  # TypeError: an unhashable value, which counts by its truth as well
        return sum(1 << bit for bit, on in enumerate(flags) if on)


def encode(state: ConnectionState, version: int = VERSION) -> bytes:
    """The image of `state`, in format `version` (any of VERSIONS: a host that still runs an older sockrepair
    reads only the older versions; version 1 drops the options it has no field for). Raises ImageError naming the
    field (in the message and as `.field`, e.g. "window.snd_wnd") if the state cannot be represented, or
    "version" for a version no sockrepair wrote."""
    if version not in VERSIONS:
        raise ImageError(f"cannot encode connection state: version {version} is not one of "
                         f"{', '.join(map(str, VERSIONS))}", field="version")
    try:
        t, o, w, so = state.tuple, state.options, state.window, state.sockopts
        send, recv, unsent = state.send_queue, state.recv_queue, state.unsent_len
        ip_version = _IP_VERSION_OF[t.family]
        dev, cong = so.bindtodevice.encode(), so.congestion.encode()
        if not (
            state.tcp_state in VALID_TCP_STATES
            and t.local_port
            and t.remote_port
            and o.snd_wscale <= MAX_WSCALE
            and o.rcv_wscale <= MAX_WSCALE
            and len(dev) <= MAX_NAME
            and len(cong) <= MAX_NAME
            and 0 <= unsent <= len(send)
            and 0 <= state.sk_err <= MAX_ERRNO
            and (state.tcp_state == CLOSE_STATE or not (state.sk_err or state.fin_received))
        ):
            raise ValueError("a field is out of range")
        closed = bool(state.sk_err or state.fin_received)
        layout = _LAYOUTS[ip_version, w is not None]
        more = b"" if version < 2 else _MORE.pack(_flag_byte(_MORE_FLAG_BYTE, _more_flags(so)), *_more_numbers(so))
        # The fixed part, two strings after their length bytes, unsent_len and both queues after their lengths.
        body_len = layout.body.size + 1 + len(dev) + 1 + len(cong) + 4 + 4 + len(send) + 4 + len(recv) + len(more)
        if closed:
            body_len += _CLOSE.size
        head = layout.image_head.pack(
            MAGIC, version, (0 if w is None else FLAG_WINDOW) | (FLAG_CLOSE if closed else 0), body_len,
            ip_version, t.local_port, t.remote_port,
            socket.inet_pton(t.family, t.local_addr), socket.inet_pton(t.family, t.remote_addr),
            state.tcp_state, state.send_seq, state.recv_seq, state.timestamp,
            o.mss, (1 if o.sack else 0) | (2 if o.timestamps else 0) | (4 if o.wscale else 0),
            o.snd_wscale, o.rcv_wscale,
            *(() if w is None else _window_values(w)),
            _flag_byte(_FLAG_BYTE, _sockopt_flags(so)),
            *_sockopt_numbers(so),
            len(dev),
        )  # fmt: skip
        pieces = [head, dev, _LENGTH_BYTE[len(cong)], cong, _QUEUE_HEAD.pack(unsent, len(send)), send,
                  _U32.pack(len(recv)), recv, more]
        if closed:
            pieces.append(_CLOSE.pack(state.sk_err, 1 if state.fin_received else 0))
    except (LookupError, AttributeError, TypeError, ValueError, OSError, struct.error) as exc:
        problem = problem_of(state)
        raise ImageError(
            f"cannot encode connection state: {problem[1] if problem else exc}", field=problem[0] if problem else None
        ) from None
    if closed and not FLAGS_OF_VERSION[version] & FLAG_CLOSE:
        raise ImageError(f"cannot encode connection state: version {version} has no CLOSE record for the pending "
                         f"error or the peer's FIN (version {VERSION} has)", field="version")
    if version >= FIRST_XXH3:
        if len(send) + len(recv) < SMALL_QUEUES:
            signed = b"".join(pieces)
            return signed + _XXH3.pack(xxh3_64_intdigest(signed))
        digest = xxh3_64()
        for piece in pieces:
            digest.update(piece)
        pieces.append(_XXH3.pack(digest.intdigest()))
    else:
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
        pieces.append(_CRC.pack(crc))
    return b"".join(pieces)


def decode(data: bytes | bytearray | memoryview) -> ConnectionState:
    """The state an image holds. Any malformed input raises ImageError saying what is wrong and at which byte
    (`.offset`, from the image's first byte; `.field`, the record path of the field to blame); no length is trusted
    before it is checked against the bytes actually there."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise ImageError(f"a connection image is bytes, not {type(data).__name__}") from None
    size = len(view)
    head = bytes(view[:HEADER_SIZE])
    if head[: len(MAGIC)] != MAGIC[: len(head)]:
        raise _bad(0, f"not a sockrepair connection image (magic {head[: len(MAGIC)].hex()}, want {MAGIC.hex()})",
                   "magic")
    if size < MIN_SIZE:
        raise _bad(size, f"truncated: {size} bytes is less than the {MIN_SIZE} of header and checksum")
    _, version, flags, body_len = _HEADER.unpack(head)
    if version not in VERSIONS:
        known = ", ".join(map(str, VERSIONS))
        raise _bad(4, f"unsupported format version {version} (this sockrepair reads versions {known})", "version")
    known_flags = FLAGS_OF_VERSION[version]
    if flags & ~known_flags:
        raise _bad(6, f"unknown flags 0x{flags:04x} (version {version} knows 0x{known_flags:04x})", "flags")
    end = HEADER_SIZE + body_len
    trailer = CHECKSUM_SIZE[version]
    if end + trailer > size:
        declared = f"the header declares a {body_len}-byte body, so {end + trailer} bytes, not {size}"
        raise _bad(size, f"truncated: {declared}")
    if end + trailer < size:
        raise _bad(end + trailer, f"{size - end - trailer} bytes of trailing junk after the image")
    if version >= FIRST_XXH3:
        (stored,) = _XXH3.unpack_from(view, end)
        computed = xxh3_64_intdigest(view[:end])
        if stored != computed:
            raise _bad(end, f"checksum mismatch: stored XXH3-64 0x{stored:016x}, computed 0x{computed:016x} "
                            "(corrupted image)", "xxh3_64")
    else:
        (stored,) = _CRC.unpack_from(view, end)
        computed = zlib.crc32(view[:end])
        if stored != computed:
            raise _bad(end, f"checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x} (corrupted image)",
                       "crc32")
    # the queues of an immutable image are views of it, never copied (they may be megabytes); those of a mutable
    # buffer are copied, or changing the buffer would change the state
    return _decode_body(view, end, bool(flags & FLAG_WINDOW), version, bool(flags & FLAG_CLOSE),
                        isinstance(data, bytes))


def _decode_body(view: memoryview, end: int, has_window: bool, image_version: int, has_close: bool,
                 views: bool) -> ConnectionState:
    # each length check calls _need, which words the error, only when it fails (a call each cost 0.1 us)
    if end <= HEADER_SIZE:
        _need(HEADER_SIZE, 1, end, "the connection tuple", "tuple.ip_version")
    version = view[HEADER_SIZE]
    if version not in _FAMILY_OF:
        raise _bad(HEADER_SIZE, f"unknown IP version {version} (want 4 or 6)", "tuple.ip_version")
    layout = _LAYOUTS[version, has_window]
    if layout.body.size > end - HEADER_SIZE:
        _need(HEADER_SIZE, layout.body.size, end, "the fixed-size fields", layout.field_cut_at(end))
    values = layout.body.unpack_from(view, HEADER_SIZE)
    _, lport, rport, laddr, raddr, tcp_state, send_seq, recv_seq, timestamp, mss, oflags, snd_ws, rcv_ws = values[:13]
    if not (lport and rport and tcp_state in VALID_TCP_STATES and oflags < 8 and max(snd_ws, rcv_ws) <= MAX_WSCALE):
        raise _fixed_field_error(layout, values)
    rest = values[13:]
    window = None
    if has_window:
        window = RepairWindow(*rest[:5])
        rest = rest[5:]
    family = _FAMILY_OF[version]
    off = HEADER_SIZE + layout.body.size
    bindtodevice, off = _short_string(view, off, end, "bindtodevice")
    congestion, off = _short_string(view, off, end, "congestion")
    sockopt_values = _FLAG_BITS[rest[0]] + rest[1:] + (bindtodevice, congestion)
    if end - off < _QUEUE_HEAD.size:
        _need(off, _QUEUE_HEAD.size, end, "the send queue header", "unsent_len" if end - off < 4 else "send_queue")
    unsent, send_len = _QUEUE_HEAD.unpack_from(view, off)
    if send_len > end - off - 8:
        _need(off + 8, send_len, end, "the send queue", "send_queue")
    if unsent > send_len:
        raise _bad(off, f"unsent_len {unsent} exceeds the send queue's {send_len} bytes", "unsent_len")
    send: Payload = view[off + 8 : off + 8 + send_len]  # read-only, as the bytes it views
    if not views:
        send = bytes(send)
    off += 8 + send_len
    if end - off < 4:
        _need(off, 4, end, "the receive queue length", "recv_queue")
    (recv_len,) = _U32.unpack_from(view, off)
    if recv_len > end - off - 4:
        _need(off + 4, recv_len, end, "the receive queue", "recv_queue")
    recv: Payload = view[off + 4 : off + 4 + recv_len]
    if not views:
        recv = bytes(recv)
    off += 4 + recv_len
    if image_version >= 2:
        if end - off < _MORE.size:
            _need(off, _MORE.size, end, "the version 2 socket options", _more_field_cut_at(end - off))
        more = _MORE.unpack_from(view, off)
        if more[0] >= len(_MORE_FLAG_BITS):
            raise _bad(off, f"unknown socket option flags 0x{more[0]:02x} (known: 0x{len(_MORE_FLAG_BITS) - 1:02x})",
                       "more_sockopts.flags")
        sockopt_values += _MORE_FLAG_BITS[more[0]] + more[1:]
        off += _MORE.size
    else:
        sockopt_values += _V1_MORE
    sockopts = SocketOptions(*_to_field_order(sockopt_values))
    sk_err, fin_received = 0, False
    if has_close:
        if end - off < _CLOSE.size:
            _need(off, _CLOSE.size, end, "the CLOSE record", "close.sk_err" if end - off < 2 else "close.flags")
        sk_err, close_flags = _CLOSE.unpack_from(view, off)
        if close_flags > 1:
            raise _bad(off + 2, f"unknown CLOSE record flags 0x{close_flags:02x} (known: 0x01)", "close.flags")
        if tcp_state != CLOSE_STATE or not (sk_err or close_flags):
            why = "an all-zero CLOSE record" if tcp_state == CLOSE_STATE else f"a CLOSE record in state {tcp_state}"
            raise _bad(off, f"{why} (it is written only in CLOSE, with an error or the peer's FIN)", "close.sk_err")
        fin_received = bool(close_flags)
        off += _CLOSE.size
    if off != end:
        raise _bad(off, f"{end - off} unexpected bytes between the receive queue and the checksum")
    # positionally, in the fields' order (tuple, tcp_state, send_seq, recv_seq, send_queue, unsent_len, recv_queue,
    # options, window, timestamp, sockopts, sk_err, fin_received): keywords cost half as much again
    return ConnectionState(
        ConnTuple(family, socket.inet_ntop(family, laddr), lport, socket.inet_ntop(family, raddr), rport),
        tcp_state, send_seq, recv_seq, send, unsent, recv,
        TcpOptions(mss, bool(oflags & 1), bool(oflags & 2), bool(oflags & 4), snd_ws, rcv_ws),
        window, timestamp, sockopts, sk_err, fin_received,
    )


def _more_field_cut_at(left: int) -> str:
    """The first field of version 2's record that does not fit in the `left` bytes there are."""
    if left < 1:
        return "more_sockopts.flags"
    ends = [*list(_MORE_OFFSETS.values())[1:], _MORE.size]
    return next(name for name, stop in zip(_MORE_OFFSETS, ends, strict=True) if stop > left)


def _fixed_field_error(layout: _FixedBody, unpacked: tuple[object, ...]) -> ImageError:
    """Which of the fixed-size fields that decoding checks at once is out of range, and where it is."""
    values: dict[str, Any] = dict(zip(layout.offsets, unpacked, strict=True))
    at = layout.offsets
    for name in ("local_port", "remote_port"):
        if values[f"tuple.{name}"] == 0:
            return _bad(at[f"tuple.{name}"], f"{name} is 0", f"tuple.{name}")
    state = values["tcp_state"]
    if state not in VALID_TCP_STATES:
        return _bad(at["tcp_state"], f"invalid TCP state {state} ({TCP_STATES.get(state, 'unknown')})", "tcp_state")
    flags = values["options.flags"]
    if flags >= 8:
        return _bad(at["options.flags"], f"unknown TCP option flags 0x{flags:02x} (known: 0x07)", "options.flags")
    name = "snd_wscale" if values["options.snd_wscale"] > MAX_WSCALE else "rcv_wscale"
    path = f"options.{name}"
    return _bad(at[path], f"{name} {values[path]} exceeds {MAX_WSCALE}", path)


def _short_string(view: memoryview, off: int, end: int, name: str) -> tuple[str, int]:
    if off < end:
        stop = off + 1 + view[off]
        if stop - off <= MAX_NAME + 1 and stop <= end:
            try:
                return str(view[off + 1 : stop], "utf-8"), stop
            except UnicodeDecodeError:
                pass  # worded below
    path = f"sockopts.{name}"
    _need(off, 1, end, f"the {name} length", path)
    length = view[off]
    if length > MAX_NAME:
        raise _bad(off, f"{name} length {length} exceeds {MAX_NAME}", path)
    _need(off + 1, length, end, name, path)
    try:
        text = str(view[off + 1 : off + 1 + length], "utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(off + 1 + exc.start, f"{name} is not UTF-8", path) from None
    return text, off + 1 + length


def _need(off: int, length: int, end: int, what: str, field: str) -> None:
    if length > end - off:
        raise _bad(off, f"{what} needs {length} bytes but the body has {max(end - off, 0)} left", field)


def _bad(offset: int, what: str, field: str | None = None) -> ImageError:
    return ImageError(f"bad connection image at byte {offset}: {what}", offset=offset, field=field)


def find_problem(state: ConnectionState) -> str | None:
    """The first field of `state` an image cannot hold, as "field: why" (field a path such as "window.snd_wnd"),
    or None if it encodes. Never raises."""
    problem = problem_of(state)
    return None if problem is None else problem[1]


def problem_of(state: ConnectionState) -> tuple[str | None, str] | None:
    """(the field's path, "field: why") for the first field of `state` an image cannot hold; the path is None when
    `state` is not a ConnectionState at all."""
    if not isinstance(state, ConnectionState):
        return None, f"{type(state).__name__} is not a ConnectionState"
    found = _field_problem(state)
    if found is None:
        return None
    field, label, why = found
    return field, f"{label}: {why}"


def _field_problem(state: ConnectionState) -> tuple[str, str, str] | None:
    """(field path, what the message calls it, why): the two differ only for a queue's length."""
    t = state.tuple
    if not isinstance(t, ConnTuple):
        return _named("tuple", f"{type(t).__name__} is not a ConnTuple")
    if t.family not in _IP_VERSION_OF:
        return _named("tuple.family", f"{t.family} is neither AF_INET nor AF_INET6")
    for name in ("local_addr", "remote_addr"):
        addr = getattr(t, name)
        try:
            socket.inet_pton(t.family, addr)
        except (OSError, TypeError, ValueError):
            return _named(f"tuple.{name}", f"{addr!r} is not an IPv{_IP_VERSION_OF[t.family]} address")
    checks: list[tuple[str, object, int, int]] = [
        ("tuple.local_port", t.local_port, 1, 0xFFFF),
        ("tuple.remote_port", t.remote_port, 1, 0xFFFF),
        ("send_seq", state.send_seq, 0, U32_MAX),
        ("recv_seq", state.recv_seq, 0, U32_MAX),
        ("timestamp", state.timestamp, 0, U32_MAX),
    ]
    if not isinstance(state.tcp_state, int) or state.tcp_state not in VALID_TCP_STATES:
        why = f"{state.tcp_state!r} is not a TCP state an image can hold ({sorted(VALID_TCP_STATES)})"
        return _named("tcp_state", why)
    o = state.options
    if not isinstance(o, TcpOptions):
        return _named("options", f"{type(o).__name__} is not a TcpOptions")
    checks += [
        ("options.mss", o.mss, 0, 0xFFFF),
        ("options.snd_wscale", o.snd_wscale, 0, MAX_WSCALE),
        ("options.rcv_wscale", o.rcv_wscale, 0, MAX_WSCALE),
    ]
    w = state.window
    if w is not None:
        if not isinstance(w, RepairWindow):
            return _named("window", f"{type(w).__name__} is neither a RepairWindow nor None")
        checks += [(f"window.{name}", getattr(w, name), 0, U32_MAX) for name in WINDOW_FIELDS]
    so = state.sockopts
    if not isinstance(so, SocketOptions):
        return _named("sockopts", f"{type(so).__name__} is not a SocketOptions")
    checks += [(f"sockopts.{name}", getattr(so, name), -(2**31), 2**31 - 1) for name in SOCKOPT_INTS]
    checks += [(f"more_sockopts.{name}", getattr(so, name), -(2**31), 2**31 - 1) for name in MORE_SOCKOPT_INTS]
    checks += [(f"more_sockopts.{name}", getattr(so, name), 0, 2**63 - 1) for name in MORE_SOCKOPT_LONGS]
    for name, queue in (("send_queue", state.send_queue), ("recv_queue", state.recv_queue)):
        if not isinstance(queue, (bytes, bytearray, memoryview)):
            return _named(name, f"{type(queue).__name__} is not bytes")
        checks.append((name, len(queue), 0, U32_MAX))
    checks.append(("unsent_len", state.unsent_len, 0, len(state.send_queue)))
    if (state.sk_err or state.fin_received) and state.tcp_state != CLOSE_STATE:
        return _named("close.sk_err", f"a pending error or the peer's FIN is kept only in CLOSE, not in state "
                                      f"{state.tcp_state}")
    checks.append(("close.sk_err", state.sk_err, 0, MAX_ERRNO))
    for field, value, low, high in checks:
        # a queue is checked by its length
        label = f"len({field})" if field in ("send_queue", "recv_queue") else field
        if not isinstance(value, int):
            return field, label, f"{value!r} is not an integer"
        if not low <= value <= high:
            return field, label, f"{value} is not in {low}..{high}"
    for name in ("bindtodevice", "congestion"):
        field = f"sockopts.{name}"
        text = getattr(so, name)
        if not isinstance(text, str):
            return _named(field, f"{text!r} is not a string")
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            return _named(field, f"{text!r} cannot be encoded as UTF-8")
        if size > MAX_NAME:
            return _named(field, f"{text!r} is {size} bytes of UTF-8, more than {MAX_NAME}")
    return None


def _named(field: str, why: str) -> tuple[str, str, str]:
    return field, field, why
