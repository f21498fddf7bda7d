"""The nf_tables messages of the lock, checked byte by byte without a kernel."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockrepair.errors import LockError
from sockrepair.lock import nfconst as c
from sockrepair.lock import ruleset
from sockrepair.lock.locker import MAX_TTL, LockRecord, as_tuples, ttl_ms
from sockrepair.lock.netlink import (
    _parse_error,
    attr,
    attr_str,
    attrs,
    check_netns_name,
    iter_attrs,
    nest,
)
from sockrepair.lock.owner import (
    MAX_OWNER_BYTES,
    decode_owner,
    default_owner,
    encode_owner,
)
from sockrepair.state import ConnTuple

T4 = ConnTuple(socket.AF_INET, "10.0.0.1", 1000, "10.0.0.2", 2000)
T6 = ConnTuple(socket.AF_INET6, "fd00::1", 1000, "fd00::2", 2000)
MAPPED = ConnTuple(socket.AF_INET6, "::ffff:10.0.0.1", 1000, "::ffff:10.0.0.2", 2000)

ports = st.integers(1, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


def test_ipv4_key_is_four_register_aligned_fields() -> None:
    fam, key = ruleset.encode_key(T4)
    assert fam is ruleset.V4
    assert key == bytes([10, 0, 0, 1]) + b"\x03\xe8\0\0" + bytes([10, 0, 0, 2]) + b"\x07\xd0\0\0"
    assert len(key) == fam.key_len == 16


def test_v4_mapped_locks_the_ipv4_wire_tuple() -> None:
    assert ruleset.encode_key(MAPPED) == ruleset.encode_key(T4)
    assert ruleset.group_keys([T4, MAPPED, T4]) == {ruleset.V4: [ruleset.encode_key(T4)[1]]}


@given(v4, ports, v4, ports)
def test_ipv4_key_roundtrip(la: str, lp: int, ra: str, rp: int) -> None:
    conn = ConnTuple(socket.AF_INET, la, lp, ra, rp)
    assert ruleset.decode_key(*ruleset.encode_key(conn)) == conn


@given(v6, ports, v6, ports)
def test_ipv6_key_roundtrip(la: str, lp: int, ra: str, rp: int) -> None:
    conn = ConnTuple(socket.AF_INET6, la, lp, ra, rp)
    fam, key = ruleset.encode_key(conn)
    back = ruleset.decode_key(fam, key)
    assert ruleset.encode_key(back) == (fam, key)
    assert (back.family, back.local_port, back.remote_port) == (conn.wire().family, lp, rp)
    assert len(key) == (16 if fam is ruleset.V4 else 40)


def _exprs(fam: ruleset.Family, peer_side: bool) -> list[tuple[str, dict[int, memoryview]]]:
    [(kind, body)] = list(iter_attrs(ruleset.rule_expressions(fam, peer_side)))
    assert kind == c.NFTA_RULE_EXPRESSIONS
    out = []
    for _k, expr in iter_attrs(body):
        fields = attrs(expr)
        out.append((bytes(fields[c.NFTA_EXPR_NAME]).rstrip(b"\0").decode(), attrs(fields[c.NFTA_EXPR_DATA])))
    return out


def _u32(v: memoryview) -> int:
    return int(struct.unpack(">I", v)[0])


@pytest.mark.parametrize(
    ("fam", "peer_side", "loads"),
    [
        (ruleset.V4, False, [(1, 12, 4, 8), (2, 0, 2, 9), (1, 16, 4, 10), (2, 2, 2, 11)]),
        (ruleset.V4, True, [(1, 16, 4, 8), (2, 2, 2, 9), (1, 12, 4, 10), (2, 0, 2, 11)]),
        (ruleset.V6, False, [(1, 8, 16, 8), (2, 0, 2, 12), (1, 24, 16, 13), (2, 2, 2, 17)]),
        (ruleset.V6, True, [(1, 24, 16, 8), (2, 2, 2, 12), (1, 8, 16, 13), (2, 0, 2, 17)]),
    ],
)
def test_rule_loads_the_tuple_into_consecutive_registers(fam, peer_side, loads) -> None:
    exprs = _exprs(fam, peer_side)
    assert [name for name, _ in exprs] == ["meta", "cmp", "meta", "cmp"] + ["payload"] * 4 + ["lookup", "immediate"]
    nfproto = attrs(exprs[1][1][c.NFTA_CMP_DATA])[c.NFTA_DATA_VALUE]
    assert bytes(nfproto) == bytes([fam.nfproto])
    assert bytes(attrs(exprs[3][1][c.NFTA_CMP_DATA])[c.NFTA_DATA_VALUE]) == bytes([socket.IPPROTO_TCP])
    got = [
        tuple(_u32(d[k]) for k in (c.NFTA_PAYLOAD_BASE, c.NFTA_PAYLOAD_OFFSET, c.NFTA_PAYLOAD_LEN, c.NFTA_PAYLOAD_DREG))
        for _, d in exprs[4:8]
    ]
    assert got == loads
    lookup = exprs[8][1]
    assert bytes(lookup[c.NFTA_LOOKUP_SET]).rstrip(b"\0").decode() == fam.set_name
    verdict = attrs(attrs(exprs[9][1][c.NFTA_IMMEDIATE_DATA])[c.NFTA_DATA_VERDICT])
    assert _u32(verdict[c.NFTA_VERDICT_CODE]) == c.NF_DROP


def test_setup_makes_one_table_two_maps_three_chains_fifteen_rules() -> None:
    reqs = ruleset.setup_requests(60000)
    kinds = [r.msg_type for r in reqs]
    assert kinds.count(c.NFT_MSG_NEWTABLE) == 1
    assert kinds.count(c.NFT_MSG_NEWSET) == 2
    assert kinds.count(c.NFT_MSG_NEWCHAIN) == 3
    assert kinds.count(c.NFT_MSG_DELRULE) == 3  # each chain is flushed before its rules go in again
    # prerouting: mark accept + peer side (vmap, then drop) x 2 families; input: mark accept + socket side + peer
    # side (vmap, then drop) x 2; output: mark accept + socket side x 2
    assert kinds.count(c.NFT_MSG_NEWRULE) == ruleset.RULE_COUNT == 15
    assert all(r.family == c.NFPROTO_INET for r in reqs)
    for req in reqs:
        if req.msg_type == c.NFT_MSG_NEWCHAIN:
            hook = attrs(attrs(req.payload)[c.NFTA_CHAIN_HOOK])
            assert struct.unpack(">i", hook[c.NFTA_HOOK_PRIORITY])[0] == -300
        if req.msg_type == c.NFT_MSG_NEWSET:
            fields = attrs(req.payload)
            assert _u32(fields[c.NFTA_SET_FLAGS]) == c.NFT_SET_MAP | c.NFT_SET_TIMEOUT
            assert _u32(fields[c.NFTA_SET_DATA_TYPE]) == c.NFT_DATA_VERDICT == 0xFFFFFF00
            assert _u32(fields[c.NFTA_SET_KEY_LEN]) in (16, 40)


def test_set_key_type_is_nfts_concatenation() -> None:
    assert ruleset._set_key_type(ruleset.V4) == (((7 << 6 | 13) << 6 | 7) << 6) | 13
    assert ruleset._set_key_type(ruleset.V6) == (((8 << 6 | 13) << 6 | 8) << 6) | 13


def _elements(req) -> list[dict[int, memoryview]]:
    fields = attrs(req.payload)
    return [attrs(e) for _k, e in iter_attrs(fields[c.NFTA_SET_ELEM_LIST_ELEMENTS])]


def test_add_elements_carry_key_timeout_expiration_and_owner() -> None:
    udata = encode_owner("me pid=1 host=h")
    [req] = ruleset.add_element_requests(ruleset.group_keys([T4]), 1500, udata)
    assert req.msg_type == c.NFT_MSG_NEWSETELEM and req.flags == c.NLM_F_CREATE
    [elem] = _elements(req)
    assert bytes(attrs(elem[c.NFTA_SET_ELEM_KEY])[c.NFTA_DATA_VALUE]) == ruleset.encode_key(T4)[1]
    assert struct.unpack(">Q", elem[c.NFTA_SET_ELEM_TIMEOUT])[0] == 1500
    assert struct.unpack(">Q", elem[c.NFTA_SET_ELEM_EXPIRATION])[0] == 1500
    assert decode_owner(elem[c.NFTA_SET_ELEM_USERDATA]) == "me pid=1 host=h"


def test_big_batches_split_into_messages_under_the_u16_limit() -> None:
    conns = [ConnTuple(socket.AF_INET6, f"fd01::{i + 1:x}", 1 + i % 65000, "fd02::1", 443) for i in range(10000)]
    keys = ruleset.group_keys(conns)
    for reqs in (
        ruleset.add_element_requests(keys, 60000, encode_owner(default_owner("x" * 200))),
        ruleset.delete_element_requests(keys, destroy=True),
    ):
        assert len(reqs) > 1
        seen = []
        for req in reqs:
            (_, _), (_, _), (kind, body) = iter_attrs(req.payload)
            assert kind == c.NFTA_SET_ELEM_LIST_ELEMENTS and len(body) + 4 <= 0xFFFF
            seen += [bytes(attrs(e[c.NFTA_SET_ELEM_KEY])[c.NFTA_DATA_VALUE]) for e in _elements(req)]
        assert seen == keys[ruleset.V6]


def test_delete_uses_destroy_when_the_kernel_has_it() -> None:
    keys = ruleset.group_keys([T4, T6])
    assert {r.msg_type for r in ruleset.delete_element_requests(keys, True)} == {c.NFT_MSG_DESTROYSETELEM}
    assert {r.msg_type for r in ruleset.delete_element_requests(keys, False)} == {c.NFT_MSG_DELSETELEM}
    assert ruleset.delete_table_request(True).msg_type == c.NFT_MSG_DESTROYTABLE


def test_owner_is_truncated_to_what_nft_accepts() -> None:
    long = "é" * 100
    udata = encode_owner(long)
    assert udata[0] == c.NFTNL_UDATA_SET_ELEM_COMMENT and udata[1] == len(udata) - 2 <= MAX_OWNER_BYTES + 1
    assert long.startswith(decode_owner(udata))
    assert decode_owner(b"") == "" and decode_owner(b"\x05\x02ab") == ""
    assert default_owner("job7").startswith("job7 pid=")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), MAX_TTL + 1, True, "60"])
def test_bad_ttl_is_a_lock_error(bad) -> None:
    with pytest.raises(LockError, match="ttl"):
        ttl_ms(bad)


def test_ttl_in_milliseconds() -> None:
    assert ttl_ms(60) == 60000 and ttl_ms(0.0001) == 1 and ttl_ms(1.5) == 1500


class _State:
    tuple = T6


def test_items_may_be_tuples_states_or_one_of_them() -> None:
    assert as_tuples(T4) == [T4]
    assert as_tuples(_State()) == [T6]
    assert as_tuples([T4, _State()]) == [T4, T6]
    assert as_tuples(iter([T4])) == [T4]
    with pytest.raises(LockError, match="cannot lock"):
        as_tuples([("10.0.0.1", 1)])


def test_record_to_dict() -> None:
    rec = LockRecord(T6, 12.5, 60.0, "me pid=1 host=h")
    assert rec.to_dict() == {
        "tuple": "[fd00::1]:1000->[fd00::2]:2000",
        "family": 6,
        "local": ["fd00::1", 1000],
        "remote": ["fd00::2", 2000],
        "seconds_left": 12.5,
        "ttl": 60.0,
        "owner": "me pid=1 host=h",
        "group": None,
    }
    assert LockRecord(T6, 12.5, 60.0, "", 49429).to_dict()["group"] == 49429


def test_attributes_pad_to_four_bytes_and_parse_back() -> None:
    data = attr_str(1, "abc") + nest(2, attr(3, b"\x01"), attr(4, b""))
    assert len(attr_str(1, "abc")) == 8 and len(attr(3, b"\x01")) == 8
    parsed = attrs(data)
    assert bytes(parsed[1]) == b"abc\0"
    assert [(k, bytes(v)) for k, v in iter_attrs(parsed[2])] == [(3, b"\x01"), (4, b"")]
    with pytest.raises(LockError, match="malformed"):
        list(iter_attrs(struct.pack("=HH", 40, 1) + b"xxxx"))


def test_error_message_with_extended_ack_text() -> None:
    header = struct.pack("=IHHII", 20, 0x0A0C, 5, 7, 0)
    body = struct.pack("=i", -2) + header + attr_str(c.NLMSGERR_ATTR_MSG, "set not found")
    assert _parse_error(memoryview(body)) == (2, "set not found")
    assert _parse_error(memoryview(struct.pack("=i", 0) + header)) == (0, "")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
def test_namespace_names_are_not_paths(name: str) -> None:
    with pytest.raises(LockError, match="not a network namespace name"):
        check_netns_name(name)


def _rule(req) -> list[tuple[str, dict[int, memoryview]]]:
    exprs = attrs(req.payload)[c.NFTA_RULE_EXPRESSIONS]
    out = []
    for _k, e in iter_attrs(exprs):
        fields = attrs(e)
        out.append((bytes(fields[c.NFTA_EXPR_NAME]).rstrip(b"\0").decode(), attrs(fields[c.NFTA_EXPR_DATA])))
    return out


def test_peer_side_rules_are_a_vmap_then_a_drop_and_the_socket_side_only_drops() -> None:
    rules: dict[str, list[list[tuple[str, dict[int, memoryview]]]]] = {}
    for req in ruleset.setup_requests(60000):
        if req.msg_type == c.NFT_MSG_NEWRULE:
            chain = bytes(attrs(req.payload)[c.NFTA_RULE_CHAIN]).rstrip(b"\0").decode()
            rules.setdefault(chain, []).append(_rule(req))

    def shape(rule: list[tuple[str, dict[int, memoryview]]]) -> str:
        names = [name for name, _ in rule]
        if names[-1] == "lookup":  # a vmap: the element's verdict, read into the verdict register
            assert _u32(rule[-1][1][c.NFTA_LOOKUP_DREG]) == c.NFT_REG_VERDICT
            return "vmap"
        assert names[-1] == "immediate"
        assert names == ["meta", "cmp", "immediate"] or (names[-2] == "lookup" and c.NFTA_LOOKUP_DREG not in rule[-2][1])
        verdict = attrs(attrs(rule[-1][1][c.NFTA_IMMEDIATE_DATA])[c.NFTA_DATA_VERDICT])
        return {c.NF_ACCEPT: "accept", c.NF_DROP: "drop"}[_u32(verdict[c.NFTA_VERDICT_CODE])]

    # a jump returning from an emptied keep chain meets the drop right after its vmap: never the policy (accept)
    assert {chain: [shape(r) for r in rs] for chain, rs in rules.items()} == {
        "prerouting": ["accept", "vmap", "drop", "vmap", "drop"],
        "input": ["accept", "drop", "vmap", "drop", "drop", "vmap", "drop"],
        "output": ["accept", "drop", "drop"],
    }


def test_keep_chain_logs_to_its_group_then_drops() -> None:
    create, flush, rule = ruleset.keep_chain_requests(49431)
    assert create.msg_type == c.NFT_MSG_NEWCHAIN and c.NFTA_CHAIN_HOOK not in attrs(create.payload)
    assert flush.msg_type == c.NFT_MSG_DELRULE
    [(log_name, log), (verdict_name, verdict)] = _rule(rule)
    assert (log_name, verdict_name) == ("log", "immediate")
    assert struct.unpack(">H", log[c.NFTA_LOG_GROUP])[0] == 49431
    assert struct.unpack(">H", log[c.NFTA_LOG_QTHRESHOLD])[0] == 1
    code = attrs(attrs(verdict[c.NFTA_IMMEDIATE_DATA])[c.NFTA_DATA_VERDICT])[c.NFTA_VERDICT_CODE]
    assert _u32(code) == c.NF_DROP
    assert ruleset.group_of_chain("keep_49431") == 49431
    assert [ruleset.group_of_chain(n) for n in ("keep_", "keep_070", "keep_70000", "input", "keep_1x")] == [None] * 5


@pytest.mark.parametrize("group", [None, 49428, 49491])
def test_element_verdict_is_a_jump_to_its_keep_chain_or_a_drop(group) -> None:
    [req] = ruleset.add_element_requests(ruleset.group_keys([T4]), 1500, encode_owner("me"), group)
    [elem] = _elements(req)
    verdict = ruleset.element_verdict(elem[c.NFTA_SET_ELEM_DATA])
    assert verdict == ((c.NF_DROP, "") if group is None else (c.NFT_JUMP, f"keep_{group}"))
    assert verdict == ruleset.verdict_of(group) and ruleset.verdict_group(verdict) == group
    # any other verdict (another tool's element) is written back as drop, never kept
    assert ruleset.verdict_group((c.NF_ACCEPT, "")) is None
    assert ruleset.verdict_group((c.NFT_JUMP, "input")) is None
