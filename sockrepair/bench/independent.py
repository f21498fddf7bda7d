"""The independent check of the engine's ratios: in ONE process, a Python cycle of one loopback connection
(checkpoint, to_bytes, discard, from_bytes, restore) interleaved, block by block, with a cycle of the C reference
called as a library (sockrepair/bench/reference/repair_cycle.c built shared, its repair_cycle_once(): buffers kept
from call to call, as --warm), each on a fresh pair made the same way, both verified byte for byte afterwards. Same
process, same moments, same kind of connection, and the bench's single mode's blocks (results.SINGLE_BLOCK): what
the two harnesses (bench_engine.py and the C program run as a separate process) say about the ratio should agree
with it (report.agreement() judges).

    python -m sockrepair.bench.independent [--reps N] [--sizes 0,1048576]

At 0 B the C cycle also reads and sets the application options (like-for-like, as --options); above 0 B it is the
minimal warm cycle (the variant the queue-size target is judged against). Needs root (a network namespace) and a
C compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sockrepair.bench import cref
from sockrepair.bench.bench_engine import (
    MOVE_PHASES,
    PEER_RCVBUF,
    TAIL_BYTES,
    _close_abort,
    _connect,
    _End,
    _exchange,
    _fill_recv_queue,
    _fill_send_queue,
    _listener,
    _stream,
    timed_move,
)
from sockrepair.bench.results import (
    C_OPTIONS_IMPL,
    C_WARM_IMPL,
    SINGLE_BLOCK,
    Independent,
)
from sockrepair.errors import BenchmarkError, SockrepairError
from sockrepair.netns import NetNS

SIZES = (0, 1 << 20)
REPS, QUICK_REPS = 200, 10
PYTHON_PHASES = MOVE_PHASES
C_PHASES = ("read_state", "close", "restore")
PART = "independent"  # the .part of this module's BenchmarkErrors

NS3 = ctypes.c_int64 * 3


def _load(library: Path) -> Any:
    """The library through ctypes, as bench_lock.py loads libnftables: the times are taken inside C, so what the
    call costs from Python does not count."""
    lib = ctypes.CDLL(str(library))
    lib.repair_cycle_once.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.repair_cycle_once.restype = ctypes.c_int
    lib.repair_cycle_error.restype = ctypes.c_char_p
    return lib


def _pair(q: int) -> tuple[socket.socket, socket.socket]:
    """The moving end and its peer, q bytes in each of the moving end's queues (bench_engine's recipe)."""
    with _listener(PEER_RCVBUF if q else 0) as listener:
        sock = _connect(listener, 2 * q + (1 << 20) if q else 0)
        peer, _ = listener.accept()
    return sock, peer


def _verify(restored: socket.socket, peer: socket.socket, q: int, sent: int, to_peer: bytes, to_sock: bytes) -> None:
    view_peer, view_sock = memoryview(to_peer), memoryview(to_sock)
    _exchange([
        _End(restored, view_peer[sent : sent + TAIL_BYTES], view_sock[: q + TAIL_BYTES]),
        _End(peer, view_sock[q : q + TAIL_BYTES], view_peer[: sent + TAIL_BYTES]),
    ])


def _python_cycle(q: int, to_peer: bytes, to_sock: bytes, mark: Callable[[int], None] | None = None
                  ) -> dict[str, float]:
    """`mark(0)` and `mark(1)` are called right before and after the timed part (sockrepair/bench/syscalls.py)."""
    sock, peer = _pair(q)
    restored = None
    try:
        _fill_recv_queue(peer, sock, memoryview(to_sock)[:q])
        sent = _fill_send_queue(sock, peer, q, to_peer)
        state, restored, times = timed_move(sock, mark)
        if min(len(state.send_queue), len(state.recv_queue)) < q:
            raise BenchmarkError(f"a queue held fewer than {q} bytes at checkpoint", part=PART)
        _verify(restored, peer, q, sent, to_peer, to_sock)
    finally:
        for s in (sock, peer, restored):
            _close_abort(s)
    return times


def _c_cycle(lib: Any, q: int, options: bool, to_peer: bytes, to_sock: bytes,
             mark: Callable[[int], None] | None = None) -> dict[str, float]:
    """`mark` as for _python_cycle, around the whole call: it also holds the C side's untimed calls (the two queue
    lengths read first, to size its buffers, and with `options` the options read back after the restore)."""
    sock, peer = _pair(q)
    restored = None
    try:
        _fill_recv_queue(peer, sock, memoryview(to_sock)[:q])
        sent = _fill_send_queue(sock, peer, q, to_peer)
        ns = NS3()
        if mark is not None:
            mark(0)
        fd = lib.repair_cycle_once(sock.detach(), int(options), ns)  # the C side closes the fd it is given
        if mark is not None:
            mark(1)
        if fd < 0:
            raise BenchmarkError(f"C cycle: {lib.repair_cycle_error().decode(errors='replace')}", part=PART)
        restored = socket.socket(fileno=fd)
        _verify(restored, peer, q, sent, to_peer, to_sock)
    finally:
        for s in (sock, peer, restored):
            _close_abort(s)
    return {name: ns[i] / 1000 for i, name in enumerate(C_PHASES)}


def _medians(samples: Sequence[dict[str, float]], phases: Sequence[str]) -> tuple[float, dict[str, float]]:
    totals = [sum(s.values()) for s in samples]
    return statistics.median(totals), {p: statistics.median(s[p] for s in samples) for p in phases}


def measure(library: Path, sizes: Sequence[int] = SIZES, reps: int = REPS, block: int = SINGLE_BLOCK
            ) -> list[Independent]:
    """One entry per size: `reps` Python cycles and `reps` C cycles, run as the bench runs its single mode: blocks of
    `block` consecutive cycles of one size, each after one untimed cycle of that size and implementation; for each
    size a Python block and a C block, alternating which goes first, sizes interleaved block by block, so that both
    see the same caches and the machine's drift alike. Run it inside a network namespace made for it (it fills
    loopback ports)."""
    lib = _load(library)
    longest = max(sizes, default=0)
    to_peer, to_sock = _stream(2, longest + (8 << 20)), _stream(3, longest + TAIL_BYTES)
    python: dict[int, list[dict[str, float]]] = {q: [] for q in sizes}
    c: dict[int, list[dict[str, float]]] = {q: [] for q in sizes}
    errors: dict[int, str] = {}

    def python_block(q: int, n: int) -> None:
        _python_cycle(q, to_peer, to_sock)
        python[q] += [_python_cycle(q, to_peer, to_sock) for _ in range(n)]

    def c_block(q: int, n: int) -> None:
        _c_cycle(lib, q, q == 0, to_peer, to_sock)
        c[q] += [_c_cycle(lib, q, q == 0, to_peer, to_sock) for _ in range(n)]

    for round_, first in enumerate(range(0, reps, block)):
        n = min(block, reps - first)
        for q in sizes:
            if q in errors:
                continue
            try:
                for run_block in (python_block, c_block) if round_ % 2 == 0 else (c_block, python_block):
                    run_block(q, n)
            except (OSError, SockrepairError) as exc:
                errors[q] = str(exc)
    out: list[Independent] = []
    for q in sizes:
        python_us, python_phases = _medians(python[q], PYTHON_PHASES) if python[q] else (float("nan"), {})
        c_us, c_phases = _medians(c[q], C_PHASES) if c[q] else (float("nan"), {})
        out.append({"queue_bytes": q, "c_impl": C_OPTIONS_IMPL if q == 0 else C_WARM_IMPL,
                    "reps": min(len(python[q]), len(c[q])), "python_us": python_us, "c_us": c_us,
                    "ratio": python_us / c_us if c[q] else float("nan"), "python_phases_us": python_phases,
                    "c_phases_us": c_phases, "verified": q not in errors, "error": errors.get(q), "block": block})
    return out


def run(quick: bool = False, sizes: Sequence[int] = SIZES, notes: list[str] | None = None,
        reps: int | None = None) -> list[Independent]:
    """The check in a network namespace of its own, `reps` cycles of each (default REPS, QUICK_REPS when `quick`);
    [] (and a note) when there is no C compiler."""
    with tempfile.TemporaryDirectory(prefix="sockrepair-independent-") as tmp:
        library = cref.build(Path(tmp), notes, shared=True)
        if library is None:
            return []
        with NetNS() as ns, ns.entered():
            return measure(library, sizes, reps if reps is not None else QUICK_REPS if quick else REPS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="queue sizes in bytes (comma list)")
    args = parser.parse_args()
    notes: list[str] = []
    entries = run(sizes=[int(v) for v in args.sizes.split(",") if v], notes=notes, reps=args.reps)
    if notes:
        print(notes[0], file=sys.stderr)
        return 1
    for e in entries:
        phases = " ".join(f"{p} {us:.1f}" for p, us in e["python_phases_us"].items())
        c_phases = " ".join(f"{p} {us:.1f}" for p, us in e["c_phases_us"].items())
        state = "" if e["verified"] else f"  NOT VERIFIED: {e['error']}"
        print(f"{e['queue_bytes']:>9} B  python {e['python_us']:8.1f} us [{phases}]  {e['c_impl']} {e['c_us']:7.1f} us "
              f"[{c_phases}]  ratio {e['ratio']:.2f}x  reps {e['reps']}{state}")
    return 0 if all(e["verified"] for e in entries) else 2


if __name__ == "__main__":
    sys.exit(main())
