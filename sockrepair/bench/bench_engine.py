"""Engine benchmark: sockrepair's freeze-to-resume cycle, timed per phase, in the shape of sockrepair/bench/results.py.

    python -m sockrepair.bench.bench_engine [--quick] [--json OUT] [--c]

The same cycle as the C reference (sockrepair/bench/reference/repair_cycle.c), through the Python engine: for a loopback
pair it makes itself (the client end moves, the accepted end is the peer), with Q bytes in each queue, it times
read_state (checkpoint), serialize (state.to_bytes), close (discard with the state), deserialize
(ConnectionState.from_bytes of that image) and restore (of the state read back: the image is what travels). The
queues are
filled as the C reference fills them, and an entry whose queues held fewer bytes than asked does not count. After
every cycle each side writes 4 KiB more and both directions are read to the end and compared with what was written.

Single mode repeats the cycle per queue size, in blocks of consecutive cycles of one size, each block after one
untimed cycle of its size, sizes interleaved block by block (results.SINGLE_BLOCK says why); batch mode
checkpoints K connections, serializes them, discards them, then restores them all, as sockrepair.move.land does
(one pair of raw sockets for the batch's owed ACKs, opened inside the timed restore), without and with the network
lock (phases lock and unlock around the rest); the peers live in a child process, as in the C reference. Everything
runs in a network namespace made for the run (root needed). With --c the C reference's single mode runs a round
of blocks after each of the engine's (so that both see the machine's load alike), its batches after, and a table of
ratios is printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import selectors
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair import checkpoint, discard, restore
from sockrepair.bench import cref
from sockrepair.bench.results import (
    C_IMPLS,
    SINGLE_BLOCK,
    SOCKREPAIR_IMPL,
    Batch,
    Single,
    batch_from_samples,
    merge_single,
    single_from_samples,
)
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine._batch import checkpoint_many, owed_acks, segs_out_of
from sockrepair.engine._ffi import lib
from sockrepair.engine._restore import restore_with
from sockrepair.engine._sockcall import ioctl_int
from sockrepair.engine._sockopts import batch_fresh_values
from sockrepair.errors import BenchmarkError, SockrepairError
from sockrepair.lab.pattern import first_mismatch, pattern
from sockrepair.lock import Locker
from sockrepair.lock.inject import Injector
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState, ConnTuple

SIZES = (0, 4 << 10, 64 << 10, 1 << 20, 16 << 20)
BATCHES = (1, 100, 1000, 10000)
TAIL_BYTES = 4096  # written by each side after a cycle: the restored sequence numbers must carry on
BATCH_PROBE = 16
IO_TIMEOUT = 30.0
PEER_RCVBUF = 64 << 10  # small, so the moving end's send queue fills with bytes the peer never took
LOOPBACK = "127.0.0.1"
C_ROUND_TIMEOUT = 600.0  # one round of the C reference: a block of every size, in each variant
PART = "engine"  # the .part of the BenchmarkErrors of a cycle that could not be set up or lost bytes


@dataclass(frozen=True)
class Plan:
    reps: int
    big_reps: int  # for 16 MiB, whose setup and verification take most of a run's time
    batch_reps: int


QUICK = Plan(reps=10, big_reps=2, batch_reps=1)
FULL = Plan(reps=300, big_reps=30, batch_reps=5)


@functools.lru_cache(maxsize=2)
def _stream(salt: int, length: int) -> bytes:
    """The first `length` bytes of a checkable stream, made once per run: the sha256 pattern is slow to build, and
    every cycle has a connection of its own, so the same stream can serve them all."""
    return pattern(0, length, salt)


def _close_abort(sock: socket.socket | None) -> None:
    """Teardown with RST: thousands of cycles must not leave TIME_WAIT sockets holding loopback ports."""
    if sock is None or sock.fileno() < 0:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _listener(rcvbuf: int = 0, backlog: int = 1) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.bind((LOOPBACK, 0))
    listener.listen(backlog)
    return listener


def _connect(listener: socket.socket, buffers: int = 0) -> socket.socket:
    """Buffers are sized before the handshake, so that the window scale fits them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if buffers:
        sock.setsockopt(socket.SOL_SOCKET, lib.SO_RCVBUFFORCE, buffers)
        sock.setsockopt(socket.SOL_SOCKET, lib.SO_SNDBUFFORCE, buffers)
    sock.connect(listener.getsockname())
    return sock


def _wait(sock: socket.socket, events: int) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, events)
        if not sel.select(IO_TIMEOUT):
            raise BenchmarkError(f"no progress on a socket for {IO_TIMEOUT:g} s", part=PART)


def _write(sock: socket.socket, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            _wait(sock, selectors.EVENT_WRITE)


def _ack_now(sock: socket.socket) -> None:
    """A delayed ACK would leave the sender unsure for up to 40 ms whether the window moved."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _fill_recv_queue(peer: socket.socket, sock: socket.socket, data: bytes | memoryview) -> None:
    """The peer sends `data`, which `sock` does not read; returns once all of it sits in sock's receive queue."""
    deadline = time.monotonic() + IO_TIMEOUT
    off = inq = 0
    while inq < len(data):
        sent = 0
        if off < len(data):
            try:
                sent = peer.send(memoryview(data)[off : off + (64 << 10)], socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            off += sent
        _ack_now(sock)
        inq = ioctl_int(sock.fileno(), lib.SIOCINQ, "SIOCINQ")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"only {inq} of {len(data)} bytes reached the receive queue", part=PART)
        if not sent and inq < len(data):
            time.sleep(50e-6)


# the peer's last advertised window in bytes (Linux 5.4+)
SND_WND = tcpinfo.view("tcpi_snd_wnd")


def _snd_wnd(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, SND_WND.size)
    if len(info) < SND_WND.size:
        raise BenchmarkError("this kernel's TCP_INFO has no tcpi_snd_wnd (Linux 5.4+)", part=PART)
    return int(SND_WND.unpack(info)[0])


def _fill_send_queue(sock: socket.socket, peer: socket.socket, q: int, stream: bytes) -> int:
    """First fill the peer's small receive buffer until its window is closed and every byte sent is acknowledged,
    then write q more bytes: they stay in the send queue, never sent. Returns how many bytes of `stream` were
    written.

    No write is larger than what the window still takes, so the window is used up to its last byte: a remainder
    smaller than the segment waiting for it stays unsent until the zero-window probe timer sends it (tcp_write_wakeup,
    an RTO later), and a single cycle takes no lock, so that could land between its checkpoint and its discard
    (measured: 662 bytes of a 64 KiB peer buffer were left so, and discard then refused a socket that sent while
    frozen)."""
    if q == 0:
        return 0
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd, off = sock.fileno(), 0
    deadline = time.monotonic() + IO_TIMEOUT
    while True:
        _ack_now(peer)
        outq = ioctl_int(fd, lib.SIOCOUTQ, "SIOCOUTQ")
        unsent = ioctl_int(fd, lib.SIOCOUTQNSD, "SIOCOUTQNSD")
        room = _snd_wnd(sock) - outq
        if unsent == 0 and room > 0:
            step = min(room, 64 << 10)
            if off + step > len(stream) - q:
                raise BenchmarkError("the peer's window never closed", part=PART)
            _write(sock, memoryview(stream)[off : off + step])
            off += step
        elif unsent == 0 and outq == 0:
            break
        elif time.monotonic() > deadline:
            raise BenchmarkError(f"the peer left {outq - unsent} bytes unacknowledged for {IO_TIMEOUT:g} s", part=PART)
        else:
            time.sleep(50e-6)
    _write(sock, memoryview(stream)[off : off + q])
    return off + q


# Verification reads into this one buffer, as the C reference reads into a static one: reading a megabyte into fresh
# bytes objects (and slicing the expected bytes into copies) between timed cycles left glibc's heap top trimmed or not
# depending on what else the process held, so that the next cycle's to_bytes() landed on untouched pages in some runs
# (hundreds of page faults, +0.5 ms at 1 MiB) and on reused ones in others.
VERIFY_CHUNK = 64 << 10


@dataclass
class _End:
    """One end of a connection in an exchange: what it still writes, what it must read (from offset 0; a view of
    the stream, never a copy) and how many of those bytes arrived."""

    sock: socket.socket
    out: memoryview
    expect: memoryview
    got: int = 0


def _exchange(ends: Sequence[_End]) -> None:
    """Write every end's bytes and read each end's expected bytes to the last one, all at once (a blocking write on
    one side could wait on a read on the other); a byte that differs from what was written is an error."""
    pending = {end.sock.fileno(): end for end in ends}
    buf = bytearray(VERIFY_CHUNK)
    view = memoryview(buf)
    with selectors.DefaultSelector() as sel:
        for fd, end in pending.items():
            end.sock.setblocking(False)
            sel.register(fd, selectors.EVENT_READ | (selectors.EVENT_WRITE if end.out else 0), end)
        while pending:
            ready = sel.select(IO_TIMEOUT)
            if not ready:
                stuck = next(iter(pending.values()))
                raise BenchmarkError(f"verify stalled: {stuck.got} of {len(stuck.expect)} bytes arrived", part=PART)
            for key, events in ready:
                end = key.data
                if events & selectors.EVENT_WRITE and end.out:
                    end.out = end.out[end.sock.send(end.out):]
                if events & selectors.EVENT_READ and end.got < len(end.expect):
                    n = end.sock.recv_into(view, min(VERIFY_CHUNK, len(end.expect) - end.got))
                    if not n:
                        raise BenchmarkError(f"EOF after {end.got} of {len(end.expect)} bytes", part=PART)
                    start = end.got
                    end.got += n
                    # a bytearray on the left: its == is a memcmp, where a memoryview's compares item by item
                    # (4 ms a MiB, which let other processes cool the caches before the next timed cycle)
                    bad = first_mismatch(buf[:n], end.expect[start : start + n])
                    if bad is not None:
                        raise BenchmarkError(f"wrong byte at offset {start + bad} of {len(end.expect)}", part=PART)
                done = not end.out and end.got == len(end.expect)
                if done:
                    sel.unregister(key.fd)
                    del pending[key.fd]
                elif not end.out and key.events & selectors.EVENT_WRITE:
                    sel.modify(key.fd, selectors.EVENT_READ, end)


# ---- single-connection mode ----


MOVE_PHASES = ("read_state", "serialize", "close", "deserialize", "restore")


def timed_move(sock: socket.socket, mark: Callable[[int], None] | None = None
               ) -> tuple[ConnectionState, socket.socket, dict[str, float]]:
    """checkpoint, to_bytes, discard, from_bytes and restore of `sock`, each timed: (the state read, the restored
    socket, each of MOVE_PHASES' time in us). `mark(0)` and `mark(1)` are called right before and after the timed
    part (sockrepair/bench/syscalls.py). Raises what the engine raises."""
    if mark is not None:
        mark(0)
    t0 = time.perf_counter_ns()
    state = checkpoint(sock)
    t1 = time.perf_counter_ns()
    image = state.to_bytes()
    t2 = time.perf_counter_ns()
    discard(sock, state)
    t3 = time.perf_counter_ns()
    back = ConnectionState.from_bytes(image)
    t4 = time.perf_counter_ns()
    restored = restore(back)
    t5 = time.perf_counter_ns()
    if mark is not None:
        mark(1)
    marks = (t0, t1, t2, t3, t4, t5)
    return state, restored, {name: (b - a) / 1000 for name, a, b in zip(MOVE_PHASES, marks, marks[1:])}


def _single_cycle(q: int, to_peer: bytes, to_sock: bytes) -> tuple[dict[str, float], int]:
    """One cycle on a fresh pair with q bytes in each queue, `to_peer` being what the moving end writes and
    `to_sock` what the peer writes: the phases' times (us) and the fewest bytes that a queue held at checkpoint."""
    restored = None
    with _listener(PEER_RCVBUF if q else 0) as listener:
        sock = _connect(listener, 2 * q + (1 << 20) if q else 0)
        peer, _ = listener.accept()
    try:
        view_peer, view_sock = memoryview(to_peer), memoryview(to_sock)
        _fill_recv_queue(peer, sock, view_sock[:q])
        sent = _fill_send_queue(sock, peer, q, to_peer)
        state, restored, times = timed_move(sock)
        held = min(len(state.send_queue), len(state.recv_queue))
        _exchange([
            _End(restored, view_peer[sent : sent + TAIL_BYTES], view_sock[: q + TAIL_BYTES]),
            _End(peer, view_sock[q : q + TAIL_BYTES], view_peer[: sent + TAIL_BYTES]),
        ])
    finally:
        for s in (sock, peer, restored):
            _close_abort(s)
    return times, held


def run_single(sizes: Sequence[int], reps: int, big_reps: int, block: int = SINGLE_BLOCK,
               between: Callable[[int], None] | None = None) -> list[Single]:
    """Each size `reps` times (sizes of 16 MiB and more `big_reps` times), in blocks of `block` consecutive cycles of
    one size, each block after one untimed cycle of its size, sizes interleaved block by block: the machine's drift
    touches every size alike, and no timed cycle starts with caches cooled by another size's megabytes. After each
    round of blocks `between(n)` runs, n being the round's block length (the C reference's round, so that the
    machine's load hits both alike)."""
    samples: dict[int, dict[str, list[float]]] = {q: {} for q in sizes}
    errors: dict[int, str] = {}
    held: dict[int, int] = {q: q for q in sizes}
    longest = max(sizes, default=0)
    to_peer = _stream(2, longest + (8 << 20))  # room for the bytes that close the peer's window, and the tail
    to_sock = _stream(3, longest + TAIL_BYTES)

    def cycle(q: int, timed: bool) -> None:
        try:
            times, least = _single_cycle(q, to_peer, to_sock)
        except (OSError, SockrepairError) as exc:
            errors[q] = str(exc)
            return
        held[q] = min(held[q], least)
        if timed:
            for name, us in times.items():
                samples[q].setdefault(name, []).append(us)

    for first in range(0, reps, block):
        for q in sizes:
            mine = big_reps if q >= 16 << 20 else reps
            if q in errors or first >= mine:
                continue
            cycle(q, timed=False)
            for _ in range(min(block, mine - first)):
                if q not in errors:
                    cycle(q, timed=True)
        if between is not None:
            between(min(block, reps - first))
    out = []
    for q in sizes:
        error = errors.get(q)
        if error is None and held[q] < q:
            # a cycle over emptier queues than asked would flatter the figure: it does not count
            error = f"a queue held only {held[q]} of {q} bytes at checkpoint"
        out.append(single_from_samples(SOCKREPAIR_IMPL, q, samples[q], error is None, error, block=block))
    return out


# ---- batch mode: K connections checkpointed, serialized, closed, then restored ----


def _probe(salt: int, port: int, from_peer: bool) -> bytes:
    """Each connection's probe bytes are keyed by the moving end's port, so a mix-up between connections shows."""
    return pattern(0, BATCH_PROBE, (salt << 20) + 2 * port + from_peer)


def _probe_ends(socks: Sequence[socket.socket], salt: int, moving: bool) -> list[_End]:
    ends = []
    for sock in socks:
        port = (sock.getsockname() if moving else sock.getpeername())[1]
        mine, theirs = _probe(salt, port, not moving), _probe(salt, port, moving)
        ends.append(_End(sock, memoryview(mine), memoryview(theirs)))
    return ends


def _send_tag(fd: int, tag: bytes, text: str = "") -> None:
    os.write(fd, tag + text.encode()[:500].ljust(500))


def _expect_tag(fd: int, tag: bytes) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        if not sel.select(IO_TIMEOUT * 4):
            raise BenchmarkError("the peer process did not answer", part=PART)
    msg = os.read(fd, 501)
    if not msg:
        raise BenchmarkError("the peer process went away", part=PART)
    if msg[:1] == b"E":
        raise BenchmarkError(f"peer: {msg[1:].decode().strip()}", part=PART)
    if msg[:1] != tag:
        raise BenchmarkError(f"the peer said {msg[:1]!r}, expected {tag!r}", part=PART)


def _batch_peer(listener: socket.socket, k: int, salt: int, up: int, down: int) -> None:
    """The child: accepts the K peer ends, and once the moving side says they are restored, exchanges the probe
    bytes. The connections stay up until the parent closes its end of the pipe."""
    peers: list[socket.socket] = []
    try:
        peers = [listener.accept()[0] for _ in range(k)]
        listener.close()
        _send_tag(up, b"A")
        _expect_tag(down, b"R")
        _exchange(_probe_ends(peers, salt, moving=False))
        _send_tag(up, b"V")
    except BaseException as exc:  # noqa: BLE001 - the child reports every failure to the parent, then exits
        _send_tag(up, b"E", str(exc))
    while os.read(down, 1):
        pass
    for peer in peers:
        _close_abort(peer)
    os._exit(0)


def _batch_cycle(k: int, salt: int, locker: Locker | None) -> dict[str, float]:
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    socks: list[socket.socket] = []
    restored: list[socket.socket] = []
    child = -1
    try:
        with _listener(backlog=4096) as listener:
            child = os.fork()
            if child == 0:
                os.close(up_r)
                os.close(down_w)
                _batch_peer(listener, k, salt, up_w, down_r)
            os.close(up_w)
            os.close(down_r)
            up_w = down_r = -1
            socks = [_connect(listener) for _ in range(k)]
        _expect_tag(up_r, b"A")
        tuples = [ConnTuple(socket.AF_INET, *s.getsockname(), *s.getpeername()) for s in socks]
        marks = [time.perf_counter_ns()]
        # as a move does (sockrepair/move/take.py): tcpi_segs_out before the lock, owed_acks after the checkpoint,
        # so that only the sockets that may owe their peer an ACK are made to send one
        sent = segs_out_of(socks)
        if locker is not None:
            locker.lock(tuples)
            marks.append(time.perf_counter_ns())
        states = checkpoint_many(socks)
        owed = owed_acks(socks, states, sent)
        marks.append(time.perf_counter_ns())
        for state in states:
            state.to_bytes()
        marks.append(time.perf_counter_ns())
        for sock, state in zip(socks, states):
            discard(sock, state)
        marks.append(time.perf_counter_ns())
        with Injector(families=(socket.AF_INET,)) as injector:
            # as sockrepair.move.land.restore_all does
            fresh = batch_fresh_values((socket.AF_INET,), k)
            restored = [restore_with(state, injector, False, owes, fresh) for state, owes in zip(states, owed)]
        marks.append(time.perf_counter_ns())
        if locker is not None:
            locker.unlock(tuples)
            marks.append(time.perf_counter_ns())
        _send_tag(down_w, b"R")
        _exchange(_probe_ends(restored, salt, moving=True))
        _expect_tag(up_r, b"V")
    finally:
        for sock in restored or socks:
            _close_abort(sock)
        for fd in (up_r, up_w, down_r, down_w):
            if fd >= 0:
                os.close(fd)
        if child > 0:
            os.waitpid(child, 0)
    names = ["read_state", "serialize", "close", "restore"]
    if locker is not None:
        names = ["lock", *names, "unlock"]
    return {name: (b - a) / 1e9 for name, a, b in zip(names, marks, marks[1:])}


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def run_batches(batches: Sequence[int], reps: int, locker: Locker) -> list[Batch]:
    """Each size without and with the lock, `reps` runs each, interleaved."""
    _raise_fd_limit(max(batches, default=0) + 256)
    cases = [(k, lock) for k in batches for lock in (False, True)]
    samples: dict[tuple[int, bool], dict[str, list[float]]] = {case: {} for case in cases}
    errors: dict[tuple[int, bool], str] = {}
    salt = 1
    for _ in range(reps):
        for case in cases:
            if case in errors:
                continue
            salt += 1
            try:
                times = _batch_cycle(case[0], salt, locker if case[1] else None)
            except (OSError, SockrepairError) as exc:
                errors[case] = str(exc)
                continue
            for name, seconds in times.items():
                samples[case].setdefault(name, []).append(seconds)
    return [batch_from_samples(SOCKREPAIR_IMPL, k, samples[(k, lock)], (k, lock) not in errors, with_lock=lock,
                               error=errors.get((k, lock)))
            for k, lock in cases]


def _c_round(binary: Path, sizes: Sequence[int], into: list[Single], n: int) -> None:
    """One round of the C reference's single mode: a block of n cycles of every size, in each variant."""
    into.extend(cref.run(binary, sizes, n, (), timeout=C_ROUND_TIMEOUT)["single"])


def run(quick: bool = False, sizes: Sequence[int] = SIZES, batches: Sequence[int] = BATCHES,
        independent_check: bool = True, c_binary: Path | None = None) -> dict[str, Any]:
    """{"single": [Single], "batch": [Batch], "independent": [Independent], "syscalls": [Syscalls], "notes": [str]}
    of impl "sockrepair", measured in a network namespace made for the run. Single entries take no lock; batch
    entries come without and with it; the independent check (sockrepair/bench/independent.py) and the traced
    cycles (sockrepair/bench/syscalls.py) run last, each in a namespace of its own. With `c_binary` (the C
    reference, cref.build()), each round of single-mode blocks is followed by one round of the C reference's, every
    variant on the sizes it measures, in its own namespace: "c_single" holds their entries, measured in the same
    minutes as the engine's."""
    plan = QUICK if quick else FULL
    c_parts: list[Single] = []
    c_round = None if c_binary is None else functools.partial(_c_round, c_binary, sizes, c_parts)
    with NetNS() as ns, ns.entered():
        single = run_single(sizes, plan.reps, plan.big_reps, between=c_round)
        with Locker(label="bench-engine") as locker:
            batch = run_batches(batches, plan.batch_reps, locker)
    notes = [] if not quick else ["engine benchmark in quick mode: few cycles, medians are rough"]
    checked: list[Any] = []
    counted: list[Any] = []
    if independent_check:
        from sockrepair.bench import independent, syscalls

        checked = independent.run(quick, notes=notes)
        try:
            counted = syscalls.run(notes=notes)
        except BenchmarkError as exc:
            notes.append(f"the system calls per cycle were not counted: {exc}")
    return {"single": single, "batch": batch, "independent": checked, "syscalls": counted, "notes": notes,
            "c_single": merge_single(c_parts)}


# ---- command line ----


def _c_batches(binary: Path, quick: bool, batches: Sequence[int]) -> list[Batch]:
    plan = QUICK if quick else FULL
    return cref.run(binary, (), plan.reps, batches, batch_reps=plan.batch_reps)["batch"] if batches else []


def _c_median(c: Single | None, phase: str) -> float | None:
    stat = None if c is None else c["total"] if phase == "total" else c["phases"].get(phase)
    return None if stat is None else stat["median_us"]


def _print(ours: dict[str, Any], ref: dict[str, Any] | None) -> None:
    """Per phase: sockrepair, the minimal C, and the ratio to each C variant measured (cref.VARIANTS)."""
    c_single = {(e["impl"], e["queue_bytes"]): e for e in (ref or {}).get("single", [])}
    print(f"{'queue':>10} {'phase':>10} {'sockrepair':>12} {'C':>10} " + " ".join(f"{'x ' + i:>11}" for i in C_IMPLS))
    for entry in ours["single"]:
        q = entry["queue_bytes"]
        rows = [(name, st["median_us"]) for name, st in entry["phases"].items()]
        rows.append(("total", entry["total"]["median_us"]))
        for name, us in rows:
            refs = [_c_median(c_single.get((impl, q)), name) for impl in C_IMPLS]
            ratios = " ".join(f"{us / c_us:11.2f}" if c_us else f"{'-':>11}" for c_us in refs)
            c_text = f"{refs[0]:10.1f}" if refs[0] else f"{'-':>10}"
            print(f"{q:>10} {name:>10} {us:12.1f} {c_text} {ratios}")
        if not entry["verified"]:
            print(f"{q:>10} NOT VERIFIED: {entry['error']}")
    c_batch = {(e["impl"], e["connections"]): e for e in (ref or {}).get("batch", [])}
    for entry in ours["batch"]:
        found = [(impl, c_batch.get((impl, entry["connections"]))) for impl in C_IMPLS]
        c_text = "".join(f"  {impl} {c['conn_per_s']:,.0f} conn/s" for impl, c in found if c)
        lock = "with lock" if entry["with_lock"] else "no lock  "
        phases = " ".join(f"{n} {s * 1e3:.1f}" for n, s in entry["phases_s"].items())
        state = "" if entry["verified"] else f"  NOT VERIFIED: {entry['error']}"
        print(f"batch {entry['connections']:>6} {lock} {entry['conn_per_s']:>10,.0f} conn/s{c_text}  [ms: {phases}]"
              f"{state}")
    from sockrepair.bench.report import AGREEMENT, agreement

    ours_single = {e["queue_bytes"]: e for e in ours["single"]}
    for e in ours.get("syscalls", []):
        calls = ", ".join(f"{name} {n}" for name, n in e["calls"].items())
        print(f"system calls {e['queue_bytes']:>9} B: {e['impl']} {e['total']} per cycle ({calls})")
    for e in ours.get("independent", []):
        state = "" if e["verified"] else f"  NOT VERIFIED: {e['error']}"
        a = agreement(e, ours_single.get(e["queue_bytes"]), c_single.get((e["c_impl"], e["queue_bytes"])))
        verdict = {True: f"agrees (within {AGREEMENT:g}x)", False: "DISAGREES", None: "not judged"}[a.agrees]
        bench = "-" if math.isnan(a.bench_ratio) else f"{a.bench_ratio:.2f}x"
        print(f"independent check {e['queue_bytes']:>9} B: python {e['python_us']:.1f} us, {e['c_impl']} in the same "
              f"process {e['c_us']:.1f} us, ratio {e['ratio']:.2f}x; bench ratio {bench}: {verdict}"
              f"{': ' + a.why if a.why else ''}{state}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few cycles: a smoke test")
    parser.add_argument("--json", metavar="OUT", help="also write the entries (and the C reference's) here")
    parser.add_argument("--c", action="store_true",
                        help="run the C reference's single mode round by round between the engine's, its batches "
                             "after, and print ratios")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="queue sizes in bytes (comma list)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (comma list)")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",") if v]
    batches = [int(v) for v in args.batches.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        binary = None
        if args.c:
            notes: list[str] = []
            binary = cref.build(Path(tmp), notes)
            for note in notes:
                print(note, file=sys.stderr)
        # the check and the traced cycles judge the single-connection ratios: a run of batches alone has none
        ours = run(args.quick, sizes, batches, independent_check=bool(sizes), c_binary=binary)
        ref = None if binary is None else {"single": ours.pop("c_single"), "batch": _c_batches(binary, args.quick,
                                                                                                batches)}
    _print(ours, ref)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sockrepair": ours, "c": ref}, fh, indent=1)
    ok = all(e["verified"] for e in ours["single"] + ours["batch"])
    if not ok:
        print("some entries were not verified", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
