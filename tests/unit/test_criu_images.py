"""Decoding criu's tcp-stream and files.img images: a real criu 4.2.1 dump of two loopback pairs (3,000 bytes queued
each way, by tests/data/criu/holder.py) and images built here to probe malformed input."""

from __future__ import annotations

import socket
import struct
from collections import Counter
from pathlib import Path

import pytest

from sockrepair.criu import images
from sockrepair.errors import ImageError

DUMP = Path(__file__).resolve().parent.parent / "data" / "criu" / "dump-2pairs"
PAYLOAD = 3000


def client_bytes(i: int) -> bytes:
    return bytes((i + j) % 251 for j in range(PAYLOAD))


def server_bytes(i: int) -> bytes:
    return bytes((i + 7 * j + 3) % 253 for j in range(PAYLOAD))


def test_real_dump_decodes_into_matching_connection_pairs() -> None:
    states = images.load_connections(DUMP)
    assert len(states) == 4
    by_tuple = {s.tuple: s for s in states}
    # The accepted sockets share the listener's port; each client has a port of its own.
    (port, count), *_ = Counter(s.tuple.local_port for s in states).most_common()
    assert count == 2
    clients = sorted((s for s in states if s.tuple.remote_port == port), key=lambda s: s.tuple.local_port)
    for i, client in enumerate(clients):
        server = by_tuple[client.tuple.reversed()]
        assert client.tuple.family == socket.AF_INET and client.tuple.local_addr == "127.0.0.1"
        assert client.tcp_state == server.tcp_state == 1
        # Each end holds what the other sent, unread; nothing is left to send.
        assert client.recv_queue == server_bytes(i)
        assert server.recv_queue == client_bytes(i)
        assert client.send_queue == server.send_queue == b""
        assert client.send_seq == server.recv_seq and server.send_seq == client.recv_seq
        assert client.window is not None and client.window.rcv_wup == client.recv_seq
        assert client.window.snd_wl1 == client.recv_seq - PAYLOAD
        for s in (client, server):
            assert s.options.mss == 65495 and s.options.sack and s.options.timestamps and s.options.wscale
            assert s.sockopts.ttl == 64 and not s.sockopts.nodelay and s.sockopts.rcvbuf > 0


def test_files_img_lists_the_inet_sockets_with_their_inodes() -> None:
    socks = images.parse_inet_sockets((DUMP / "files.img").read_bytes())
    assert sorted(f"tcp-stream-{s.ino:x}.img" for s in socks) == sorted(p.name for p in DUMP.glob("tcp-stream-*"))


def stream_image(entry: bytes, tail: bytes, magic: int = images.MAGIC_TCP_STREAM) -> bytes:
    return struct.pack("<III", images.MAGIC_COMMON, magic, len(entry)) + entry + tail


def test_synthetic_stream_with_unsent_bytes() -> None:
    entry = images.TcpStreamEntry(inq_len=2, inq_seq=100, outq_len=5, outq_seq=200, opt_mask=2, snd_wscale=7,
                                  mss_clamp=1460, unsq_len=3).SerializeToString()
    img = images.parse_tcp_stream(stream_image(entry, b"ab" + b"12345"))
    assert (img.recv_queue, img.send_queue) == (b"ab", b"12345")
    sock = images.InetSocket(1, 2, images.ConnTuple(socket.AF_INET, "10.0.0.1", 1, "10.0.0.2", 2), 1, 6,
                             images.InetSkEntry())
    state = images.to_connection_state(sock, img)
    assert state.unacked == b"12" and state.unsent == b"345"
    assert state.options.sack and not state.options.timestamps and state.window is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x19CVT", "shorter than criu's 8-byte image header"),
        (stream_image(b"", b"", magic=images.MAGIC_FILES), "image magic"),
        (struct.pack("<III", images.MAGIC_COMMON, images.MAGIC_TCP_STREAM, 50) + b"\x08\x01", "entry at byte 8 runs"),
        (stream_image(b"\x08", b""), "entry at byte 8 is not a valid"),
        (stream_image(images.TcpStreamEntry(inq_len=4).SerializeToString(), b"abc"), r"4 \+ 0 queue bytes"),
    ],
)
def test_malformed_stream_image_is_an_image_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        images.parse_tcp_stream(data)


def test_ipv6_addresses_come_out_in_network_order() -> None:
    raw = socket.inet_pton(socket.AF_INET6, "fd00::1:2")
    words = list(struct.unpack("<4I", raw))
    isk = images.InetSkEntry(id=1, ino=0x10, family=socket.AF_INET6, proto=6, state=1, src_port=5, dst_port=6,
                             src_addr=words, dst_addr=words)
    entry = images.FileEntry(type=images.FD_TYPE_INETSK, id=1, isk=isk).SerializeToString()
    data = struct.pack("<III", images.MAGIC_COMMON, images.MAGIC_FILES, len(entry)) + entry
    (sock,) = images.parse_inet_sockets(data)
    assert str(sock.tuple) == "[fd00::1:2]:5->[fd00::1:2]:6"


def test_directory_without_files_img_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no files.img"):
        images.load_connections(tmp_path)
