"""Restoring every connection of an image directory (or of states in memory) into a network namespace."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator, Sequence

from sockrepair.engine._repair import repair_on
from sockrepair.engine._restore import restore_with
from sockrepair.engine._session import session_of
from sockrepair.engine._sockopts import batch_fresh_values, set_fresh_copies
from sockrepair.errors import SocketCallError
from sockrepair.lock import Locker
from sockrepair.lock.inject import Injector
from sockrepair.lock.ruleset import SOCCR_MARK
from sockrepair.netns import named
from sockrepair.state import ConnectionState


def restore_all(states: Sequence[ConnectionState], netns: str | None = None,
                on_restored: Callable[[socket.socket], object] | None = None,
                answered: Sequence[bool] = (), owed: Sequence[bool] = ()) -> list[socket.socket]:
    """All or nothing: if one connection cannot be restored, those already restored are closed again in repair mode
    (silently), so the images and the lock still describe every connection and the restore can be retried.
    `on_restored` is called with each socket as soon as it is made (migrate() gives it to its guard). `answered`:
    per state, whether its peer said what it holds (sockrepair.move.ask.Asked; none when empty). `owed`: per
    state, whether its old socket may owe its peer an ACK (sockrepair.engine._batch.owed_acks; restore_with's
    `owed`); when empty, every one may. The sockets are blocking whatever socket.setdefaulttimeout() this process
    set (which would leave O_NONBLOCK on the open file another program gets: its blocking read() failed, EAGAIN)."""
    socks: list[socket.socket] = []
    blocking = socket.getdefaulttimeout() is not None
    with named(netns):
        # what a new socket of this namespace holds now, for this batch only (a sysctl may change later)
        fresh = batch_fresh_values((s.tuple.family for s in states), len(states))
        try:
            # one pair of raw sockets for the whole batch, in the namespace of the restored sockets
            injector = Injector()
        except OSError:  # no CAP_NET_RAW: each restore tries on its own (engine/_restore.py _ask_for_ack)
            injector = None
        try:
            for i, state in enumerate(states):
                socks.append(restore_with(state, injector, i < len(answered) and answered[i],
                                          i >= len(owed) or owed[i], fresh))
                if blocking:
                    socks[-1].settimeout(None)
                if on_restored is not None:
                    on_restored(socks[-1])
            if fresh is not None and not fresh.unchanged():
                # a sysctl changed while the batch was restored: those made after it took the new value
                for sock, state in zip(socks, states):
                    set_fresh_copies(session_of(sock), state.tuple.family, state.sockopts)
        except BaseException:
            for s in socks:
                with contextlib.suppress(OSError):
                    repair_on(s.fileno())
                s.close()
            raise
        finally:
            if injector is not None:
                injector.close()
    return socks


@contextlib.contextmanager
def passing_lock(socks: Sequence[socket.socket | int], states: Sequence[ConnectionState]) -> Iterator[None]:
    """While the kept packets are delivered to the restored (or resumed) sockets `socks` (sockets or fds, restored
    from or checkpointed into `states`, in that order) and until the unlock, their own packets carry SOCCR_MARK,
    which the lock lets pass: a segment the kernel sends then (the quick ACK of a delivered request) would otherwise
    be dropped, and the peer would resend after its retransmission timeout. Then each socket gets back its saved
    mark (SO_MARK, even when the body raised). Raises OSError when a mark cannot be set."""
    try:
        # inside the try: when one cannot be marked, those marked already get their saved mark back
        mark_passing(socks)
        yield
    finally:
        give_saved_marks(socks, states)


def mark_passing(socks: Sequence[socket.socket | int]) -> None:
    """Give each of `socks` SOCCR_MARK (passing_lock's start, for a caller whose stretch is not one block). Raises
    SocketCallError for the first that cannot be marked (those before it stay marked)."""
    _set_marks(socks, [SOCCR_MARK] * len(socks), strict=True)


def give_saved_marks(socks: Sequence[socket.socket | int], states: Sequence[ConnectionState]) -> None:
    """Give each of `socks` the SO_MARK its state in `states` saved (ConnectionState.sockopts.mark, same order),
    going on past one that fails (passing_lock's end). Never raises: it runs on error paths, where fewer sockets
    than states may have been restored (only the first min(len(socks), len(states)) are given theirs)."""
    count = min(len(socks), len(states))
    _set_marks(socks[:count], [state.sockopts.mark for state in states[:count]], strict=False)


def _set_marks(socks: Sequence[socket.socket | int], marks: Sequence[int], strict: bool) -> None:
    """Set SO_MARK `marks[i]` on `socks[i]`; `strict`: raise SocketCallError for the first that fails, else go on
    with the others."""
    level, name = socket.SOL_SOCKET, socket.SO_MARK
    # one loop, each socket object's own call (half a microsecond; a session costs several): 1,000 of them each way,
    # inside the downtime
    for sock, mark in zip(socks, marks, strict=True):
        try:
            if isinstance(sock, int):
                # through the engine's session, not socket.socket(fileno=fd): under socket.setdefaulttimeout() that
                # constructor sets O_NONBLOCK on the fd, and a dump's fds are the resumed program's own sockets
                # (pidfd_getfd copies)
                session_of(sock).set(level, name, mark, "SO_MARK")
            else:
                sock.setsockopt(level, name, mark)
        except SocketCallError:
            if strict:
                raise
        except OSError as exc:
            if strict:
                raise SocketCallError(exc.errno or errno.EIO, f"setsockopt(SO_MARK={mark})",
                                      sock if isinstance(sock, int) else sock.fileno()) from None


def put_back(fds: Sequence[int], states: Sequence[ConnectionState], netns: str | None, ttl: float) -> None:
    """Undo a restore whose handoff failed: lock the connections again in `netns` for `ttl` seconds, then close the
    restored sockets' `fds` (owned by the caller until now) in repair mode, without FIN or RST, so that the images
    can be restored again before the lock ends. Raises LockError when the lock cannot be taken (the sockets are
    closed silently all the same)."""
    try:
        with named(netns), Locker() as locker:
            locker.lock([s.tuple for s in states], ttl=ttl)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                repair_on(fd)
            with contextlib.suppress(OSError):
                os.close(fd)


def unlock_in(netns: str | None, states: Sequence[ConnectionState]) -> None:
    with named(netns), Locker() as locker:
        locker.unlock([s.tuple for s in states])
