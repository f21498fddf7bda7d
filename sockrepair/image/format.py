"""The binary connection image, defined with construct: these definitions ARE the format (docs/image-format.md walks
through them byte by byte). Parsing or building through construct costs 150-250 us, too much for the migration hot
path, so sockrepair.image._codec is a struct codec of the same layout, and the unit tests hold it to these definitions,
byte for byte on building and verdict for verdict on parsing."""

from __future__ import annotations

import zlib

import xxhash
from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    Check,
    Checksum,
    Const,
    Default,
    ExprValidator,
    Flag,
    GreedyBytes,
    If,
    Int8ub,
    Int16ub,
    Int32sb,
    Int32ub,
    Int64sb,
    Int64ub,
    OneOf,
    PascalString,
    Prefixed,
    RawCopy,
    Rebuild,
    Struct,
    Switch,
    Terminated,
    len_,
    this,
)

from sockrepair.image.layout import (
    CLOSE_STATE,
    FIRST_XXH3,
    MAGIC,
    MAX_NAME,
    MAX_WSCALE,
    MORE_SOCKOPT_FLAGS,
    MORE_SOCKOPT_INTS,
    MORE_SOCKOPT_LONGS,
    SOCKOPT_FLAGS,
    SOCKOPT_INTS,
    VALID_TCP_STATES,
    VERSION,
    VERSIONS,
    WINDOW_FIELDS,
)

Port = ExprValidator(Int16ub, lambda port, _: port != 0)
ShortString = ExprValidator(PascalString(Int8ub, "utf8"), lambda text, _: len(text.encode()) <= MAX_NAME)

ConnTupleRecord = Struct(
    "ip_version" / OneOf(Int8ub, [4, 6]),
    "local_port" / Port,
    "remote_port" / Port,
    "local_addr" / Switch(this.ip_version, {4: Bytes(4), 6: Bytes(16)}),
    "remote_addr" / Switch(this.ip_version, {4: Bytes(4), 6: Bytes(16)}),
)

TcpOptionsRecord = Struct(
    "mss" / Int16ub,
    # BitStruct lists the most significant bit first: sack is bit 0.
    "flags" / BitStruct("reserved" / Const(0, BitsInteger(5)), "wscale" / Flag, "timestamps" / Flag, "sack" / Flag),
    "snd_wscale" / ExprValidator(Int8ub, lambda scale, _: scale <= MAX_WSCALE),
    "rcv_wscale" / ExprValidator(Int8ub, lambda scale, _: scale <= MAX_WSCALE),
)

RepairWindowRecord = Struct(*(name / Int32ub for name in WINDOW_FIELDS))

SocketOptionsRecord = Struct(
    "flags" / BitStruct(*(name / Flag for name in reversed(SOCKOPT_FLAGS))),  # nodelay is bit 0
    *(name / Int32sb for name in SOCKOPT_INTS),
    "bindtodevice" / ShortString,
    "congestion" / ShortString,
)

# Version 2: the options version 1 had no field for (sockrepair.engine.registry lists each).
MoreSocketOptionsRecord = Struct(
    "flags" / BitStruct("reserved" / Const(0, BitsInteger(8 - len(MORE_SOCKOPT_FLAGS))),
                        *(name / Flag for name in reversed(MORE_SOCKOPT_FLAGS))),  # oobinline is bit 0
    *(name / Int32sb for name in MORE_SOCKOPT_INTS),
    *(name / Int64sb for name in MORE_SOCKOPT_LONGS),
)

# Version 3: only with header flag bit 1, only in CLOSE, and never all zero (layout.FLAG_CLOSE).
CloseRecord = Struct(
    "sk_err" / Int16ub,
    "flags" / BitStruct("reserved" / Const(0, BitsInteger(7)), "fin_received" / Flag),
)

ConnectionStateRecord = Struct(
    "tuple" / ConnTupleRecord,
    "tcp_state" / OneOf(Int8ub, sorted(VALID_TCP_STATES)),
    "send_seq" / Int32ub,
    "recv_seq" / Int32ub,
    "timestamp" / Int32ub,
    "options" / TcpOptionsRecord,
    "window" / If(this._.flags.window, RepairWindowRecord),
    "sockopts" / SocketOptionsRecord,
    "unsent_len" / Int32ub,
    "send_queue" / Prefixed(Int32ub, GreedyBytes),
    Check(this.unsent_len <= len_(this.send_queue)),
    "recv_queue" / Prefixed(Int32ub, GreedyBytes),
    "more_sockopts" / If(this._.version >= 2, MoreSocketOptionsRecord),
    "close" / If(this._.flags.close, CloseRecord),
    Check(lambda ctx: ctx.close is None or (ctx.tcp_state == CLOSE_STATE
                                            and bool(ctx.close.sk_err or ctx.close.flags.fin_received))),
    Terminated,
)

HeaderFlags = BitStruct("reserved" / Const(0, BitsInteger(14)), "close" / Flag, "window" / Flag)

ConnectionImage = Struct(
    "signed"
    / RawCopy(
        Struct(
            "magic" / Const(MAGIC),
            # images are built at VERSION; every version ever written is read
            "version" / Default(OneOf(Int16ub, list(VERSIONS)), VERSION),
            "flags" / Rebuild(HeaderFlags, lambda ctx: {"window": ctx.body["window"] is not None,
                                                        "close": ctx.body.get("close") is not None}),
            Check(lambda ctx: ctx.version >= 3 or not ctx.flags.close),
            "body" / Prefixed(Int32ub, ConnectionStateRecord),
        )
    ),
    # versions 1 and 2: CRC-32 (zlib's, IEEE 802.3); version 3: XXH3-64 (seed 0), of every byte before the trailer
    "crc32" / If(lambda ctx: ctx.signed.value.version < FIRST_XXH3, Checksum(Int32ub, zlib.crc32, this.signed.data)),
    "xxh3_64" / If(lambda ctx: ctx.signed.value.version >= FIRST_XXH3,
                   Checksum(Int64ub, xxhash.xxh3_64_intdigest, this.signed.data)),
    Terminated,
)
