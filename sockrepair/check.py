"""What this kernel and host support, probed on a throwaway loopback connection (for `sockrepair check`)."""

from __future__ import annotations

import errno
import os
import platform
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sockrepair.criu.locate import criu_status
from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._repair import repair_off, repair_on
from sockrepair.engine._session import _Session
from sockrepair.engine._sockcall import ioctl_int, set_u32
from sockrepair.engine._tcpopts import read_timestamp, read_window
from sockrepair.errors import SocketCallError, SockrepairError
from sockrepair.lock.status import nft_status

CAP_NET_ADMIN = 12


@dataclass
class Feature:
    name: str
    ok: bool
    detail: str
    required: bool = False


@dataclass
class Report:
    kernel: str
    features: list[Feature] = field(default_factory=list)

    @property
    def repair_works(self) -> bool:
        return all(f.ok for f in self.features if f.required)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "repair_works": self.repair_works, "features": [asdict(f) for f in self.features]}


def has_cap_net_admin() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _attempt(name: str, fn: Callable[[], str], required: bool = False) -> Feature:
    try:
        return Feature(name, True, fn(), required)
    except (SockrepairError, OSError) as exc:
        return Feature(name, False, str(exc), required)


def _loopback_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=2)
    server, _ = listener.accept()
    return listener, client, server


def _probe_repair(fd: int) -> list[Feature]:
    def on() -> str:
        repair_on(fd)
        return "repair mode on an established socket"

    def off_no_probe() -> str:
        repair_off(fd, probe=False)
        return "repair off without a window probe"

    feats = [_attempt("TCP_REPAIR", on, required=True)]
    if not feats[0].ok:
        return feats

    def window() -> str:
        if read_window(_Session(fd)) is None:
            raise SocketCallError(errno.ENOPROTOOPT, "getsockopt(TCP_REPAIR_WINDOW)", fd)
        return "readable (Linux >= 4.8)"

    def timestamp() -> str:
        set_u32(fd, lib.IPPROTO_TCP, lib.TCP_TIMESTAMP, read_timestamp(_Session(fd)), "TCP_TIMESTAMP")
        return "get and set"

    def outqnsd() -> str:
        return f"never-sent bytes readable ({ioctl_int(fd, lib.SIOCOUTQNSD, 'SIOCOUTQNSD')} now)"

    feats.append(_attempt("TCP_REPAIR_WINDOW", window, required=True))
    feats.append(_attempt("TCP_TIMESTAMP", timestamp, required=True))
    feats.append(_attempt("SIOCOUTQNSD", outqnsd, required=True))
    feats.append(_attempt("TCP_REPAIR_OFF_NO_WP", off_no_probe, required=True))
    return feats


def _pidfd_getfd() -> str:
    pidfd = lib.syscall(lib.SYS_pidfd_open, ffi.cast("int", os.getpid()), ffi.cast("unsigned int", 0))
    if pidfd < 0:
        raise OSError(ffi.errno, f"pidfd_open: {os.strerror(ffi.errno)}")
    try:
        fd = lib.syscall(lib.SYS_pidfd_getfd, ffi.cast("int", pidfd), ffi.cast("int", pidfd),
                         ffi.cast("unsigned int", 0))
        if fd < 0:
            raise OSError(ffi.errno, f"pidfd_getfd: {os.strerror(ffi.errno)}")
        os.close(fd)
    finally:
        os.close(pidfd)
    return "fds can be taken from other processes (Linux >= 5.6)"


def _network_lock() -> Feature:
    status = nft_status()
    return Feature("network lock (nf_tables)", bool(status["available"]), status["detail"])


def _criu() -> Feature:
    status = criu_status()
    if not status["found"]:
        return Feature("criu", False, f"{status['reason']} ({status['fix']})")
    detail = f"{status['version']} at {status['path']}"
    if not status["check_ok"]:
        detail += f": {status['reason']}" + (f" ({status['fix']})" if status["fix"] else "")
    return Feature("criu", bool(status["check_ok"]), detail)


def probe() -> Report:
    report = Report(kernel=platform.release())
    cap = has_cap_net_admin()
    report.features.append(Feature("CAP_NET_ADMIN", cap, "effective" if cap else
                                   "missing: run as root or grant CAP_NET_ADMIN", required=True))
    try:
        listener, client, server = _loopback_pair()
    except OSError as exc:
        report.features.append(Feature("loopback", False, f"cannot open a loopback connection: {exc}", True))
    else:
        with listener, client, server:
            report.features.extend(_probe_repair(server.fileno()))
    report.features.append(_attempt("pidfd_getfd", _pidfd_getfd))
    report.features.append(_network_lock())
    report.features.append(_criu())
    return report
