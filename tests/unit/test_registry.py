"""sockrepair.engine.registry held to the code that follows it: SocketOptions, the engine's reads and writes, the
image layout, the refusal checks and criu compare."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sockrepair.criu.compare import NOT_IN_CRIU
from sockrepair.engine import _refuse, _sockopts, registry
from sockrepair.image import layout
from sockrepair.state import ConnectionState, SocketOptions

Status = registry.Status


def test_every_socket_option_field_is_carried_by_exactly_one_entry() -> None:
    owners: dict[str, list[str]] = {}
    for e in registry.ENTRIES:
        for f in e.fields:
            if f.startswith("sockopts."):
                owners.setdefault(f.removeprefix("sockopts."), []).append(e.name)
    assert set(owners) == {f.name for f in dataclasses.fields(SocketOptions)}
    assert all(len(names) == 1 for names in owners.values()), owners


def test_carried_fields_exist_in_the_state() -> None:
    top = {f.name for f in dataclasses.fields(ConnectionState)}
    for e in registry.ENTRIES:
        assert (e.status is Status.CARRIED) == bool(e.fields), e.name
        for f in e.fields:
            assert f.split(".")[0] in top, (e.name, f)


def test_every_entry_has_a_reason_and_a_unique_name() -> None:
    names = [e.name for e in registry.ENTRIES]
    assert len(names) == len(set(names))
    assert all(e.reason for e in registry.ENTRIES)


def test_the_engine_reads_and_writes_every_carried_option() -> None:
    read = {field for reads in _sockopts._READS.values() for field, *_ in reads}
    read |= {o.field for o in _sockopts.OPTIONAL_INT_OPTS}
    read |= {field for field, _, _ in _sockopts.TIMEOUTS}
    read |= {"linger_on", "linger_secs", "bindtodevice", "congestion"}
    assert read == set(registry.carried_sockopts())
    written = {field for writes in _sockopts._WRITES.values() for field, *_ in writes}
    written |= {o.field for o in _sockopts.PRE_BIND_INT_OPTS} | {"v6only", "bindtodevice"}
    written |= {field for field, _, _ in _sockopts.TIMEOUTS}
    written |= {"linger_on", "linger_secs", "congestion", "notsent_lowat", "reuseaddr", "sndbuf", "rcvbuf"}
    assert written == set(registry.carried_sockopts())


def test_the_image_holds_every_carried_option() -> None:
    held = {*layout.SOCKOPT_FLAGS, *layout.SOCKOPT_INTS, "bindtodevice", "congestion", *layout.MORE_SOCKOPT_FLAGS,
            *layout.MORE_SOCKOPT_INTS, *layout.MORE_SOCKOPT_LONGS}
    assert held == set(registry.carried_sockopts())


def test_every_refused_entry_is_checked() -> None:
    source = Path(_refuse.__file__).read_text() + Path(_refuse.__file__).with_name("_checkpoint.py").read_text()
    refused = [e for e in registry.ENTRIES if e.status is Status.REFUSED]
    # the sock_diag aliases are checked under their option's name; MPTCP by the protocol check of _checkpoint.py
    aliases = {"INET_DIAG_MD5SIG": "TCP_MD5SIG/TCP_MD5SIG_EXT", "INET_DIAG_ULP_INFO": "TCP_ULP",
               "IPPROTO_MPTCP": "MPTCP"}
    for e in refused:
        assert f'"{aliases.get(e.name, e.name)}"' in source, e.name


def test_criu_compare_follows_the_registry() -> None:
    assert set(NOT_IN_CRIU) == {name for name, e in registry.carried_sockopts().items() if not e.criu}
    assert {"linger_on", "user_timeout", "congestion", "notsent_lowat", "rcvtimeo_us"} <= set(NOT_IN_CRIU)
