"""What the peers send while their connections move is kept and delivered, so that no peer waits its retransmission
timeout: a recorder (lock/record.py) in every namespace where the connections are locked, from before the freeze,
and after the restore the kept packets delivered in the destination (lock/inject.py), before the unlock, in the
order the locks saw them (the source's first: the peers sent there before the network moved); then, once more,
after the unlock: what a peer sent while the last ones were being delivered was kept too, and only a delivery after
the unlock is sure to see it all (the lock stops copying once its elements are gone).

Each recorder binds an nfnetlink_log group of its own, and the mover locks its connections with it (group_in()), so
that several movers record in one namespace at once. Keeping is best effort by construction: a recorder that cannot
bind (every group of lock/record.py's range is bound there) or whose caps are reached leaves those packets to the
plain dropping lock, and the counts say so."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sockrepair.errors import ImageError, LockError
from sockrepair.lock.inject import Injector
from sockrepair.lock.record import Held, KeepCaps, Recorder, WireKeys, wire_key
from sockrepair.netns import inside
from sockrepair.packet import packet_tuple
from sockrepair.private import create_private, open_dir, read_regular, replace_private
from sockrepair.state import ConnTuple


@dataclass(frozen=True)
class Kept:
    """What keeping did for one move: `delivered` packets sent to the restored sockets; `fell_back` packets the
    peers must resend after their retransmission timeout (over a cap, or lost by the recorder; a lower bound when
    `recording` is False, nothing having been counted); `note` says why recording was off."""

    delivered: int
    fell_back: int
    recording: bool
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"delivered": self.delivered, "fell_back": self.fell_back, "recording": self.recording,
                "note": self.note}


NOTHING_KEPT = Kept(0, 0, False, "nothing to keep")
# deliver() looks again for what came meanwhile at most this many times before it leaves the rest to its next call
_ROUNDS = 4


def netns_path(name: str | None) -> str:
    """The path of the network namespace named `name` (`ip netns`), or of this thread's for None."""
    return f"/run/netns/{name}" if name else "/proc/thread-self/ns/net"


class Keeper:
    """Recorders in the network namespaces at `paths` (/proc/PID/ns/net, /run/netns/NAME; one per namespace, in
    that order: the source's first), where the moving connections are locked. Made before the freeze (packets are
    kept from then on); deliver() or write() after; close() always."""

    def __init__(self, paths: Sequence[str], caps: KeepCaps = KeepCaps(), *,
                 adopted: Sequence[tuple[int, Recorder]] = (), fell_back: int = 0, note: str = "",
                 redelivered: Sequence[bytes] = ()) -> None:
        """`adopted`: recorders taken over from a keeper (sockrepair.move.keeper.take_over), with the inode of their
        namespace, which `paths` then skip; `fell_back` and `note`: what happened to the packets before;
        `redelivered`: the packets of a directory's REDELIVER file (resume_keeping), which saved_to() adds to."""
        self.note = note
        self.redelivered = list(redelivered)
        self._delivered = 0
        self._fell_back = fell_back
        self._adopted = len(adopted)
        self._recorders: list[Recorder] = [recorder for _, recorder in adopted]
        self._namespaces: list[int] = [namespace for namespace, _ in adopted]
        try:
            for path in paths:
                namespace = os.stat(path).st_ino
                if namespace in self._namespaces:
                    continue
                with inside(path):
                    self._recorders.append(Recorder(caps=caps))
                self._namespaces.append(namespace)
        except LockError as exc:
            for recorder in self._recorders[self._adopted :]:
                recorder.close()
            del self._recorders[self._adopted :], self._namespaces[self._adopted :]
            self.note = "; ".join(filter(None, [self.note, f"not keeping the peers' packets: {exc}"]))

    def deliver(self, tuples: Sequence[ConnTuple], into: str, before: Sequence[bytes] = (),
                save: Callable[[Sequence[bytes]], None] | None = None) -> Kept:
        """Send `before` (packets kept earlier, e.g. read from a dump's packets.img), then what was kept here for
        `tuples` until nothing more is (a peer may send while its packets are delivered), to the restored sockets
        in the namespace at path `into`; they must be out of repair mode. Call it while the lock is still held, and
        AGAIN right after the unlock: a packet the peer sent between the last look and the unlock was stopped and
        kept, and nothing else delivers it (the peer would resend it after its retransmission timeout, >= 200 ms).
        `save` is given what was kept here before it is sent (saved_to()). Returns the totals of every call so far.
        Raises LockError when the kernel refuses a packet, and what `save` raises."""
        self._delivered += send_kept(before, into)
        if not self._recorders:
            return Kept(self._delivered, self._fell_back, False, self.note)
        keys = WireKeys(tuples)
        held = self._take(keys)
        for round_ in range(1, _ROUNDS + 1):
            if not held.packets:
                break
            if save is not None:
                save(held.packets)
            self._delivered += send_kept(held.packets, into)
            if round_ < _ROUNDS:  # the last round leaves what came meanwhile to the next call
                held = self._take(keys)
        return Kept(self._delivered, self._fell_back + held.fell_back, True, self.note)

    def records_in(self, path: str) -> bool:
        """Whether one of this keeper's recorders is in the network namespace at `path` (netns_path())."""
        try:
            return os.stat(path).st_ino in self._namespaces
        except OSError:
            return False

    def group_in(self, path: str) -> int | None:
        """The nfnetlink_log group of this keeper's recorder in the network namespace at `path` (for the lock of
        the connections there: Locker.lock(..., group=)); None when it records nothing there, or took its recorder
        over from another process (whose locks carry their group already)."""
        try:
            namespace = os.stat(path).st_ino
        except OSError:
            return None
        for ino, recorder in zip(self._namespaces, self._recorders, strict=True):
            if ino == namespace:
                return recorder.group
        return None

    def sockets(self) -> list[socket.socket]:
        """The bound nfnetlink_log sockets of this keeper's recorders (for a process that goes on reading them)."""
        return [recorder.socket for recorder in self._recorders]

    def peek(self, conns: Sequence[ConnTuple]) -> list[list[bytes]]:
        """The packets kept for each of `conns` so far, every recorder's in turn (they stay kept); each recorder is
        drained once, however many connections are looked at (a poll of a thousand, inside the downtime)."""
        kept: list[list[bytes]] = [[] for _ in conns]
        for recorder in self._recorders:
            for packets, more in zip(kept, recorder.peek(conns), strict=True):
                packets += more
        return kept

    def pending(self, tuples: Sequence[ConnTuple]) -> int:
        """How many packets are kept for `tuples` so far (they stay kept)."""
        return sum(recorder.pending(tuples) for recorder in self._recorders)

    def write(self, dir_fd: int, tuples: Sequence[ConnTuple]) -> Kept:
        """Write what was kept so far for `tuples` to packets.img in the directory `dir_fd` (created 0600 with
        O_EXCL|O_NOFOLLOW, fsynced), for a restore in another process to deliver (read_kept, send_kept). Raises
        OSError when it cannot be written (FileExistsError when the file is there already)."""
        if not self._recorders:
            return Kept(0, 0, False, self.note)
        from sockrepair.image.packets import (  # construct: loaded only when files are made
            NAME,
            encode_packets,
        )

        held = self._take(tuples)
        with create_private(dir_fd, NAME) as f:
            f.write(encode_packets(held.packets))
            f.flush()
            os.fsync(f.fileno())
        return Kept(len(held.packets), held.fell_back, True)

    def hand_off(self, dir_fd: int, tuples: Sequence[ConnTuple], expires: float) -> Kept:
        """write(), then hand the recorders to a keeper (sockrepair.move.keeper.spawn_keeper) that goes on
        recording what the peers send to `tuples` into kept.img in `dir_fd` until a restore takes them back or
        `expires` (wall-clock seconds, the lock's expiry); this Keeper records nothing more. Without recorders, or
        when the keeper cannot start (`note` says why), only write() happens. Raises what write() raises."""
        from sockrepair.move.keeper import spawn_keeper

        kept = self.write(dir_fd, tuples)
        if not self._recorders:
            return kept
        try:
            pid = spawn_keeper(dir_fd, list(zip(self._namespaces, self._recorders, strict=True)), tuples, expires)
        except (OSError, LockError) as exc:
            return Kept(kept.delivered, kept.fell_back, True, f"no keeper after the dump: {exc}")
        self.close()
        return Kept(kept.delivered, kept.fell_back, True, f"a keeper (pid {pid}) goes on keeping until the restore")

    def hand_back(self, directory: Path, tuples: Sequence[ConnTuple], expires: float) -> str:
        """A restore of `directory` that took its keeper over is put back (its connections locked again until
        `expires`, wall-clock seconds): what the recorders hold for `tuples` is added to REDELIVER (saved_to), then
        they go to a new keeper (sockrepair.move.keeper.spawn_keeper), logging into keeper.LATER, until the next
        restore. Without it nobody recorded until that restore, and what the peers sent meanwhile waited for their
        retransmission. Returns a note saying which; never raises (without a keeper the lock drops, as before)."""
        from sockrepair.move.keeper import LATER, spawn_keeper

        if not self._recorders:
            return ""
        try:
            held = self._take(tuples)
            if held.packets:
                saved_to(directory, self)(held.packets)
            dir_fd = open_dir(directory, writing=True)
            try:
                pid = spawn_keeper(dir_fd, list(zip(self._namespaces, self._recorders, strict=True)), tuples,
                                   expires, LATER)
            finally:
                os.close(dir_fd)
        except (OSError, LockError) as exc:
            return f"nobody keeps what their peers send meanwhile ({exc})"
        self.close()
        return f"a keeper (pid {pid}) keeps what their peers send meanwhile"

    def _take(self, tuples: Sequence[ConnTuple] | WireKeys) -> Held:
        held = Held()
        for recorder in self._recorders:
            held.extend(recorder.take(tuples))
        return held

    def close(self) -> None:
        """Close this process's recorders (a keeper given them has its own copies); it records nothing more."""
        for recorder in self._recorders:
            with contextlib.suppress(OSError):
                recorder.close()
        self._recorders, self._namespaces = [], []


def resume_keeping(directory: Path, tuples: Sequence[ConnTuple], paths: Sequence[str] = ()) -> tuple[list[bytes],
                                                                                                     Keeper]:
    """What a restore of `directory` delivers and goes on keeping with: the packets of packets.img, kept.img
    (read_kept, then sockrepair.move.keeper.take_over: its keeper stops and hands over its recorders), REDELIVER
    (what earlier restores that were put back delivered from their recorders) and keeper.LATER (what the keeper one of
    them started kept since: Keeper.hand_back; added to REDELIVER here, and removed), and a Keeper with those
    recorders plus new ones in the namespaces at `paths` they do not cover. Raises ImageError as they do (the
    keeper's recorders are closed then), OSError when REDELIVER cannot be written."""
    from sockrepair.image.keptlog import NAME as KEPT
    from sockrepair.image.packets import (
        encode_packets,  # construct: loaded only when files are read
    )
    from sockrepair.move.keeper import LATER, RECORD, read_log, take_over

    redelivered = read_kept(directory, tuples, REDELIVER)
    dumped = read_kept(directory, tuples)
    taken = take_over(directory, tuples)
    kept = taken.packets
    if taken.log != KEPT:
        # the dump's keeper handed over to an earlier restore: its log stays as it ended
        log = read_log(directory / KEPT, tuples)
        kept = log.packets if log is not None else []
    if taken.log == LATER:
        try:
            # what it kept came after everything in REDELIVER, which this restore goes on adding to
            redelivered += taken.packets
            replace_private(directory, REDELIVER, encode_packets(redelivered))
            for name in (RECORD, LATER):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / name)
        except BaseException:
            for _, recorder in taken.recorders:
                recorder.close()
            raise
    # in the order the peers sent them: during the dump, to the dump's keeper, then to the restores' recorders and
    # the keepers of those put back
    return dumped + kept + redelivered, Keeper(paths, adopted=taken.recorders, fell_back=taken.fell_back,
                                               note=taken.note, redelivered=redelivered)


# What a restore of a directory delivered from its own recorders, saved before delivering it (saved_to())
REDELIVER = "redeliver.img"


def read_kept(directory: Path, tuples: Sequence[ConnTuple], name: str | None = None) -> list[bytes]:
    """The packets of DIRECTORY/packets.img (written by a dump; [] without the file), or of DIRECTORY/`name` in the
    same format, read and checked BEFORE the restore, so that a damaged file stops the restore while the connections
    are still safe in their images. Every packet must be from the peer of one of `tuples` (the connections of the
    directory) to it: a packet for anything else would leave the host, or reach a port with no socket. Raises
    ImageError for a damaged, oversized or non-regular file, or a packet for another connection."""
    from sockrepair.image.packets import (  # construct: loaded only when files are read
        MAX_FILE,
        NAME,
        decode_packets,
    )

    path = directory / (name or NAME)
    try:
        data = read_regular(path, MAX_FILE)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}", path=str(path)) from None
    packets = decode_packets(data, str(path))
    ours = {wire_key(conn) for conn in tuples}
    for n, packet in enumerate(packets):
        if packet_tuple(packet) not in ours:
            raise ImageError(f"{path}: packet {n} is for {packet_tuple(packet)}, not a connection of this directory",
                             path=str(path), field=f"packets[{n}]")
    return packets


def saved_to(directory: Path, keeper: Keeper) -> Callable[[Sequence[bytes]], None]:
    """A `save` for Keeper.deliver in `sockrepair restore -D directory`: the packets are added to
    DIRECTORY/REDELIVER (0600, written whole under a temporary name, fsynced, renamed into place) before they are
    delivered. The restored sockets acknowledge what they are delivered, and those ACKs pass the lock
    (sockrepair.move.land.passing_lock): if the restore is then put back (interrupted or failed before its handoff,
    the sockets closed in repair mode), their peers will never send those packets again, so a restore run again
    must deliver them itself, as it delivers packets.img and kept.img. The file's packets so far are the ones
    resume_keeping() read into `keeper` (read once per restore). Raises OSError when the file cannot be written
    (nothing was sent then)."""
    # construct: loaded only when files are made
    from sockrepair.image.packets import encode_packets

    saved = keeper.redelivered

    def save(packets: Sequence[bytes]) -> None:
        saved.extend(packets)
        replace_private(directory, REDELIVER, encode_packets(saved))

    return save


def send_kept(packets: Sequence[bytes], into: str) -> int:
    """Send `packets` to the connections restored in the network namespace at path `into` (netns_path()) while they
    are still locked; returns how many were sent. Raises LockError when the kernel refuses one."""
    if not packets:
        return 0
    with inside(into), Injector() as injector:
        return injector.send(packets)
