"""The nf_tables objects of the lock and the messages that make them: table `inet sockrepair`, one verdict map of
locked 4-tuples per IP version (elements with timeouts), and base chains whose rules drop a packet when its tuple, read
in either direction, is in a map -- and send what the peer sends to its mover's recorder before dropping it.

    table inet sockrepair {
        map conn4 { type ipv4_addr . inet_service . ipv4_addr . inet_service : verdict; flags timeout; timeout 60s }
        map conn6 { type ipv6_addr . inet_service . ipv6_addr . inet_service : verdict; flags timeout; timeout 60s }
        chain prerouting { type filter hook prerouting priority -300; meta mark 0xc114 accept
            <peer side, conn4> vmap @conn4; <peer side, conn4> @conn4 drop; (the same for conn6) }
        chain input  { type filter hook input  priority -300; meta mark 0xc114 accept
            <socket side, conn4> @conn4 drop; <peer side, conn4> vmap @conn4; <peer side, conn4> @conn4 drop; (conn6) }
        chain output { type filter hook output priority -300; meta mark 0xc114 accept; <socket side> @connX drop }
        chain keep_G { log group G snaplen 65535 queue-threshold 1 drop }     (one per recorder's group G, on demand)
    }

where "socket side" and "peer side", for conn4 (likewise conn6), are:
    meta nfproto ipv4 meta l4proto tcp ip saddr . th sport . ip daddr . th dport
    meta nfproto ipv4 meta l4proto tcp ip daddr . th dport . ip saddr . th sport

An element is (local addr, local port, remote addr, remote port) as the locked socket sees it, and its verdict: `jump
keep_G` when a mover records on nfnetlink_log group G (lock/record.py; each mover binds a group of its own, so that
several can move connections of one namespace at once and each gets only its own peers' packets), `drop` when nothing
records. What the peer sends is stopped at prerouting, before the kernel looks up a socket for it (early demux would
tie it to the frozen socket), and copied whole to the group so that the mover can deliver it to the restored socket
(lock/inject.py) instead of leaving the peer to its retransmission timeout. The input chain does the same for the peer
side: a packet that passed prerouting an instant before the lock was taken can reach input after it, and without a
copy it would be lost until the peer retransmits. The output chain lets the peer side pass so that a peer on this host
reaches prerouting too; it is dropped there. Packets marked SOCCR_MARK (0xC114, the mark criu's libsoccr gives the
packets it makes, and that sockrepair gives the packets it delivers) pass every chain.

`jump`, not `goto`: a keep chain ends in drop, and a chain emptied behind our back (`nft flush chain`) would, after a
goto, end in the base chain's policy (accept); after a jump it returns to the peer-side rule that follows the vmap,
which drops every locked tuple. Not an element's own `accept` or `return` (one another tool added): those end the
base chain, and its packets pass until a lock() writes the verdict back as `drop`. The socket side only ever drops:
its rules test membership.
Priority -300 (raw) runs before conntrack (-200), so a dropped packet is never tracked and nothing answers it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sockrepair.lock import nfconst as c
from sockrepair.lock.netlink import (
    Request,
    attr,
    attr_be32,
    attr_be64,
    attr_str,
    attrs,
    cstr,
    nest,
)
from sockrepair.state import ConnTuple

TABLE = "sockrepair"
FAMILY = c.NFPROTO_INET
PRIORITY = -300
# criu's soccr/soccr.h SOCCR_MARK: the packets libsoccr sends for a restore, and those sockrepair delivers, pass.
SOCCR_MARK = 0xC114
# The first nfnetlink_log group a recorder tries (any u16); a group bound in the namespace is skipped for the next.
NFLOG_GROUP = 0xC114
# How many groups from NFLOG_GROUP a recorder tries: as many movers can record in one namespace at once.
NFLOG_GROUPS = 64
KEEP_CHAIN_PREFIX = "keep_"
SNAPLEN = 0xFFFF
TABLE_COMMENT = "sockrepair network lock: `sockrepair locks` lists it, `sockrepair unlock --everything` removes it"
# The nested attribute holding a message's elements has a u16 length.
_MAX_ELEMENTS_BYTES = 60000


@dataclass(frozen=True, eq=False)
class Family:
    """One IP version: its set, where addresses sit in its header, and how keys are laid out (each field padded to
    a 32-bit register, as the payload expressions load them). Compared by identity: there are two."""

    set_name: str
    set_id: int
    nfproto: int
    sock_family: int
    addr_len: int
    saddr_offset: int
    daddr_offset: int
    nft_addr_type: int

    @property
    def key_len(self) -> int:
        return 2 * (self.addr_len + 4)

    @property
    def key_struct(self) -> struct.Struct:
        return struct.Struct(f">{self.addr_len}sH2x{self.addr_len}sH2x")


V4 = Family("conn4", 1, c.NFPROTO_IPV4, socket.AF_INET, 4, 12, 16, c.NFT_TYPE_IPADDR)
V6 = Family("conn6", 2, c.NFPROTO_IPV6, socket.AF_INET6, 16, 8, 24, c.NFT_TYPE_IP6ADDR)
FAMILIES = (V4, V6)
_KEY4, _KEY6 = V4.key_struct, V6.key_struct


def encode_key(conn: ConnTuple, packed: dict[str, bytes] | None = None) -> tuple[Family, bytes]:
    """The set and key that lock `conn`, matched as the packets carry it (v4-mapped IPv6 becomes IPv4). `packed`
    caches binary addresses across calls: a batch usually repeats a few local addresses."""
    if conn.family == socket.AF_INET6:
        conn = conn.wire()
    fam = V4 if conn.family == socket.AF_INET else V6 if conn.family == socket.AF_INET6 else None
    if fam is None:
        raise ValueError(f"not an IPv4/IPv6 connection tuple: {conn!r}")
    cache = packed if packed is not None else {}
    local = cache.get(conn.local_addr)
    if local is None:
        local = cache[conn.local_addr] = socket.inet_pton(fam.sock_family, conn.local_addr)
    remote = cache.get(conn.remote_addr)
    if remote is None:
        remote = cache[conn.remote_addr] = socket.inet_pton(fam.sock_family, conn.remote_addr)
    return fam, (_KEY4 if fam is V4 else _KEY6).pack(local, conn.local_port, remote, conn.remote_port)


def decode_key(fam: Family, key: bytes | memoryview) -> ConnTuple:
    local, lport, remote, rport = fam.key_struct.unpack(bytes(key))
    return ConnTuple(
        fam.sock_family,
        socket.inet_ntop(fam.sock_family, local),
        lport,
        socket.inet_ntop(fam.sock_family, remote),
        rport,
    )


# --- the table, its sets and chains ------------------------------------------------------------------------------


def _comment(text: str) -> bytes:
    raw = text.encode()
    return bytes((c.NFTNL_UDATA_TABLE_COMMENT, len(raw) + 1)) + raw + b"\0"


def _set_key_type(fam: Family) -> int:
    key = 0
    for sub in (fam.nft_addr_type, c.NFT_TYPE_INET_SERVICE, fam.nft_addr_type, c.NFT_TYPE_INET_SERVICE):
        key = (key << c.NFT_TYPE_BITS) | sub
    return key


def _expr(name: str, *data: bytes) -> bytes:
    return nest(c.NFTA_LIST_ELEM, attr_str(c.NFTA_EXPR_NAME, name), nest(c.NFTA_EXPR_DATA, *data))


def _meta(key: int, dreg: int) -> bytes:
    return _expr("meta", attr_be32(c.NFTA_META_KEY, key), attr_be32(c.NFTA_META_DREG, dreg))


def _cmp_eq(sreg: int, value: bytes) -> bytes:
    return _expr(
        "cmp",
        attr_be32(c.NFTA_CMP_SREG, sreg),
        attr_be32(c.NFTA_CMP_OP, c.NFT_CMP_EQ),
        nest(c.NFTA_CMP_DATA, attr(c.NFTA_DATA_VALUE, value)),
    )


def _payload(base: int, offset: int, length: int, dreg: int) -> bytes:
    return _expr(
        "payload",
        attr_be32(c.NFTA_PAYLOAD_DREG, dreg),
        attr_be32(c.NFTA_PAYLOAD_BASE, base),
        attr_be32(c.NFTA_PAYLOAD_OFFSET, offset),
        attr_be32(c.NFTA_PAYLOAD_LEN, length),
    )


def _verdict(code: int) -> bytes:
    return _expr(
        "immediate",
        attr_be32(c.NFTA_IMMEDIATE_DREG, c.NFT_REG_VERDICT),
        nest(c.NFTA_IMMEDIATE_DATA, nest(c.NFTA_DATA_VERDICT, attr_be32(c.NFTA_VERDICT_CODE, code))),
    )


def _log_to_group(group: int) -> bytes:
    return _expr(
        "log",
        attr(c.NFTA_LOG_GROUP, struct.pack(">H", group)),
        attr_be32(c.NFTA_LOG_SNAPLEN, SNAPLEN),
        attr(c.NFTA_LOG_QTHRESHOLD, struct.pack(">H", 1)),
    )


def mark_accept_expressions() -> bytes:
    """meta mark SOCCR_MARK accept (the mark is compared in host byte order, as the meta expression loads it)."""
    return nest(
        c.NFTA_RULE_EXPRESSIONS,
        _meta(c.NFT_META_MARK, c.NFT_REG_1),
        _cmp_eq(c.NFT_REG_1, struct.pack("=I", SOCCR_MARK)),
        _verdict(c.NF_ACCEPT),
    )


def rule_expressions(fam: Family, peer_side: bool, vmap: bool = False) -> bytes:
    """The rule matching `fam` TCP packets whose (saddr, sport, daddr, dport) -- or, for `peer_side`, (daddr, dport,
    saddr, sport) -- is a key of the family's map: with `vmap` the element's verdict applies (jump to a keep chain,
    or drop), without it the packet is dropped (a lookup on a map tests membership)."""
    saddr = (c.NFT_PAYLOAD_NETWORK_HEADER, fam.saddr_offset, fam.addr_len)
    daddr = (c.NFT_PAYLOAD_NETWORK_HEADER, fam.daddr_offset, fam.addr_len)
    sport = (c.NFT_PAYLOAD_TRANSPORT_HEADER, 0, 2)
    dport = (c.NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2)
    fields = (daddr, dport, saddr, sport) if peer_side else (saddr, sport, daddr, dport)
    exprs = [
        _meta(c.NFT_META_NFPROTO, c.NFT_REG_1),
        _cmp_eq(c.NFT_REG_1, bytes((fam.nfproto,))),
        _meta(c.NFT_META_L4PROTO, c.NFT_REG_1),
        _cmp_eq(c.NFT_REG_1, bytes((socket.IPPROTO_TCP,))),
    ]
    reg = c.NFT_REG32_00
    for base, offset, length in fields:
        exprs.append(_payload(base, offset, length, reg))
        reg += (length + 3) // 4
    lookup = [attr_str(c.NFTA_LOOKUP_SET, fam.set_name), attr_be32(c.NFTA_LOOKUP_SREG, c.NFT_REG32_00)]
    if vmap:
        exprs.append(_expr("lookup", *lookup, attr_be32(c.NFTA_LOOKUP_DREG, c.NFT_REG_VERDICT)))
    else:
        exprs.append(_expr("lookup", *lookup))
        exprs.append(_verdict(c.NF_DROP))
    return nest(c.NFTA_RULE_EXPRESSIONS, *exprs)


# (chain, hook, [(peer_side, vmap)]): the rules of each chain, per family, after the mark-accept rule. Each vmap rule
# is followed by a plain drop of the same tuples, which only a jump returning from an emptied keep chain reaches.
CHAINS = (
    ("prerouting", c.NF_INET_PRE_ROUTING, ((True, True), (True, False))),
    ("input", c.NF_INET_LOCAL_IN, ((False, False), (True, True), (True, False))),
    ("output", c.NF_INET_LOCAL_OUT, ((False, False),)),
)
RULE_COUNT = sum(1 + len(FAMILIES) * len(rules) for _chain, _hook, rules in CHAINS)
BASE_CHAINS = frozenset(chain for chain, _hook, _rules in CHAINS)


def keep_chain(group: int) -> str:
    """The regular chain that copies a packet to nfnetlink_log `group` and drops it."""
    return f"{KEEP_CHAIN_PREFIX}{group}"


def group_of_chain(name: str) -> int | None:
    """The group of a keep chain's name (keep_chain()); None for any other name."""
    digits = name.removeprefix(KEEP_CHAIN_PREFIX)
    if digits == name or not digits.isdigit() or str(int(digits)) != digits or int(digits) > 0xFFFF:
        return None
    return int(digits)


def setup_requests(default_timeout_ms: int) -> list[Request]:
    """Create what is missing and replace the base chains' rules, in one transaction: run by any number of processes
    at once it still leaves exactly one copy of each rule, and never touches the maps' elements."""
    table = attr_str(c.NFTA_TABLE_NAME, TABLE)
    reqs = [
        Request(
            c.NFT_MSG_NEWTABLE,
            c.NLM_F_CREATE,
            FAMILY,
            table + attr_be32(c.NFTA_TABLE_FLAGS, 0) + attr(c.NFTA_TABLE_USERDATA, _comment(TABLE_COMMENT)),
            f"create table inet {TABLE}",
        )
    ]
    for fam in FAMILIES:
        reqs.append(
            Request(
                c.NFT_MSG_NEWSET,
                c.NLM_F_CREATE,
                FAMILY,
                attr_str(c.NFTA_SET_TABLE, TABLE)
                + attr_str(c.NFTA_SET_NAME, fam.set_name)
                + attr_be32(c.NFTA_SET_FLAGS, c.NFT_SET_MAP | c.NFT_SET_TIMEOUT)
                + attr_be32(c.NFTA_SET_KEY_TYPE, _set_key_type(fam))
                + attr_be32(c.NFTA_SET_KEY_LEN, fam.key_len)
                + attr_be32(c.NFTA_SET_DATA_TYPE, c.NFT_DATA_VERDICT)
                + attr_be32(c.NFTA_SET_ID, fam.set_id)
                # Elements added by other tools without a timeout get this one: nothing here is forever.
                + attr_be64(c.NFTA_SET_TIMEOUT, default_timeout_ms),
                f"create map inet {TABLE} {fam.set_name}",
            )
        )
    for chain, hook, rules in CHAINS:
        chain_attrs = attr_str(c.NFTA_CHAIN_TABLE, TABLE) + attr_str(c.NFTA_CHAIN_NAME, chain)
        reqs.append(
            Request(
                c.NFT_MSG_NEWCHAIN,
                c.NLM_F_CREATE,
                FAMILY,
                chain_attrs
                + nest(
                    c.NFTA_CHAIN_HOOK,
                    attr_be32(c.NFTA_HOOK_HOOKNUM, hook),
                    attr_be32(c.NFTA_HOOK_PRIORITY, PRIORITY),
                )
                + attr_str(c.NFTA_CHAIN_TYPE, "filter"),
                f"create chain inet {TABLE} {chain}",
            )
        )
        rule_attrs = attr_str(c.NFTA_RULE_TABLE, TABLE) + attr_str(c.NFTA_RULE_CHAIN, chain)
        reqs.append(Request(c.NFT_MSG_DELRULE, 0, FAMILY, rule_attrs, f"flush chain inet {TABLE} {chain}"))
        reqs.append(Request(c.NFT_MSG_NEWRULE, c.NLM_F_CREATE | c.NLM_F_APPEND, FAMILY,
                            rule_attrs + mark_accept_expressions(), f"add rule inet {TABLE} {chain} (mark accept)"))
        for fam in FAMILIES:
            for peer_side, vmap in rules:
                reqs.append(
                    Request(
                        c.NFT_MSG_NEWRULE,
                        c.NLM_F_CREATE | c.NLM_F_APPEND,
                        FAMILY,
                        rule_attrs + rule_expressions(fam, peer_side, vmap),
                        f"add rule inet {TABLE} {chain} ({'vmap ' if vmap else ''}@{fam.set_name})",
                    )
                )
    return reqs


def keep_chain_requests(group: int) -> list[Request]:
    """Create the keep chain of `group` if missing and make its one rule `log group G snaplen 65535
    queue-threshold 1 drop` (flushed first: any number of processes doing this at once leave one rule)."""
    chain = keep_chain(group)
    rule_attrs = attr_str(c.NFTA_RULE_TABLE, TABLE) + attr_str(c.NFTA_RULE_CHAIN, chain)
    return [
        Request(c.NFT_MSG_NEWCHAIN, c.NLM_F_CREATE, FAMILY,
                attr_str(c.NFTA_CHAIN_TABLE, TABLE) + attr_str(c.NFTA_CHAIN_NAME, chain),
                f"create chain inet {TABLE} {chain}"),
        Request(c.NFT_MSG_DELRULE, 0, FAMILY, rule_attrs, f"flush chain inet {TABLE} {chain}"),
        Request(c.NFT_MSG_NEWRULE, c.NLM_F_CREATE | c.NLM_F_APPEND, FAMILY,
                rule_attrs + nest(c.NFTA_RULE_EXPRESSIONS, _log_to_group(group), _verdict(c.NF_DROP)),
                f"add rule inet {TABLE} {chain} (log group {group} drop)"),
    ]


def replace_sets_requests() -> list[Request]:
    """Empty the base chains and delete sets conn4/conn6 of an older layout (plain sets), each only if it holds no
    element (NLM_F_NONREC: EBUSY otherwise, and the whole transaction is refused); setup_requests() follow in the
    same transaction, so no packet ever meets a half-built table."""
    reqs = [Request(c.NFT_MSG_DELRULE, 0, FAMILY,
                    attr_str(c.NFTA_RULE_TABLE, TABLE) + attr_str(c.NFTA_RULE_CHAIN, chain),
                    f"flush chain inet {TABLE} {chain}") for chain, _hook, _rules in CHAINS]
    reqs += [Request(c.NFT_MSG_DELSET, c.NLM_F_NONREC, FAMILY,
                     attr_str(c.NFTA_SET_TABLE, TABLE) + attr_str(c.NFTA_SET_NAME, fam.set_name),
                     f"delete set inet {TABLE} {fam.set_name} (older layout, only if empty)") for fam in FAMILIES]
    return reqs


def delete_table_request(destroy: bool) -> Request:
    return Request(
        c.NFT_MSG_DESTROYTABLE if destroy else c.NFT_MSG_DELTABLE,
        0,
        FAMILY,
        attr_str(c.NFTA_TABLE_NAME, TABLE),
        f"delete table inet {TABLE}",
    )


# --- elements -------------------------------------------------------------------------------------------------------


def group_keys(items: Iterable[ConnTuple]) -> dict[Family, list[bytes]]:
    """Keys per set, duplicates dropped (a transaction must not name an element twice)."""
    out: dict[Family, dict[bytes, None]] = {V4: {}, V6: {}}
    packed: dict[str, bytes] = {}
    v4, pack4 = out[V4], _KEY4.pack
    for conn in items:
        if conn.family == socket.AF_INET:
            # encode_key() inlined for the common case: a batch of 10,000 spent 18 ms in the calls alone
            local, remote = packed.get(conn.local_addr), packed.get(conn.remote_addr)
            if local is None:
                local = packed[conn.local_addr] = socket.inet_pton(socket.AF_INET, conn.local_addr)
            if remote is None:
                remote = packed[conn.remote_addr] = socket.inet_pton(socket.AF_INET, conn.remote_addr)
            v4[pack4(local, conn.local_port, remote, conn.remote_port)] = None
        else:
            fam, key = encode_key(conn, packed)
            out[fam][key] = None
    return {fam: list(keys) for fam, keys in out.items() if keys}


def _element_prefix(fam: Family, size_after_key: int) -> bytes:
    value = 4 + fam.key_len
    key_nest = 4 + value
    return (
        struct.pack("=HH", 4 + key_nest + size_after_key, c.NFTA_LIST_ELEM | c.NLA_F_NESTED)
        + struct.pack("=HH", key_nest, c.NFTA_SET_ELEM_KEY | c.NLA_F_NESTED)
        + struct.pack("=HH", value, c.NFTA_DATA_VALUE)
    )


def _element_messages(msg_type: int, flags: int, fam: Family, elems: Iterator[bytes], verb: str) -> list[Request]:
    head = attr_str(c.NFTA_SET_ELEM_LIST_TABLE, TABLE) + attr_str(c.NFTA_SET_ELEM_LIST_SET, fam.set_name)
    reqs: list[Request] = []
    chunk: list[bytes] = []
    size = 0

    def flush() -> None:
        reqs.append(
            Request(
                msg_type,
                flags,
                FAMILY,
                head + nest(c.NFTA_SET_ELEM_LIST_ELEMENTS, *chunk),
                f"{verb} {len(chunk)} element(s) of set inet {TABLE} {fam.set_name}",
            )
        )

    for elem in elems:
        if size + len(elem) > _MAX_ELEMENTS_BYTES:
            flush()
            chunk, size = [], 0
        chunk.append(elem)
        size += len(elem)
    if chunk:
        flush()
    return reqs


def verdict_data(group: int | None) -> bytes:
    """An element's data: `jump keep_G` for a recorder's `group`, `drop` for None."""
    if group is None:
        verdict = attr_be32(c.NFTA_VERDICT_CODE, c.NF_DROP)
    else:
        verdict = attr_be32(c.NFTA_VERDICT_CODE, c.NFT_JUMP) + attr_str(c.NFTA_VERDICT_CHAIN, keep_chain(group))
    return nest(c.NFTA_SET_ELEM_DATA, nest(c.NFTA_DATA_VERDICT, verdict))


Verdict = tuple[int, str]  # (NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN or "")


def verdict_of(group: int | None) -> Verdict:
    """The verdict verdict_data(group) gives an element, as element_verdict() reads it back."""
    return (c.NF_DROP, "") if group is None else (c.NFT_JUMP, keep_chain(group))


def element_verdict(data: bytes | memoryview | None) -> Verdict | None:
    """The verdict in an element's NFTA_SET_ELEM_DATA as the kernel dumps it; None without one."""
    if data is None:
        return None
    verdict = attrs(data).get(c.NFTA_DATA_VERDICT)
    if verdict is None:
        return None
    fields = attrs(verdict)
    code, chain = fields.get(c.NFTA_VERDICT_CODE), fields.get(c.NFTA_VERDICT_CHAIN)
    if code is None:
        return None
    return int(struct.unpack(">i", code)[0]), cstr(chain) if chain is not None else ""


def verdict_group(verdict: Verdict | None) -> int | None:
    """The group an element's verdict sends its packets to (`jump keep_G`); None for `drop` and for any other
    verdict (an element another tool added), which lock() writes back as `drop`."""
    if verdict is None or verdict[0] != c.NFT_JUMP:
        return None
    return group_of_chain(verdict[1])


def add_element_requests(keys: dict[Family, list[bytes]], timeout_ms: int, userdata: bytes,
                         group: int | None = None) -> list[Request]:
    """Elements with a timeout, the owner's comment and the verdict of `group` (verdict_data()). Adding an element
    that exists with the same verdict renews it (kernel 6.10+): the kernel compares both values with the element's,
    so the expiration is sent too, or a renewal with the same timeout would change nothing. An element that exists
    with another verdict makes the kernel refuse the transaction (EEXIST): delete it first, in the same one."""
    suffix = (
        attr_be64(c.NFTA_SET_ELEM_TIMEOUT, timeout_ms)
        + attr_be64(c.NFTA_SET_ELEM_EXPIRATION, timeout_ms)
        + verdict_data(group)
        + attr(c.NFTA_SET_ELEM_USERDATA, userdata)
    )
    reqs = []
    for fam, fam_keys in keys.items():
        prefix = _element_prefix(fam, len(suffix))
        elems = (prefix + key + suffix for key in fam_keys)
        reqs += _element_messages(c.NFT_MSG_NEWSETELEM, c.NLM_F_CREATE, fam, elems, "add")
    return reqs


def delete_element_requests(keys: dict[Family, list[bytes]], destroy: bool) -> list[Request]:
    """With `destroy` (NFT_MSG_DESTROYSETELEM, kernel 6.3+) a missing element is skipped instead of failing."""
    msg_type = c.NFT_MSG_DESTROYSETELEM if destroy else c.NFT_MSG_DELSETELEM
    reqs = []
    for fam, fam_keys in keys.items():
        prefix = _element_prefix(fam, 0)
        reqs += _element_messages(msg_type, 0, fam, (prefix + key for key in fam_keys), "delete")
    return reqs


def dump_elements_payload(fam: Family) -> bytes:
    return attr_str(c.NFTA_SET_ELEM_LIST_TABLE, TABLE) + attr_str(c.NFTA_SET_ELEM_LIST_SET, fam.set_name)


def dump_rules_payload() -> bytes:
    return attr_str(c.NFTA_RULE_TABLE, TABLE)
