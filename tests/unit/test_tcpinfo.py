"""sockrepair.engine._tcpinfo: struct tcp_info read by field name, held to the offsets of include/uapi/linux/tcp.h
and to what a live loopback connection answers."""

from __future__ import annotations

import errno
import platform
import re
import socket

import pytest

from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine._ffi import ffi
from sockrepair.errors import SocketCallError

# byte offsets in the UAPI struct (x86-64 and every other Linux ABI: natural alignment, no padding before these)
UAPI_OFFSETS = {
    "tcpi_state": 0, "tcpi_probes": 3, "tcpi_options": 5, "tcpi_wscales": 6, "tcpi_rto": 8, "tcpi_snd_mss": 16,
    "tcpi_unacked": 24, "tcpi_snd_cwnd": 80, "tcpi_total_retrans": 100, "tcpi_pacing_rate": 104,
    "tcpi_max_pacing_rate": 112, "tcpi_segs_out": 136, "tcpi_segs_in": 140, "tcpi_notsent_bytes": 144,
    "tcpi_bytes_sent": 200, "tcpi_bytes_retrans": 208, "tcpi_snd_wnd": 228, "tcpi_rcv_wnd": 232,
    "tcpi_total_rto": 240, "tcpi_total_rto_time": 244,
}


@pytest.mark.parametrize(("field", "at"), sorted(UAPI_OFFSETS.items()))
def test_the_declaration_lays_fields_where_the_kernel_does(field: str, at: int) -> None:
    assert tcpinfo.offset(field) == at


def test_a_view_reads_just_its_fields() -> None:
    limits = tcpinfo.view("tcpi_snd_mss", "tcpi_snd_cwnd")
    assert limits.size == 84
    raw = bytearray(100)
    raw[16:20] = (1448).to_bytes(4, "little")
    raw[80:84] = (10).to_bytes(4, "little")
    assert limits.unpack_from(bytes(raw)) == (1448, 10)
    assert tcpinfo.view("tcpi_bytes_sent").size == 208  # a u64
    assert tcpinfo.view("tcpi_total_rto").size == 242  # a u16


def test_fields_out_of_order_twice_unknown_or_none_are_refused() -> None:
    with pytest.raises(ValueError, match="tcpi_snd_mss"):
        tcpinfo.view("tcpi_snd_cwnd", "tcpi_snd_mss")
    with pytest.raises(ValueError, match="has no field 'tcpi_no_such_field'"):
        tcpinfo.view("tcpi_no_such_field")
    with pytest.raises(ValueError, match="tcpi_state named twice"):
        tcpinfo.view("tcpi_state", "tcpi_probes", "tcpi_state")
    with pytest.raises(ValueError, match="no field named"):
        tcpinfo.view()


def test_read_answers_for_a_live_connection(listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname()) as client:
        server, _ = listener.accept()
        with server:
            client.sendall(b"x" * 100)
            assert server.recv(100) == b"x" * 100
            state, snd_mss, segs_in = tcpinfo.read(server, "tcpi_state", "tcpi_snd_mss", "tcpi_segs_in")
            assert state == 1  # ESTABLISHED
            assert 0 < snd_mss <= 65483  # loopback's MTU less the headers
            assert segs_in >= 2  # the handshake's ACK and the data
            if tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2]) >= (6, 7):
                # the declaration ends within this kernel's struct: no view asks for bytes it lacks
                whole = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1024)
                assert len(whole) >= ffi.sizeof("struct tcp_info")


def test_read_of_a_socket_without_tcp_info_is_a_socket_call_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(SocketCallError) as raised:
            tcpinfo.read(udp, "tcpi_state")
    assert raised.value.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP)
    assert raised.value.op == "getsockopt(TCP_INFO)"


class _OlderKernel(socket.socket):
    """A socket whose kernel's struct tcp_info ends at tcpi_rcv_space (Linux 3.x): 100 bytes."""

    def getsockopt(self, *args: int) -> bytes:  # type: ignore[override]
        return bytes(min(args[2], 100))


def test_a_field_past_this_kernels_struct_is_eproto() -> None:
    with _OlderKernel() as sock:
        assert tcpinfo.read(sock, "tcpi_state", "tcpi_rcv_mss") == (0, 0)
        with pytest.raises(SocketCallError) as raised:
            tcpinfo.read(sock, "tcpi_segs_out")
    assert raised.value.errno == errno.EPROTO
    assert "tcpi_segs_out" in str(raised.value)
