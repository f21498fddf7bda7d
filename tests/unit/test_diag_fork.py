"""The sock_diag socket a thread keeps is the parent's alone: a forked child (the freeze guard) opens its own."""

from __future__ import annotations

import os
import socket

from sockrepair.engine import _diag


def test_a_forked_child_forgets_the_parents_netlink_socket() -> None:
    mine, other = socket.socketpair()
    saved = _diag._cache.sock, _diag._cache.netns
    _diag._cache.sock, _diag._cache.netns = mine, 4026531840
    fd = mine.fileno()
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                closed = True
                try:
                    os.fstat(fd)
                    closed = False
                except OSError:
                    pass
                os.write(w, b"%d %d %d" % (_diag._cache.sock is None, _diag._cache.netns, closed))
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        answer = os.read(r, 64).decode()
        os.waitpid(pid, 0)
        # the child: nothing cached, its copy of the fd closed
        assert answer == "1 -1 1"
        # the parent's is untouched and still works
        assert _diag._cache.sock is mine and mine.fileno() >= 0
        mine.send(b"x")
        assert other.recv(1) == b"x"
    finally:
        _diag._cache.sock, _diag._cache.netns = saved
        os.close(r)
        if w >= 0:
            os.close(w)
        mine.close()
        other.close()
