"""ConnTuple.parse takes exactly the form str() prints: ASCII port digits, IPv6 in brackets."""

from __future__ import annotations

import socket

import pytest

from sockrepair.state import ConnTuple


@pytest.mark.parametrize("text", ["127.0.0.1:5->127.0.0.1:6", "[::1]:5->[::1]:6", "[fd00::1]:80->[fd00::2]:9"])
def test_the_printed_form_round_trips(text: str) -> None:
    assert str(ConnTuple.parse(text)) == text


def test_a_v4_mapped_address_reads_as_the_kernel_prints_it() -> None:
    """inet_ntop's form, the one a socket's tuple has: an index that named "::ffff:7f00:1" refused its own image."""
    conn = ConnTuple.parse("[::ffff:7f00:1]:5->[::ffff:127.0.0.2]:6")
    assert (conn.local_addr, conn.remote_addr) == ("::ffff:127.0.0.1", "::ffff:127.0.0.2")
    assert conn == ConnTuple(socket.AF_INET6, "::ffff:127.0.0.1", 5, "::ffff:127.0.0.2", 6)


def test_fields() -> None:
    conn = ConnTuple.parse("[fd00::1]:80->[fd00::2]:65535")
    assert (conn.family, conn.local_addr, conn.local_port, conn.remote_addr, conn.remote_port) == (
        socket.AF_INET6, "fd00::1", 80, "fd00::2", 65535)


@pytest.mark.parametrize("text", [
    "::1:5->::1:6",  # bare IPv6: is ":5" a port or part of the address?
    "127.0.0.1:+5->127.0.0.1:6", "127.0.0.1: 5->127.0.0.1:6", "127.0.0.1:5_0->127.0.0.1:6",
    "127.0.0.1:\uff105->127.0.0.1:6",  # fullwidth digit
    "127.0.0.1:0->127.0.0.1:6", "127.0.0.1:65536->127.0.0.1:6", "127.0.0.1:000005->127.0.0.1:6",
    "[::1]5->[::1]:6", "127.0.0.1:5->[::1]:6", "127.0.0.1:5", "", "->",
])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ConnTuple.parse(text)
