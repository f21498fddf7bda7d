"""The keeper: the detached process that goes on recording what the peers send to the locked connections of a dump
after `sockrepair dump` (or `sockrepair criu dump`) has ended, until the restore takes over (sockrepair.move.keeper).

It is started by spawn_keeper() as `python -P THIS_FILE SPEC` in a new session and forks once more (its parent
exits at once: the keeper is nobody's child and holds no terminal), with no fd but those SPEC names:

- the nfnetlink_log sockets of the dump's recorders (lock/record.py), still bound to the lock's group, so that no
  copy is lost between the two processes (nfnetlink_log lets one socket bind the group in a namespace: a second
  bind is refused with EPERM, so the socket itself is what changes hands);
- kept.img (sockrepair.image.keptlog), opened for appending: each packet of a wanted connection is appended as its
  own record as soon as it is read, so a keeper killed with SIGKILL leaves every packet it had read;
- a listening UNIX socket in the image directory: a restore connects, the keeper reads what is left, writes the
  END record and passes its sockets (SCM_RIGHTS), then exits.

It also ends, writing END first, when none of its connections is locked any more (it looks every second: released by
a restore that did not ask it, or expired), at `expires` (wall-clock seconds, the lock's expiry), or on
SIGTERM/SIGINT/SIGHUP.
Its caps are those of a recorder (lock/record.py KeepCaps), counted over what it appended; past them a packet is counted
(COUNTS record) and left to the lock, which drops it as it drops everything: the keeper only copies, so nothing it
does or fails to do lets a packet through or answers one."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# The parent of the keeper waits for this process's first line; nothing heavy is imported before it is written.

_SIOCGSKNS = 0x894C  # linux/sockios.h: an fd of a socket's network namespace
# seconds between two looks at the lock: a keeper whose connections were released (or whose lock expired) leaves
_LOOK_EVERY = 1.0


def _detach() -> None:
    """Fork once more; the parent prints the keeper's pid and exits, the keeper goes on without stdio."""
    pid = os.fork()
    if pid:
        os.write(1, f"{pid}\n".encode())
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")
    os.umask(0o077)


def run(spec: dict[str, Any]) -> str:
    """Keep until handed over, expired or signalled; returns the reason written in the END record. `spec`:
    "journal" (fd of kept.img, positioned at its end), "listen" (fd of the listening UNIX socket), "recorders"
    (list of [fd, next NFULA_SEQ or null]), "tuples" (the wanted connections as their packets name them, str of
    ConnTuple), "expires" (wall-clock seconds)."""
    import fcntl
    import select
    import signal
    import socket
    import time

    from sockrepair.errors import NftError, SockrepairError
    from sockrepair.image.keptlog import END, PACKET, counts_record, record
    from sockrepair.lock.locker import Locker
    from sockrepair.lock.record import KeepCaps, Recorder, wire_key
    from sockrepair.move.handoff import peer_credentials
    from sockrepair.netns import inside
    from sockrepair.packet import packet_tuple
    from sockrepair.state import ConnTuple

    journal = int(spec["journal"])
    listener = socket.socket(fileno=int(spec["listen"]))
    listener.listen(4)  # again, so that a connecting restore sees this process's credentials (SO_PEERCRED)
    recorders = [Recorder(bound=socket.socket(fileno=int(fd)), next_seq=seq) for fd, seq in spec["recorders"]]
    wanted = [ConnTuple.parse(text) for text in spec["tuples"]]
    wanted_set = set(wanted)
    lockers = []
    for recorder in recorders:
        try:
            # the namespace of the recorder's socket (SIOCGSKNS): the keeper watches the lock there
            namespace = fcntl.ioctl(recorder.socket.fileno(), _SIOCGSKNS)
            try:
                with inside(f"/proc/self/fd/{namespace}"):
                    lockers.append(Locker())
            finally:
                os.close(namespace)
        except (OSError, SockrepairError):
            pass  # unwatched, the keeper ends at `expires` only
    expires = float(spec["expires"])
    caps = KeepCaps()
    packets: dict[ConnTuple, int] = {}
    used: dict[ConnTuple, int] = {}
    kept = total = 0  # packets and bytes appended, in all
    over_cap = 0
    counted = 0

    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)

    def append(data: bytes) -> None:
        os.write(journal, data)

    def keep() -> None:
        nonlocal kept, total, over_cap, counted
        lost = truncated = over_recorders = 0
        for recorder in recorders:
            held = recorder.take(wanted)
            recorder.forget()  # copies for connections of other movers' locks: not ours to keep
            lost += held.lost
            truncated += held.truncated
            over_recorders += held.over_cap
            for packet in held.packets:
                conn = packet_tuple(packet)
                assert conn is not None  # the recorder keeps TCP packets only
                if caps.refuses(len(packet), packets.get(conn, 0), used.get(conn, 0), kept, total):
                    over_cap += 1
                    continue
                append(record(PACKET, packet))
                packets[conn] = packets.get(conn, 0) + 1
                used[conn] = used.get(conn, 0) + len(packet)
                kept += 1
                total += len(packet)
        if over_cap + over_recorders + lost + truncated != counted:
            counted = over_cap + over_recorders + lost + truncated
            append(counts_record(over_cap + over_recorders, lost, truncated))

    poller = select.poll()
    for recorder in recorders:
        poller.register(recorder.socket.fileno(), select.POLLIN)
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(wake_read, select.POLLIN)

    def released() -> bool:
        """Whether none of the wanted connections is locked any more (released, or expired): then nothing more
        can come, and the group must be free for the next mover in the namespace."""
        if not lockers:
            return False
        try:
            return not any(wire_key(r.tuple) in wanted_set for locker in lockers for r in locker.list_locks())
        except NftError:
            return False

    while True:
        left = expires - time.time()
        if left <= 0 or released():
            keep()
            reason = "the lock expired" if left <= 0 else "none of its connections is locked any more"
            append(record(END, reason.encode()))
            return reason
        ready = {fd for fd, _ in poller.poll(min(left, _LOOK_EVERY) * 1000)}
        keep()
        if wake_read in ready:
            append(record(END, b"stopped by a signal"))
            return "stopped by a signal"
        if listener.fileno() in ready:
            conn, _ = listener.accept()
            with conn:
                pid, uid, _gid = peer_credentials(conn)
                if uid not in (os.geteuid(), 0):
                    continue  # the directory is 0700: only its owner or root can reach the socket anyway
                keep()
                reason = f"handed over to process {pid}"
                append(record(END, reason.encode()))
                os.fsync(journal)
                state = json.dumps({"next_seq": [r.next_seq for r in recorders]}).encode()
                socket.send_fds(conn, [state], [r.socket.fileno() for r in recorders])
                return reason


if __name__ == "__main__":
    _detach()
    run(json.loads(sys.argv[1]))
    os._exit(0)
