"""Read criu's logs (dump.log, restore.log, its stderr, the application's output) and name the known failures in
them with their cause and fix; docs/criu-errors.md is the long form of the same catalogue."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockrepair.errors import CriuError
from sockrepair.private import read_regular


@dataclass(frozen=True)
class KnownError:
    key: str
    pattern: re.Pattern[str]
    summary: str
    cause: str
    fix: str
    # criu logs some things as errors that do not make the operation fail (it goes on and succeeds).
    harmless: bool = False


def _known(key: str, pattern: str, summary: str, cause: str, fix: str, harmless: bool = False) -> KnownError:
    return KnownError(key, re.compile(pattern), summary, cause, fix, harmless)


_LOCK_FIX = (
    "hold one lock over both directions of every connection of all the dumped trees from before the first dump "
    "until after the last restore, and create it again (from the images) after a reboot: `sockrepair criu dump` / "
    "`sockrepair criu restore` do this"
)

CATALOGUE: tuple[KnownError, ...] = (
    _known(
        "iptables-bad-rule",
        r"iptables: Bad rule \(does a matching rule exist in that chain\?\)",
        "criu's iptables lock rules were gone at restore",
        "at restore criu deletes the DROP rules it added at dump; they no longer existed (the firewall was flushed "
        "or the host rebooted between dump and restore), so from then until the restore the connection was "
        "unprotected: the peer's packets reached a port with no socket and were answered with RST",
        "keep the firewall state between dump and restore, or " + _LOCK_FIX,
    ),
    _known(
        "iptables-config-failed",
        r"Iptables configuration failed",
        "criu could not add or delete its iptables lock rules",
        "criu's network lock runs `iptables -w ... -j DROP` per connection; the command failed (at restore usually "
        "because the rules were already gone, see the iptables line before it; at dump because iptables is missing "
        "or not permitted). criu goes on after a failed deletion, so the restore itself may still succeed",
        "if this came with 'Bad rule', " + _LOCK_FIX + "; otherwise install iptables and run criu as root",
    ),
    _known(
        "connection-reset",
        r"Connection reset by peer",
        "the restored connection was reset (the application saw ECONNRESET)",
        "while one end was dumped and not yet restored, no socket held its port: a packet from the other end "
        "(a restored peer, or a window probe sent when repair mode is turned off) got an RST back from the kernel. "
        "With two trees dumped separately this happens in either restore order, because each tree's lock ends at "
        "its own restore",
        _LOCK_FIX + "; or dump and restore both ends as one process tree",
    ),
    _known(
        "vdso-bounds",
        r"Unexpected rt vDSO area bounds",
        "this criu cannot parse the kernel's vDSO layout",
        "criu 3.x (Debian 12 ships 3.17) predates the vDSO/vvar layout of recent kernels and aborts in every "
        "command, `criu check` included",
        "use criu >= 4.2: run `sockrepair criu setup` as root, or point $SOCKREPAIR_CRIU at a newer criu",
    ),
    _known(
        "loopback-down",
        r"kerndat\.c:\d+\): Unable to connect a socket: Network is unreachable",
        "criu could not test TCP repair: the loopback interface of its network namespace is down",
        "every criu command first checks TCP_REPAIR with a connection over 127.0.0.1 in the network namespace it "
        "runs in (kerndat_tcp_repair); a namespace made by `ip netns add` starts with lo down, so every command fails, "
        "`criu check` included",
        "bring the loopback up in that namespace (`ip link set lo up` inside it, or `ip -n NAME link set lo up`), "
        "or run criu where it is up",
    ),
    _known(
        "so-passsec",
        r"Can't get 1:(?:34|16) opt: Operation not supported",
        "this criu fails on TCP sockets on kernels >= 6.16 (SO_PASSSEC/SO_PASSCRED)",
        "kernels >= 6.16 refuse SO_PASSCRED (1:16) and SO_PASSSEC (1:34) on TCP sockets with EOPNOTSUPP; criu "
        "before 4.2 treats that as fatal when it dumps socket options",
        "use criu >= 4.2: run `sockrepair criu setup` as root, or point $SOCKREPAIR_CRIU at a newer criu",
    ),
    _known(
        "bind-back",
        r"Can't bind inet socket back: Cannot assign requested address",
        "the connection's local address does not exist where criu restores",
        "the dumped socket was bound to an address that is not configured in the restoring network namespace "
        "(address removed, moved to another host, or restore run in another namespace)",
        "configure the address first (`ip addr add ADDR dev IFACE` in the namespace the tree is restored into), "
        "or restore inside the namespace that has it",
    ),
    _known(
        "fin-packet",
        r"Unable to send a fin packet",
        "criu could not re-create the FIN or ACK of a half-closed connection",
        "to restore a connection in FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, CLOSING or LAST_ACK, criu's libsoccr sends the "
        "peer's FIN (or its ACK of ours) to the restored socket itself, through a raw socket marked 0xC114 "
        "(SOCCR_MARK); a firewall rule dropped it on the way out, so sendto failed with EPERM: a network lock that "
        "does not let marked packets through (sockrepair's did not before it accepted SOCCR_MARK), or an OUTPUT "
        "rule of the host",
        "let packets marked 0xC114 through every chain before any drop (sockrepair's lock does: `sockrepair criu "
        "restore` again; with iptables, `-m mark --mark 0xc114 -j ACCEPT` first), or close the connection before "
        "the dump",
    ),
    _known(
        "tcp-established",
        r"Connected TCP socket, consider using --tcp-established option",
        "the tree holds established TCP connections and criu was not told to dump them",
        "criu refuses to dump ESTABLISHED TCP sockets unless asked: their state is taken with TCP_REPAIR and the "
        "peer must not see them close",
        "pass --tcp-established to both `criu dump` and `criu restore` (`sockrepair criu dump` does)",
    ),
    _known(
        "fork-exists",
        r"Can't fork for (?:PID|\d+): File exists",
        "a process with a dumped pid still exists",
        "criu restores every task with its old pid; that pid is taken: the dumped root was never reaped (a zombie "
        "of its parent), the tree was dumped with --leave-running, or another process got the pid",
        "reap the dumped root (its parent must wait() for it) or stop the running copy before restoring; restore "
        "into a new pid namespace when the pid cannot be freed",
    ),
    _known(
        "fd-setsize",
        r"bit out of range 0 - FD_SETSIZE on fd_set",
        "criu aborted in libnftables (--network-lock nftables with ~1000 sockets)",
        "libnftables 1.1.3 (Debian 13) waits on its netlink socket with select() (1.1.7 polls), and criu makes a "
        "new nftables context per lock call while holding every dumped socket open: past ~1000 sockets that netlink fd is "
        ">= FD_SETSIZE (1024) and glibc's fortify check aborts criu (SIGABRT), mid-dump, with its CRIU-* nftables "
        "table of DROP rules left in place",
        "delete the leftover lock (`nft delete table inet CRIU-...`), then use a libnftables that polls (the one "
        "`sockrepair criu setup` installs), the iptables lock (slow), or sockrepair's external lock; or dump fewer "
        "sockets per tree",
    ),
    _known(
        "mount-sharing",
        r"has unreachable sharing\. Try --enable-external-masters",
        "criu and the tree run in different mount namespaces",
        "the tree was started in its own mount namespace (e.g. with `ip netns exec`, which makes one to remount "
        "/sys) and criu was started the same way, so criu sees the tree's mounts as foreign",
        "start the tree and criu after joining only the network namespace (setns on /run/netns/NAME, as "
        "`sockrepair.netns.NetNS.entered()` does), or dump the mount namespace with criu's --external options",
    ),
    _known(
        "empty-image",
        r"Unexpected EOF on \(empty-image\)",
        "the image directory holds no complete dump",
        "the dump that should have written these images failed or never ran, or -D points at another directory",
        "look at the dump's own log for its failure, dump again, and restore from that directory",
    ),
    _known(
        "rlimit-nofile",
        r"rlimit: Can't setup RLIMIT_NOFILE for self",
        "criu could not raise its own open-files limit (harmless)",
        "criu tries to raise RLIMIT_NOFILE to fs.nr_open; without CAP_SYS_RESOURCE above the hard limit it keeps "
        "the current one",
        "nothing unless the tree holds more files than `ulimit -Hn` allows",
        harmless=True,
    ),
)

_ERROR_LINE = re.compile(r"Error \(|\*\*\* .* \*\*\*")


@dataclass(frozen=True)
class Finding:
    """A known error seen in a log: its first line, where it was, and how many lines matched."""

    known: KnownError
    line: str
    source: str
    lineno: int
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        k = self.known
        return {
            "key": k.key, "summary": k.summary, "cause": k.cause, "fix": k.fix, "harmless": k.harmless,
            "line": self.line, "source": self.source, "lineno": self.lineno, "count": self.count,
        }


@dataclass(frozen=True)
class LogLine:
    line: str
    source: str
    lineno: int


@dataclass
class Report:
    """What the logs say: known errors (in the order first seen) and error lines nothing here explains;
    `log_lines` counts the lines that look like criu's log (a "(SECONDS.MICROS)" timestamp first): none, and nothing
    found, means the input was not criu's output at all."""

    findings: list[Finding] = field(default_factory=list)
    unexplained: list[LogLine] = field(default_factory=list)
    log_lines: int = 0

    @property
    def keys(self) -> list[str]:
        return [f.known.key for f in self.findings]

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.known.harmless]

    def extend(self, other: Report) -> None:
        for found in other.findings:
            self.add(found)
        self.unexplained.extend(other.unexplained)
        self.log_lines += other.log_lines

    def add(self, found: Finding) -> None:
        for i, have in enumerate(self.findings):
            if have.known.key == found.known.key:
                self.findings[i] = Finding(have.known, have.line, have.source, have.lineno, have.count + found.count)
                return
        self.findings.append(found)

    def text(self, harmless: bool = False) -> str:
        out = []
        for f in self.findings:
            if f.known.harmless and not harmless:
                continue
            where = f"{f.source}:{f.lineno}" if f.source else f"line {f.lineno}"
            times = f" (x{f.count})" if f.count > 1 else ""
            out += [f"{f.known.summary}{times}", f"  seen:  {where}: {f.line}", f"  cause: {f.known.cause}",
                    f"  fix:   {f.known.fix}"]
        for u in self.unexplained:
            out.append(f"unexplained: {u.source + ':' if u.source else ''}{u.lineno}: {u.line}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.to_dict() for f in self.findings],
            "unexplained": [{"line": u.line, "source": u.source, "lineno": u.lineno} for u in self.unexplained],
        }


def explain_text(text: str, source: str = "") -> Report:
    """The known errors (CATALOGUE) and unexplained `Error (...)` lines of `text`; `source` names it in findings
    (with 1-based line numbers). Lines criu prints only as consequences of an earlier error are left out."""
    report = Report()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if _LOG_LINE.match(line):
            report.log_lines += 1
        known = next((k for k in CATALOGUE if k.pattern.search(line)), None)
        if known is not None:
            report.add(Finding(known, line, source, lineno))
        elif _ERROR_LINE.search(line) and not _is_consequence(line):
            report.unexplained.append(LogLine(line, source, lineno))
    return report


# known errors of the host, not of the criu: no other criu would pass `criu check` (sockrepair criu setup says so
# instead of fetching one)
HOST_PROBLEMS = frozenset({"loopback-down"})


# every line of criu's log (and of its stderr at the default log level) starts with its time since start
_LOG_LINE = re.compile(r"\(\s*\d+\.\d+\)")


# Lines criu prints after the real error to say that the step failed; they add nothing to the explanation.
_CONSEQUENCES = re.compile(
    r"Dumping FAILED|Restoring FAILED|Dump files \(pid: \d+\) failed|Unable to open fd=|exited, status=|"
    r"Failed to fill self vdso symtable|kerndat_vdso_fill_symtable failed|kerndat_tcp_repair failed|"
    r"Could not initialize kernel features detection"
)


def _is_consequence(line: str) -> bool:
    return bool(_CONSEQUENCES.search(line))


# criu's logs of a large tree run to a few MiB at the default log level
MAX_LOG = 256 << 20


def explain_files(paths: Iterable[Path]) -> Report:
    """`explain_text` of each file, merged (findings of the same error counted together). Raises OSError when a
    file cannot be read, is not a regular file (a FIFO would block, a device never end) or exceeds MAX_LOG bytes."""
    report = Report()
    for path in paths:
        report.extend(explain_text(read_regular(path, MAX_LOG).decode(errors="replace"), path.name))
    return report


def explain_dir(directory: Path, stderr: str = "") -> Report:
    """Explain every criu log in an image directory (dump.log, restore.log, ...) plus criu's captured stderr."""
    report = explain_files(sorted(directory.glob("*.log")))
    if stderr:
        report.extend(explain_text(stderr, "stderr"))
    return report


class CriuFailure(CriuError):
    """A criu run that failed; `report` holds every known error and unexplained error line of its logs."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


def criu_error(action: str, report: Report, exit_desc: str) -> CriuFailure:
    """The one-line error for a failed criu run, naming the first real cause found, or pointing at the logs."""
    problems = report.problems
    if not problems:
        hint = f"; first error: {report.unexplained[0].line}" if report.unexplained else ""
        return CriuFailure(f"criu {action} failed ({exit_desc}){hint}", report)
    first = problems[0].known
    more = f" (and {len(problems) - 1} more known problem(s))" if len(problems) > 1 else ""
    return CriuFailure(f"criu {action} failed: {first.summary}: {first.cause}. Fix: {first.fix}{more}", report)
