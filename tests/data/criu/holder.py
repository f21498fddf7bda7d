"""A process tree for criu to dump in the root tests (and the one that recorded the logs beside this file).

    holder.py pairs READY N ADDR PAYLOAD [fill]
                                           N loopback connection pairs, PAYLOAD bytes queued unread each way; with
                                           `fill` the first client then sends fill_bytes() until its send queue is full;
                                           on SIGUSR1 (sent after a restore) it reads every queue, checks each byte,
                                           does one round trip per pair, and prints `verified ...` or `MISMATCH ...`
    holder.py server READY PORT            the seed's echo server
    holder.py client READY PORT            the seed's client: sends a counter, prints each echo

It writes its pid to READY once its sockets exist (pairs: then the number of fill bytes sent), then waits (pairs)
or loops until its connection fails.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time


def ready(path: str, *extra: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(" ".join(map(str, (os.getpid(), *extra))))
    os.rename(tmp, path)


def fill_bytes(start: int, length: int) -> bytes:
    """The fill stream from byte `start`; its period (251) is prime so a shifted or lost block shows."""
    return bytes((13 * k + 5) % 251 for k in range(start, start + length))


def fill(sock: socket.socket) -> int:
    sock.setblocking(False)
    sent = 0
    while True:
        try:
            sent += sock.send(fill_bytes(sent, 65536))
        except BlockingIOError:
            return sent


def pairs(path: str, count: int, addr: str, payload: int, fill_first: bool) -> None:
    listener = socket.socket()
    listener.bind((addr, 0))
    listener.listen(count)
    keep = []
    for i in range(count):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        # Distinct bytes per connection and direction, so a test can tell every queue apart.
        client.sendall(bytes((i + j) % 251 for j in range(payload)))
        server.sendall(bytes((i + 7 * j + 3) % 253 for j in range(payload)))
        keep += [client, server]
    listener.close()
    filled = fill(keep[0]) if fill_first else 0
    expected = []
    for i in range(count):
        expected.append(bytes((i + 7 * j + 3) % 253 for j in range(payload)))  # what client i has to read
        expected.append(bytes((i + j) % 251 for j in range(payload)) + (fill_bytes(0, filled) if i == 0 else b""))
    asked = []
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(True))
    ready(path, filled)
    while True:
        signal.pause()
        if asked:
            asked.clear()
            verify(keep, expected)


def verify(socks: list[socket.socket], expected: list[bytes]) -> None:
    problems, total = [], 0
    deadline = time.monotonic() + 30
    for sock, want in zip(socks, expected):
        sock.setblocking(True)
        got = bytearray()
        try:
            while len(got) < len(want):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(len(want) - len(got))
                if not chunk:
                    break
                got += chunk
        except OSError as exc:
            problems.append(f"{sock.getsockname()[1]}: {exc}")
        total += len(got)
        if got != want:
            at = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            problems.append(f"{sock.getsockname()[1]}->{sock.getpeername()[1]}: {len(got)} of {len(want)} bytes, "
                            f"first difference at byte {at}")
    for client, server in zip(socks[::2], socks[1::2]):
        try:
            client.sendall(b"after restore")
            server.sendall(server.recv(13))
            if client.recv(13) != b"after restore":
                problems.append(f"{client.getsockname()[1]}: round trip after restore came back wrong")
        except OSError as exc:
            problems.append(f"{client.getsockname()[1]}: round trip after restore: {exc}")
    if problems:
        print(f"MISMATCH {len(problems)}: " + "; ".join(problems[:5]), flush=True)
    else:
        print(f"verified {len(socks)} sockets, {total} bytes", flush=True)


def fail(exc: OSError) -> None:
    # The seed programs' own message, kept word for word.
    print(f"Can't read socket: {exc.strerror}", flush=True)
    sys.exit(1)


def server(path: str, port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    ready(path)
    conn, _ = listener.accept()
    while True:
        try:
            data = conn.recv(4096)
        except OSError as exc:
            fail(exc)
        if not data:
            sys.exit(0)
        conn.sendall(data)


def client(path: str, port: int) -> None:
    conn = socket.create_connection(("127.0.0.1", port))
    ready(path)
    counter = 0
    while True:
        try:
            conn.sendall(b"%d\n" % counter)
            data = conn.recv(4096)
        except OSError as exc:
            fail(exc)
        if not data:
            print("server closed the connection", flush=True)
            sys.exit(1)
        print(data.decode().strip(), flush=True)
        counter += 1
        time.sleep(0.05)


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "pairs":
        pairs(path, int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6:] == ["fill"])
    elif mode == "server":
        server(path, int(sys.argv[3]))
    else:
        client(path, int(sys.argv[3]))
