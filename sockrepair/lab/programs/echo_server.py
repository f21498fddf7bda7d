"""A plain TCP echo service (standard library only, no sockrepair): it listens on ADDR:PORT when asked, and serves
the connections it inherits by systemd socket activation (LISTEN_FDS / LISTEN_PID). Prints "ready PID" when set."""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys


def inherited() -> list[socket.socket]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    return [socket.socket(fileno=3 + n) for n in range(int(os.environ.get("LISTEN_FDS", "0")))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", help="ADDR:PORT to accept connections on")
    args = parser.parse_args()
    sel = selectors.DefaultSelector()
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host.strip("[]"), int(port)))
        listener.listen(128)
        sel.register(listener, selectors.EVENT_READ, "listener")
    for conn in inherited():
        sel.register(conn, selectors.EVENT_READ, "conn")
    print(f"ready {os.getpid()}", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "listener":
                conn, _ = sock.accept()
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                data = sock.recv(65536)
                if data:
                    sock.sendall(data)
                    continue
            except ConnectionError as exc:
                print(f"connection error: {exc}", file=sys.stderr, flush=True)
            sel.unregister(sock)
            sock.close()


if __name__ == "__main__":
    main()
