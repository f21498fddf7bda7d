"""Property tests: whatever was written, read and left queued, a migration loses, duplicates and reorders nothing."""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sockrepair
from tests.root.conftest import _make_pair
from tests.root.streams import pattern, recv_exactly, send_until_full

KIB = 1024


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    up=st.integers(0, 600 * KIB),
    down=st.integers(0, 2048 * KIB),
    read_up=st.floats(0, 1),
    read_down=st.floats(0, 1),
    family=st.sampled_from([(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]),
    small_client_window=st.booleans(),
)
def test_migration_at_any_point(netns, up, down, read_up, read_down, family, small_client_window):
    bufs = {"server_rcvbuf": 4 << 20, "server_sndbuf": 8 << 20}
    if small_client_window:
        bufs["client_rcvbuf"] = 64 * KIB
    client, server = _make_pair(*family, **bufs)
    try:
        # both sides write what the kernel takes, then read part of what arrived: the rest stays queued
        sent_up = send_until_full(client, 0, salt=11, limit=up)
        sent_down = send_until_full(server, 0, salt=12, limit=down)
        got_up = recv_exactly(server, int(sent_up * read_up) // 2) if sent_up else b""
        got_down = recv_exactly(client, int(sent_down * read_down) // 2) if sent_down else b""

        state = sockrepair.checkpoint(server)
        sockrepair.discard(server, state)
        server = sockrepair.restore(state)

        got_up += recv_exactly(server, sent_up - len(got_up))
        got_down += recv_exactly(client, sent_down - len(got_down))
        assert got_up == pattern(0, sent_up, salt=11)
        assert got_down == pattern(0, sent_down, salt=12)
        server.sendall(b"tail")
        assert recv_exactly(client, 4) == b"tail"
    finally:
        client.close()
        server.close()
