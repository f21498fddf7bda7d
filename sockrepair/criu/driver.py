"""Dumping and restoring process trees with criu under one sockrepair lock.

dump: map the trees' connections, refuse to leave a loopback peer behind, lock every connection (both directions)
in the trees' network namespace, run `criu dump` per tree (with `--network-lock skip` when criu has it, so the lock
is ours alone), reap each dumped root, and write sockrepair-criu.json. restore: lock again from the images (the
firewall may have been wiped since), run `criu restore` per tree in the order asked, and release each connection
once every tree it waits for is back. A failed criu run raises CriuFailure with the cause and fix from its logs."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

from sockrepair.criu.explain import (
    CriuFailure,
    Report,
    criu_error,
    explain_dir,
    explain_text,
)
from sockrepair.criu.locate import Criu, find_criu
from sockrepair.criu.lockhold import (
    LABEL,
    plan_from_images,
    plan_from_topology,
    releasable,
    renewing,
    still_waiting,
)
from sockrepair.criu.manifest import (
    LOCK_CRIU,
    LOCK_SKIP,
    MANIFEST,
    Manifest,
    TreeRecord,
    is_dump_dir,
    load,
)
from sockrepair.criu.reap import reap, wait_free
from sockrepair.criu.topology import Topology, map_trees
from sockrepair.errors import CriuError, ProcessError
from sockrepair.lock import Locker
from sockrepair.lock.locker import MAX_TTL
from sockrepair.move.freeze import refuse_self
from sockrepair.move.keep import NOTHING_KEPT, Keeper, Kept, netns_path, resume_keeping
from sockrepair.move.procfs import stat, tcp_sockets
from sockrepair.netns import inside, named
from sockrepair.packet import packet_tuple
from sockrepair.private import make_dir, open_dir
from sockrepair.state import ConnTuple

# The lock must outlive the gap between `criu dump` and `criu restore`, two commands a person runs.
DEFAULT_TTL = 600.0


@dataclass
class DumpReport:
    directory: str
    criu_version: str
    network_lock: str
    ttl: float
    topology: Topology
    trees: list[TreeRecord]
    warnings: list[str] = field(default_factory=list)
    kept: Kept = NOTHING_KEPT  # the peers' packets kept by the lock during the dump, written to packets.img

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "criu_version": self.criu_version, "network_lock": self.network_lock,
                "ttl": self.ttl, "trees": [t.__dict__ for t in self.trees], "topology": self.topology.to_dict(),
                "warnings": self.warnings, "kept": self.kept.to_dict()}


@dataclass
class RestoreReport:
    directory: str
    restored: list[int]
    released: list[ConnTuple]
    still_locked: list[ConnTuple]
    ttl: float
    criu_notes: Report = field(default_factory=Report)
    warnings: list[str] = field(default_factory=list)
    # the kept packets (from the dump's packets.img and from this restore) delivered to the released connections
    kept: Kept = NOTHING_KEPT

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "restored": self.restored,
                "released": [str(c) for c in self.released], "still_locked": [str(c) for c in self.still_locked],
                "ttl": self.ttl, "criu_notes": self.criu_notes.to_dict(), "warnings": self.warnings,
                "kept": self.kept.to_dict()}


def _check_ttl(ttl: float) -> None:
    if not 0 < ttl <= MAX_TTL:
        raise CriuError(f"lock ttl must be in (0, {MAX_TTL:g}] seconds, not {ttl:g}")


def _working(criu: Criu | None) -> Criu:
    return (criu or find_criu()).require_working()


def _criu(criu: Criu, args: list[str]) -> tuple[int, str]:
    # No timeout: a big tree takes minutes (the lock is renewed meanwhile), and killing criu mid-dump is worse.
    done = criu.run(args)
    return done.returncode, done.stderr


def _private(directory: Path) -> None:
    """criu writes its images 0644, queued payload included: 0600 each regular file, through the directory's fd
    and the file's own (a symlink is skipped, never followed)."""
    dir_fd = open_dir(directory, writing=True)
    try:
        for name in os.listdir(dir_fd):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue
                raise
            try:
                if S_ISREG(os.fstat(fd).st_mode):
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)


def _dump_dir(directory: Path) -> int:
    """make_dir's fd of the dump directory; CriuError naming why it is refused."""
    if is_dump_dir(directory):
        raise CriuError(f"{directory} already holds a dump ({MANIFEST}): give another -D")
    try:
        return make_dir(directory)
    except (PermissionError, FileExistsError, NotADirectoryError) as exc:
        raise CriuError(f"{directory}: {exc.strerror}") from None


@contextlib.contextmanager
def _netns_of(pid: int) -> Iterator[str]:
    """A path to the process's network namespace that stays valid after criu dump has killed it."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def _dump_args(tree: TreeRecord, images: Path, lock: str, extra: Sequence[str]) -> list[str]:
    args = ["dump", "-t", str(tree.root), "-D", str(images), "-o", "dump.log", "--tcp-established"]
    if lock == LOCK_SKIP:
        args += ["--network-lock", "skip"]
    if tree.shell_job:
        args.append("--shell-job")
    return args + list(extra)


def _restore_args(tree: TreeRecord, images: Path, lock: str, extra: Sequence[str]) -> list[str]:
    args = ["restore", "-D", str(images), "-o", "restore.log", "-d", "--tcp-established"]
    if lock == LOCK_SKIP:
        args += ["--network-lock", "skip"]
    if tree.shell_job:
        args.append("--shell-job")
    return args + list(extra)


@dataclass(frozen=True)
class _Run:
    """What every step of one dump or restore works with: the criu, the dump directory and its manifest (saved
    after every step), the lock, the network namespace criu runs in (a path; None: the caller's) and the extra
    arguments passed to criu as they are."""

    criu: Criu
    directory: Path
    manifest: Manifest
    locker: Locker
    netns: str | None
    criu_args: Sequence[str] = ()

    def entered(self) -> contextlib.AbstractContextManager[None]:
        return inside(self.netns) if self.netns else contextlib.nullcontext()


def dump(pids: Sequence[int], directory: Path, *, allow_external_peers: bool = False, ttl: float = DEFAULT_TTL,
         shell_job: bool = False, criu_args: Sequence[str] = (), criu: Criu | None = None,
         allow_lost_errors: bool = False) -> DumpReport:
    """Dump the process trees rooted at `pids`, one criu image directory each (`directory`/tree-ROOT, mode 0700,
    images 0600) plus sockrepair-criu.json, with every connection locked (both directions, in the trees' network
    namespace) from before the first dump; the lock stays for `ttl` seconds for `restore` to take over.

    Raises CriuError for a ttl outside (0, MAX_TTL], a criu that does not work here (`find_criu` when `criu` is
    None), a pid that is missing, a zombie or in two trees, trees in different network namespaces, a loopback peer
    left behind (unless `allow_external_peers`), a connection in CLOSE with an error its program has still to see
    (criu's images keep no socket error: restored, it would read b"" where it gets ECONNRESET; unless
    `allow_lost_errors`), or a `directory` that is refused (sockrepair.private.make_dir: one
    that holds a dump or anything else, a symlink, another user's, or writable by group or others); CriuFailure (its
    `report` holds every known error of the logs) when a criu run fails, after restoring the trees dumped before it
    and releasing the lock; ProcessError, before criu runs, for a pid that is sockrepair or one of its ancestors."""
    _check_ttl(ttl)
    for pid in pids:
        refuse_self(pid, "criu would dump sockrepair in its tree, and kill it")
    criu = _working(criu)
    topology = map_trees(pids)
    if topology.external() and not allow_external_peers:
        raise CriuError("dumping these trees would leave loopback peers running while their other end is gone "
                        "(they would get RST, or their packets dropped until the lock expires):\n"
                        f"{topology.left_behind()}\nFix: add those processes' trees with --pid, or pass "
                        "--allow-external-peers to dump anyway")
    if not allow_lost_errors:
        pending = closed_with_errors(topology)
        if pending:
            raise CriuError("criu's images keep no socket error: restored, these connections (closed while their "
                            "program held them) would read b\"\" where they now get their pending error "
                            "(ECONNRESET, EPIPE...):\n" + "\n".join(pending) + "\nFix: move the process with "
                            "`sockrepair dump --pid`, which carries it, or pass --allow-lost-errors to dump anyway")
    dir_fd = _dump_dir(directory)
    try:
        return _dump(criu, topology, directory, dir_fd, ttl, shell_job, criu_args)
    finally:
        os.close(dir_fd)


def closed_with_errors(topology: Topology) -> list[str]:
    """`pid P fd N TUPLE` for every socket of the trees in CLOSE that holds a peer and an error (POLLERR, which
    leaves it pending): what criu would restore without its error. A socket several processes share is named once."""
    seen: set[int] = set()
    found = []
    for tree in topology.trees:
        for pid in tree.pids:
            try:
                sockets = tcp_sockets(pid)
            except (OSError, ProcessError):
                continue  # gone: criu's dump says so
            for s in sockets:
                if s.error_pending and s.inode not in seen:
                    seen.add(s.inode)
                    found.append(f"  pid {pid} fd {s.fd} {s.tuple}")
    return found


def _dump(criu: Criu, topology: Topology, directory: Path, dir_fd: int, ttl: float, shell_job: bool,
          criu_args: Sequence[str]) -> DumpReport:
    lock = LOCK_SKIP if criu.supports_network_lock_skip() else LOCK_CRIU
    trees = [TreeRecord(t.root, f"tree-{t.root}", t.pids, [t.stats[p].starttime for p in t.pids], t.command,
                        shell_job or t.needs_shell_job) for t in topology.trees]
    manifest = Manifest(criu.version, lock, ttl, topology.netns, trees, plan_from_topology(topology))
    report = DumpReport(str(directory), criu.version, lock, ttl, topology, trees)
    with _netns_of(topology.trees[0].root) as netns:
        with inside(netns):
            locker = Locker(label=LABEL)
        run = _Run(criu, directory, manifest, locker, netns, criu_args)
        keeper = Keeper([netns])
        try:
            with locker, renewing(locker, topology.tuples(), ttl, keeper.group_in(netns)) as renew_errors:
                for tree in trees:
                    os.mkdir(tree.dir, 0o700, dir_fd=dir_fd)
                    manifest.save(directory)
                    _dump_one(run, tree, topology, report)
                # the keeper records until the restore takes over, or the lock's ttl from its last renewal ends
                report.kept = keeper.hand_off(dir_fd, topology.tuples(), time.time() + ttl)
                report.warnings += [f"renewing the lock failed: {e}" for e in renew_errors]
        finally:
            keeper.close()
    return report


def _dump_one(run: _Run, tree: TreeRecord, topology: Topology, report: DumpReport) -> None:
    images = run.directory / tree.dir
    with run.entered():
        code, stderr = _criu(run.criu, _dump_args(tree, images, run.manifest.network_lock, run.criu_args))
    if code != 0:
        failure = criu_error(f"dump of tree {tree.root} ({tree.command})", explain_dir(images, stderr),
                             f"exit status {code}")
        raise _rolled_back(run, failure, topology)
    _private(images)
    tree.dumped = True
    run.manifest.save(run.directory)
    left = reap(tree.root, tree.pids, tree.starttimes)
    if left:
        report.warnings.append(
            f"tree {tree.root}: {'; '.join(left)}: `criu restore` would fail with \"Can't fork for PID: File "
            "exists\" until these pids are free (the parent must wait() for its dead child)")


def _rolled_back(run: _Run, failure: CriuFailure, topology: Topology) -> CriuFailure:
    """A tree failed to dump (criu leaves it running): put back the trees dumped before it, so that no half-moved
    set of trees stays behind, then release the lock."""
    manifest = run.manifest
    dumped = [t for t in manifest.trees if t.dumped]
    undone = []
    # The dump's extra criu arguments are for `criu dump`, not for this restore.
    putting_back = dataclasses.replace(run, criu_args=())
    try:
        for tree in dumped:
            _restore_one(putting_back, tree)
            undone.append(tree.root)
    except CriuError as exc:
        kept = (f"{run.directory}: restore the dumped trees with "
                f"`sockrepair criu restore -D {shlex.quote(str(run.directory))}`")
        return CriuFailure(f"{failure}\nThe trees dumped before it could not be put back ({exc}); their connections "
                           f"stay locked for {manifest.ttl:g} s. {kept}", failure.report)
    run.locker.unlock(topology.tuples())
    os.unlink(run.directory / MANIFEST)
    back = f"the tree(s) dumped before it ({', '.join(map(str, undone))}) were restored; " if undone else ""
    return CriuFailure(f"{failure}\nNothing was moved: {back}the lock was released", failure.report)


def _restore_one(run: _Run, tree: TreeRecord) -> Report:
    """`criu restore` of one tree inside `run.netns`; the errors criu logged and went on from."""
    images = run.directory / tree.dir
    with run.entered():
        code, stderr = _criu(run.criu, _restore_args(tree, images, run.manifest.network_lock, run.criu_args))
    log = images / "restore.log"
    report = explain_text((log.read_text(errors="replace") if log.exists() else "") + stderr, f"{tree.dir}/restore.log")
    if code != 0:
        raise criu_error(f"restore of tree {tree.root} ({tree.command})", report, f"exit status {code}")
    tree.restored = True
    run.manifest.save(run.directory)
    return report


def _noted(exc: CriuError, note: str) -> CriuError:
    message = f"{exc}\n{note}"
    return CriuFailure(message, exc.report) if isinstance(exc, CriuFailure) else CriuError(message)


def _chosen(manifest: Manifest, roots: Sequence[int] | None) -> list[TreeRecord]:
    if roots:
        chosen = [manifest.tree(r) for r in roots]
        if len({t.root for t in chosen}) != len(chosen):
            raise CriuError("the same tree is given twice")
    else:
        chosen = [t for t in manifest.trees if not t.restored]
    for t in chosen:
        if not t.dumped:
            raise CriuError(f"tree {t.root} ({t.command}) was never dumped (its dump failed or was interrupted)")
        if t.restored:
            raise CriuError(f"tree {t.root} ({t.command}) is already restored")
    if not chosen:
        raise CriuError("every tree of this dump is already restored")
    return chosen


def _check_pids_free(chosen: Sequence[TreeRecord]) -> None:
    for tree in chosen:
        # A failed restore's tasks, or a dead root, may wait a moment for their (new) parent to reap them.
        left = wait_free(tree.pids, tree.starttimes)
        if left:
            raise CriuError(f"cannot restore tree {tree.root} ({tree.command}): {'; '.join(left)}; criu would fail "
                            "with \"Can't fork for PID: File exists\". Fix: have the parent wait() for it (or end "
                            "the parent), stop the running copy, or restore in a new pid namespace")


def restore(directory: Path, roots: Sequence[int] | None = None, *, netns: str | None = None,
            ttl: float = DEFAULT_TTL, criu_args: Sequence[str] = (), criu: Criu | None = None) -> RestoreReport:
    """Restore the trees `roots` (default: every tree not restored yet, in dump order) of a `dump` directory into
    the network namespace named `netns` (`ip netns`; default: the caller's). The lock is taken again from the images
    first; each connection is released once all the trees it waits for are back, the others stay locked for `ttl`
    seconds (RestoreReport.still_locked).

    Raises ImageError when `directory` holds no readable dump or a root is not one of its trees; CriuError for a ttl
    outside (0, MAX_TTL], a tree given twice, never dumped or already restored, a pid still taken, a criu that does
    not work here; NetnsError for an unknown `netns`; CriuFailure (with the logs' `report`, and how to go on) when
    a criu run fails: the lock then stays."""
    _check_ttl(ttl)
    manifest = load(directory)
    chosen = _chosen(manifest, roots)
    _check_pids_free(chosen)
    criu = _working(criu)
    waits = plan_from_images(manifest, directory)
    before = [t.root for t in manifest.trees if t.restored]
    report = RestoreReport(str(directory), [], [], [], ttl)
    path = f"/run/netns/{netns}" if netns is not None else None
    with named(netns):
        locker = Locker(label=LABEL)
    run = _Run(criu, directory, manifest, locker, path, criu_args)
    with contextlib.ExitStack() as stack:
        stack.enter_context(locker)
        # checked before anything is restored; the dump's keeper hands over its recorders, so that there is no
        # instant when nobody records
        kept_at_dump, keeper = resume_keeping(directory, list(waits), [netns_path(netns)])
        stack.enter_context(contextlib.closing(keeper))
        # a recorder of its own only when the keeper was gone: then the locks copy to it from now on
        with renewing(locker, still_waiting(waits, before), ttl,
                      keeper.group_in(netns_path(netns))) as renew_errors:
            for tree in chosen:
                try:
                    report.criu_notes.extend(_restore_one(run, tree))
                except CriuError as exc:
                    waiting = still_waiting(waits, [*before, *report.restored])
                    raise _noted(exc, f"{len(waiting)} connection(s) stay locked for {ttl:g} s: fix the cause and "
                                 f"run `sockrepair criu restore -D {shlex.quote(str(directory))}` again (it "
                                 "restores the trees not restored yet)") from None
                report.restored.append(tree.root)
                if stat(tree.root) is None:
                    report.warnings.append(f"tree {tree.root} ({tree.command}) exited right after its restore")
            report.warnings += [f"renewing the lock failed: {e}" for e in renew_errors]
        done = [*before, *report.restored]
        report.released = releasable(waits, done)
        # Only to connections restored now and about to be released: a packet for a tuple with no socket yet
        # would be answered with RST.
        released = {conn.wire() for conn in report.released}
        report.kept = keeper.deliver(report.released, netns_path(netns),
                                     before=[p for p in kept_at_dump if packet_tuple(p) in released])
        locker.unlock(report.released)
        report.kept = keeper.deliver(report.released, netns_path(netns))  # what the lock stopped meanwhile
        report.still_locked = still_waiting(waits, done)
    return report
