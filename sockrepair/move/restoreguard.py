"""The guard of `sockrepair restore`: a process forked before the first socket is restored, holding a duplicate of
each restored socket until the handoff is over, so that whatever kills the restorer, the kernel closes none of the
restored connections (a FIN, and a socket left holding the 4-tuple, which no second restore could take back).

When the restorer is gone without saying goodbye (SIGKILL), the guard finishes or undoes what it began:
- the handoff had not begun: the connections are still locked, and their images, with the packets kept beside them,
  still describe them exactly (nothing left the host; what came in was those packets, which the next restore
  delivers again). The guard puts each socket back in repair mode and closes it: silently, the 4-tuple free again.
  `sockrepair restore -D DIR` restores them again. The restorer's recorders go to a new keeper
  (sockrepair.move.keep.Keeper.hand_back), which keeps what the peers send until then.
- the handoff had begun: the sockets another process holds now (the receiver at --unix, or the program --exec
  became) were handed off. The guard records them in the directory (sockrepair.move.journal.mark_handed), unlocks
  them and, when all were, marks the move completed; the others it puts back as above.
An exec closes the restorer's end of the guard's socket pair as its death does; the guard tells them apart by the
restorer's PF_EXITING flag (/proc/PID/stat field 9, set as the kernel's do_exit() begins, before it closes files).

Whichever unlocks handed-off connections delivers, as every mover does (docs/keeping.md), what the lock kept since
the restorer's last delivery: the guard holds the restorer's recorder sockets (`recorders`, shared with it until
its exec or death closes its copies), and before and right after its unlock it sends their packets for those
connections, the sockets marked SOCCR_MARK meanwhile (their ACKs pass the lock), and gives each socket its saved
mark back after the unlock (`marks`: the restorer leaves them marked from its delivery on, so that what the program
sends before the unlock passes too). Without that, what a peer sent between the restorer's delivery and the exec
(the handoff's few milliseconds) waited for its retransmission.

The guard is a grandchild (forked twice) so that it outlives an --exec without becoming the new program's child; it
ignores SIGINT, SIGTERM and SIGHUP, which a terminal sends to the whole process group, leaves that group for one of its
own (a SIGKILL of the group, `kill -KILL -- -PGID`, spares it; a kill of the whole cgroup does not), and keeps the fds
`inherit` (the flock on the image directory: a second restore waits until the guard is done)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sockrepair.move.pidfd import shared_socket
from sockrepair.sigmask import deferred_signals
from sockrepair.state import ConnTuple

_HOLD = b"h"
_HANDING = b"handing"
_CLOSE = b"close"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PF_EXITING = 0x4  # include/linux/sched.h
_SIOCGSKNS = 0x894C  # linux/sockios.h: an fd of a socket's network namespace


def _namespace(sock: socket.socket) -> int:
    """The inode number of the network namespace `sock` belongs to (SIOCGSKNS, linux/sockios.h)."""
    fd = fcntl.ioctl(sock.fileno(), _SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def exiting(pid: int) -> bool:
    """Whether process `pid` is gone or on its way out (PF_EXITING, /proc/PID/stat field 9)."""
    from sockrepair.move.procfs import stat

    try:
        proc = stat(pid)
    except OSError:
        return True
    return proc is None or proc.zombie or bool(proc.flags & PF_EXITING)


class RestoreGuard:
    """The guard of one restore of `tuples` into `netns` (None: this namespace) from `directory` (None: criu's
    images, where nothing is recorded). hold() each restored socket, handing() as the handoff begins, close() once
    the sockets are handed off or closed (put back) by the restorer."""

    def __init__(self, tuples: Sequence[ConnTuple], netns: str | None, directory: Path | None,
                 inherit: Sequence[int] = (), recorders: Sequence[socket.socket] = (),
                 marks: Sequence[int] = ()) -> None:
        """`inherit`: fds the guard keeps open; `recorders`: the bound nfnetlink_log sockets of the restore's
        keeper (sockrepair.lock.record.Recorder.socket), which the guard reads what the lock keeps from; `marks`:
        the saved SO_MARK of each connection (ConnectionState.sockopts.mark, in the order of `tuples`; 0 for those
        not given), which the sockets it unlocks get back."""
        restorer = os.getpid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # a signal arriving during the fork would run its handler inside Python's at-fork hooks, which print the
        # exception it raises and go on: held back, it is delivered once the fork is done
        with deferred_signals(_SIGNALS) as blocked:
            child = os.fork()
            if child == 0:
                try:
                    for sig in _SIGNALS:
                        signal.signal(sig, signal.SIG_IGN)
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                    guard = os.fork()
                    if guard:
                        # a SIGKILL of the restore's process group must spare its guard: set here, before the
                        # restorer goes on (it waits for this process), whether or not the guard has run yet
                        with contextlib.suppress(OSError):
                            os.setpgid(guard, guard)
                    else:
                        os.setpgid(0, 0)
                        keep = {theirs.fileno(), *inherit, *(r.fileno() for r in recorders)}
                        for name in os.listdir("/proc/self/fd"):
                            if int(name) > 2 and int(name) not in keep:
                                with contextlib.suppress(OSError):
                                    os.close(int(name))
                        saved = [*marks, *[0] * (len(tuples) - len(marks))]
                        _Guard(restorer, [str(t) for t in tuples], netns, directory, list(recorders), saved).run(theirs)
                finally:
                    os._exit(0)
            os.waitpid(child, 0)
            theirs.close()
            self._chan: socket.socket | None = ours

    def hold(self, sock: socket.socket) -> None:
        """Give the guard a duplicate of the next restored socket (in the order of `tuples`)."""
        assert self._chan is not None
        socket.send_fds(self._chan, [_HOLD], [sock.fileno()])

    def handing(self) -> None:
        """The handoff begins: if the restorer dies from now on, the sockets another process holds were handed off."""
        assert self._chan is not None
        self._chan.send(_HANDING)

    def keep_above(self, low: int) -> None:
        """Move the guard's socket to an fd number >= `low`, out of the way of the fds an exec hands over (a dup2
        onto it would close it: the guard would take that for the exec)."""
        assert self._chan is not None
        old = self._chan.detach()
        new = fcntl.fcntl(old, fcntl.F_DUPFD_CLOEXEC, low)
        os.close(old)
        self._chan = socket.socket(fileno=new)

    def close(self) -> None:
        """Goodbye: the guard closes its duplicates (the sockets are the program's now, or were closed in repair mode
        by the restorer) and exits."""
        if self._chan is not None:
            with contextlib.suppress(OSError):
                self._chan.send(_CLOSE)
            self._chan.close()
            self._chan = None


class _Guard:
    """The guard's side (see the module's docstring); run() never returns."""

    def __init__(self, restorer: int, tuples: list[str], netns: str | None, directory: Path | None,
                 recorders: list[socket.socket], marks: list[int]) -> None:
        self.restorer = restorer
        self.tuples = tuples
        self.marks = marks
        self.netns = netns
        self.directory = directory
        self.recorders = recorders
        self.socks: list[socket.socket] = []
        self.handing = False

    def run(self, chan: socket.socket) -> None:
        status = 0
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(chan, 64, 1)
                if data == _HOLD:
                    self.socks += [shared_socket(fd) for fd in fds]
                elif data == _HANDING:
                    self.handing = True
                elif data == _CLOSE:
                    break
                elif not data:
                    self._finish()
                    break
        except BaseException:
            status = 1
        finally:
            os._exit(status)

    @contextlib.contextmanager
    def _delivering(self, socks: list[socket.socket], conns: list[ConnTuple],
                    marks: list[int]) -> Iterator[Callable[[], None]]:
        """Yields a function that sends what the recorders kept for `conns` to their sockets `socks` (handed off,
        still theirs to the program), which carry SOCCR_MARK meanwhile and get their saved `marks` back afterwards
        (not the mark they have now: the restorer left them marked). A packet that cannot be delivered is left to
        the peer's retransmission, as the lock leaves it."""
        from sockrepair.errors import LockError
        from sockrepair.lock.record import Recorder
        from sockrepair.lock.ruleset import SOCCR_MARK
        from sockrepair.move.keep import netns_path, send_kept

        recorders = [Recorder(bound=sock) for sock in self.recorders]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCCR_MARK)

        def deliver() -> None:
            for recorder in recorders:
                with contextlib.suppress(OSError, LockError):
                    send_kept(recorder.take(conns).packets, netns_path(self.netns))

        try:
            yield deliver
        finally:
            for sock, mark in zip(socks, marks, strict=True):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            for recorder in recorders:
                recorder.close()

    def _finish(self) -> None:
        from sockrepair.engine._repair import repair_on
        from sockrepair.lock import Locker
        from sockrepair.move.freeze import held_elsewhere
        from sockrepair.move.journal import mark_completed, mark_handed
        from sockrepair.netns import named

        handed: list[int] = []
        if self.handing and self.socks:
            inodes = [os.fstat(s.fileno()).st_ino for s in self.socks]
            # a dying restorer may still list the sockets for a moment; one that exec'd the program holds them
            found = held_elsewhere(inodes, [self.restorer] if exiting(self.restorer) else [])
            handed = [i for i, ino in enumerate(inodes) if ino in found]
        if handed:
            conns = [self.tuples[i] for i in handed]
            if self.directory is not None:
                mark_handed(self.directory, conns)
            with self._delivering([self.socks[i] for i in handed], [ConnTuple.parse(t) for t in conns],
                                  [self.marks[i] for i in handed]) as deliver:
                deliver()
                with named(self.netns), Locker() as locker:
                    locker.unlock([ConnTuple.parse(t) for t in conns])
                deliver()  # what the lock stopped meanwhile: only a look after the unlock is sure to see it all
        for i, sock in enumerate(self.socks):
            if i not in handed:
                with contextlib.suppress(OSError):
                    repair_on(sock.fileno())
            sock.close()
        kept = self._keep_on() if not handed else ""
        if self.directory is not None and handed and len(handed) == len(self.tuples):
            mark_completed(self.directory, created=False)
        back = len(self.socks) - len(handed)
        if back:
            # nobody else says it: the restorer is gone, or became a program that ended without the connections
            where = (f" -D {self.directory}" if self.directory is not None else " --from-criu DIR") + (
                f" --netns {self.netns}" if self.netns else "") + " (--exec CMD... | --unix PATH)"
            with contextlib.suppress(OSError):
                # after an --exec the exit status is the program's, whatever happened to the connections: this line
                # is what says it
                what = (f"the handoff of {back} connection(s) did not complete (the program they went to ended or "
                        "closed them, or the restore ended first)" if self.handing else
                        f"the restore ended without handing off {back} connection(s)")
                os.write(2, (f"sockrepair: {what}: put back, "
                             f"still locked; `sockrepair restore{where}` restores them again"
                             + (f"; {kept}" if kept else "") + "\n").encode())

    def _keep_on(self) -> str:
        """Nothing was handed off: the connections wait, locked, for the next restore of the directory. The
        restorer's recorders (what it read from them and did not deliver is lost with it: the peers resend that)
        go to a new keeper until the lock's expiry the index records. Returns Keeper.hand_back's note ("" when
        there is nothing to keep or no directory)."""
        from sockrepair.errors import SockrepairError
        from sockrepair.lock.record import Recorder
        from sockrepair.move.journal import read_source
        from sockrepair.move.keep import REDELIVER, Keeper, read_kept

        if self.directory is None or not self.recorders:
            return ""
        try:
            expires = read_source(self.directory).lock_expires
            conns = [ConnTuple.parse(t) for t in self.tuples]
            adopted = [(_namespace(sock), Recorder(bound=sock)) for sock in self.recorders]
            redelivered = read_kept(self.directory, conns, REDELIVER)
        except (OSError, SockrepairError):
            return ""
        if expires is None:
            return ""
        keeper = Keeper((), adopted=adopted, redelivered=redelivered)
        try:
            return keeper.hand_back(self.directory, conns, expires)
        finally:
            keeper.close()
