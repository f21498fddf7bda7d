"""The program that takes restored connections over a UNIX socket and serves them (standard library only, no
sockrepair):

    receiver.py --unix PATH [--max-seconds S]

It listens on the UNIX socket PATH for connections passed with SCM_RIGHTS (sockrepair.move.handoff.send_over_unix:
up to SCM_MAX_FD fds per message), echoes on each, prints "ready" once listening and "took N" after each batch of
sockets it was given, and exits after --max-seconds whatever happens."""

from __future__ import annotations

import argparse
import resource
import select
import socket
import sys
import time

SCM_MAX_FD = 253


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.unix)
    listener.listen(8)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    owned: dict[int, socket.socket] = {listener.fileno(): listener}
    feeders: set[int] = set()
    print("ready", flush=True)
    end = time.monotonic() + args.max_seconds
    while time.monotonic() < end:
        for fd, _ in ep.poll(1.0):
            sock = owned.get(fd)
            if sock is None:
                continue
            if sock is listener:
                feeder, _ = listener.accept()
                owned[feeder.fileno()] = feeder
                feeders.add(feeder.fileno())
                ep.register(feeder.fileno(), select.EPOLLIN)
            elif fd in feeders:
                _, fds, _, _ = socket.recv_fds(sock, 1 << 16, SCM_MAX_FD)
                for new in fds:
                    conn = socket.socket(fileno=new)
                    conn.setblocking(True)
                    owned[new] = conn
                    ep.register(new, select.EPOLLIN)
                if fds:
                    print(f"took {len(fds)}", flush=True)
                else:
                    ep.unregister(fd)
                    feeders.discard(fd)
                    owned.pop(fd).close()
            else:
                try:
                    data = sock.recv(1 << 16)
                    if data:
                        sock.sendall(data)
                        continue
                except OSError:
                    pass
                ep.unregister(fd)
                owned.pop(fd).close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unix", required=True)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long whatever happens")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
