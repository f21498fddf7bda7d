"""Test hosts on one machine: `peer`, `a` and `b` are network namespaces joined through a bridge in a fourth
(`switch`) namespace, with a service address that lives on A and can move to B. Nothing is created in the root
namespace, and everything is deleted on exit, on errors, on SIGINT/SIGTERM, and at interpreter exit.

The service address sits on its own interface `svc0` in A and in B; both carry the same MAC, and only one is up
(both, for an instant, during a move). Moving the service takes B's svc0 up, points the bridge's entry for that MAC
at B's port (one RTM_NEWNEIGH, as if learned), takes A's svc0 down (in-process SIOCSIFFLAGS ioctls) and announces
the address from B; the peer's neighbour entry (same MAC) stays valid, so the peer reaches the service on B without
an ARP/ND round and without touching it."""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from sockrepair.engine._ffi import ffi
from sockrepair.errors import NetnsError
from sockrepair.lock.netlink import attr
from sockrepair.netns import NetNS

# hosts are 198.18.0.N/24 (RFC 2544 benchmarking range, never routed anywhere real) and fd00:5ec:0:1::N/64 (ULA)
SERVICE4 = "198.18.0.100"
SERVICE6 = "fd00:5ec:0:1::100"
SERVICE_MAC = "02:53:52:00:00:64"  # locally administered; shared by svc0 on A and on B
HOST_NUMBERS = {"peer": 1, "a": 2, "b": 3}
IFNAME = "eth0"
SERVICE_IFNAME = "svc0"

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_ETH_P_ARP = 0x0806
_SIOCETHTOOL = 0x8946
_IFF_UP = 0x1
# legacy ethtool set-value commands (struct ethtool_value {u32 cmd; u32 data;})
_ETHTOOL_STSO, _ETHTOOL_SGSO, _ETHTOOL_SGRO = 0x1F, 0x24, 0x2C
# rtnetlink: an fdb entry is a neighbour of family AF_BRIDGE (struct ndmsg, then NDA_LLADDR)
_RTM_NEWNEIGH, _NDA_LLADDR, _AF_BRIDGE, _NUD_REACHABLE, _NTF_MASTER = 28, 2, 7, 0x02, 0x04
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE, _NLMSG_ERROR = 0x1, 0x4, 0x100, 0x400, 2
_NLMSG = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
# how long a moved address may take to become bindable (IPv6 leaves its pre-DAD state from a workqueue)
_READY_TIMEOUT = 2.0


@dataclass
class Host:
    """One namespace of the lab. `ctl` is a UDP socket made inside it, used for interface ioctls; `packet` (A and B)
    an AF_PACKET socket made inside it for announcing the service address, open as long as the lab: closing one
    waits an RCU grace period (packet_release's synchronize_net, about 14 ms here), which a move must not pay."""

    role: str
    ns: NetNS
    addr4: str
    addr6: str
    ifname: str = IFNAME
    ctl: socket.socket | None = field(default=None, repr=False)
    packet: socket.socket | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The namespace's name as `ip netns` knows it."""
        return self.ns.name

    @contextlib.contextmanager
    def entered(self) -> Iterator[Host]:
        """Run the calling thread inside this host; sockets made in the block stay in it."""
        with self.ns.entered():
            yield self

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """The argument list that runs `cmd` inside this host (for subprocess.Popen)."""
        return self.ns.exec_argv(cmd)

    def ip(self, *args: str) -> str:
        return self.ns.ip(*args)

    def pids(self) -> list[int]:
        return self.ns.pids()

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Signal every process inside this host; returns the pids signalled."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def _ctl_fd(self) -> int:
        if self.ctl is None:
            raise NetnsError(f"host {self.role} is not up (the lab was closed or never entered)")
        return self.ctl.fileno()

    def set_up(self, ifname: str, up: bool) -> None:
        """Bring `ifname` up or down (struct ifreq: 16-byte name, then the flags)."""
        req = bytearray(struct.pack("16sH22x", ifname.encode(), 0))
        try:
            fcntl.ioctl(self._ctl_fd(), _SIOCGIFFLAGS, req)
            (flags,) = struct.unpack_from("H", req, 16)
            struct.pack_into("H", req, 16, flags | _IFF_UP if up else flags & ~_IFF_UP)
            fcntl.ioctl(self._ctl_fd(), _SIOCSIFFLAGS, req)
        except OSError as exc:
            raise NetnsError(f"{self.name}: cannot set {ifname} {'up' if up else 'down'}: {exc.strerror}") from None

    def announce(self, ifname: str, mac: str, addr4: str) -> None:
        """One gratuitous ARP (RFC 5227's announcement: a request for `addr4` by itself) broadcast from `ifname`
        with source `mac`, as a failover sends, so that the bridge learns `mac` on this host's port from it rather
        than once its old port's carrier loss is seen (linkwatch, deferred). Measured in this lab on 2026-12-01: the
        mover's ask lost its first answer in 15 of 56 cross-host moves without it, in 2 of 28 with it (16 moves of a
        streaming connection, 12 demos); sockrepair.move.ask asks again after 20 ms either way."""
        hw = bytes.fromhex(mac.replace(":", ""))
        ip = socket.inet_aton(addr4)
        frame = (b"\xff" * 6 + hw + struct.pack("!H", _ETH_P_ARP)
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\0" * 6 + ip)
        if self.packet is None:
            raise NetnsError(f"host {self.role} cannot announce (not a service host, or the lab is closed)")
        try:
            self.packet.sendto(frame, (ifname, _ETH_P_ARP))
        except OSError as exc:
            raise NetnsError(f"{self.name}: cannot announce {addr4} on {ifname}: {exc.strerror}") from None

    def disable_offloads(self, ifname: str) -> None:
        """TSO/GSO/GRO off, so a capture sees the segments a real wire would carry instead of 64 KiB aggregates."""
        value = ffi.new("uint32_t[2]")  # struct ethtool_value, pointed to from the ifreq
        for cmd in (_ETHTOOL_STSO, _ETHTOOL_SGSO, _ETHTOOL_SGRO):
            value[0], value[1] = cmd, 0
            req = bytearray(struct.pack("16sQ16x", ifname.encode(), int(ffi.cast("uintptr_t", value))))
            try:
                fcntl.ioctl(self._ctl_fd(), _SIOCETHTOOL, req)
            except OSError as exc:
                raise NetnsError(f"{self.name}: cannot turn offload {cmd:#x} off on {ifname}: {exc.strerror}") from None


def _write_sysctl(key: str, value: str) -> None:
    """Set a net.* sysctl of the namespace the calling thread is in (/proc/sys/net follows the opener's netns)."""
    with open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
        f.write(value)


class Lab:
    """`with Lab() as lab:` three hosts (`peer`, `a`, `b`) on one bridge and a service address on A.

    Names carry a per-run prefix so parallel runs never collide; `lab.host("a")` gives a Host."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"srlab{os.getpid()}x{uuid.uuid4().hex[:6]}"
        self.switch = Host("switch", NetNS(f"{self.prefix}-switch"), "", "")
        self.hosts = {
            role: Host(role, NetNS(f"{self.prefix}-{role}"), f"198.18.0.{n}", f"fd00:5ec:0:1::{n}")
            for role, n in HOST_NUMBERS.items()
        }
        self.service4 = SERVICE4
        self.service6 = SERVICE6
        self.service_on = "a"
        # re-entrant: a signal arriving while close() runs calls close() again on the same thread
        self._lock = threading.RLock()
        self._up = False
        self._rtnl: socket.socket | None = None
        self._ports: dict[str, int] = {}  # role -> ifindex of its service port on the bridge

    @property
    def peer(self) -> Host:
        return self.hosts["peer"]

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    def host(self, role: str) -> Host:
        try:
            return self.hosts[role]
        except KeyError:
            raise NetnsError(f"no host {role!r} in the lab (hosts: {', '.join(self.hosts)})") from None

    def namespaces(self) -> list[str]:
        return [self.switch.name, *(h.name for h in self.hosts.values())]

    # -- life cycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        _track(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace of the lab (killing what runs inside); safe to call more than once."""
        with self._lock:
            errors: list[str] = []
            for host in (*self.hosts.values(), self.switch):
                for sock in (host.ctl, host.packet):
                    if sock is not None:
                        sock.close()
                host.ctl = host.packet = None
                try:
                    host.ns.delete()
                except NetnsError as exc:
                    errors.append(str(exc))
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None
            self._up = False
            _untrack(self)
            if errors:
                raise NetnsError("lab cleanup: " + "; ".join(errors))

    def _build(self) -> None:
        self.switch.ns.create()
        with self.switch.entered():
            self.switch.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # rtnetlink in the switch, for the bridge's entry of the service's MAC (_point_bridge)
            self._rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        for host in self.hosts.values():
            host.ns.create()
            with host.entered():
                # before the interfaces arrive: their per-device settings are copied from `default`
                for scope in ("all", "default"):
                    _write_sysctl(f"net.ipv6.conf.{scope}.accept_dad", "0")
                    _write_sysctl(f"net.ipv6.conf.{scope}.keep_addr_on_down", "1")
                # svc0 and eth0 share a subnet on A and B: answer ARP only on the interface owning the address,
                # and announce with the outgoing interface's address, or the peer would learn eth0's MAC for the
                # service and lose it when the service moves.
                _write_sysctl("net.ipv4.conf.all.arp_ignore", "1")
                _write_sysctl("net.ipv4.conf.all.arp_announce", "2")
                host.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.switch.ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        for host in self.hosts.values():
            self._plug(host, f"v-{host.role}", IFNAME, None)
            host.ip("addr", "add", f"{host.addr4}/24", "dev", IFNAME)
            host.ip("addr", "add", f"{host.addr6}/64", "dev", IFNAME, "nodad")
            host.set_up(IFNAME, True)
        for host in (self.a, self.b):
            with host.entered():
                # protocol 0: it only sends, and no packet is ever queued to it
                host.packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self._plug(host, f"s-{host.role}", SERVICE_IFNAME, SERVICE_MAC)
            with self.switch.entered():
                self._ports[host.role] = socket.if_nametoindex(f"s-{host.role}")
            host.ip("addr", "add", f"{SERVICE4}/32", "dev", SERVICE_IFNAME)
            host.ip("addr", "add", f"{SERVICE6}/128", "dev", SERVICE_IFNAME, "nodad")
        self.switch.ip("link", "set", "br0", "up")
        self.a.set_up(SERVICE_IFNAME, True)
        self._wait_bindable(self.a)
        self._up = True

    def _plug(self, host: Host, port: str, ifname: str, mac: str | None) -> None:
        """A veth pair from the bridge into `host`: `port` on the switch side, `ifname` inside the host."""
        peer_args = ["name", ifname, *(["address", mac] if mac else []), "netns", host.name]
        self.switch.ip("link", "add", port, "type", "veth", "peer", *peer_args)
        self.switch.ip("link", "set", port, "master", "br0", "up")
        self.switch.disable_offloads(port)
        host.disable_offloads(ifname)

    # -- the service address ------------------------------------------------------------------------------------

    def move_service(self, src: str, dst: str) -> float:
        """Move the service address from host `src` to host `dst`; returns the seconds it took until both
        addresses can be bound on `dst`."""
        if src == dst or {src, dst} != {"a", "b"}:
            raise NetnsError(f"the service moves between a and b, not {src!r} -> {dst!r}")
        if self.service_on != src:
            raise NetnsError(f"the service is on {self.service_on!r}, not on {src!r}")
        start = time.perf_counter()
        # dst first: while both are up the bridge sends the service's frames to one of them, where the lock keeps
        # them (the move locks the connections in both hosts); src first left an instant with neither up, and
        # what the peer sent then was lost and waited for its retransmission timeout. The bridge is pointed at dst
        # before src goes down: a frame it still sent to src's port after that was dropped by the down veth until
        # the bridge saw the carrier loss (linkwatch, deferred), kept by no lock (3 demos of 136 had a request wait
        # 208 ms); it cannot learn from dst's announce before dst's port forwards (_point_bridge waits for that)
        self.host(dst).set_up(SERVICE_IFNAME, True)
        self._point_bridge(dst)
        self.host(src).set_up(SERVICE_IFNAME, False)
        self.host(dst).announce(SERVICE_IFNAME, SERVICE_MAC, SERVICE4)
        self._wait_bindable(self.host(dst))
        self.service_on = dst
        return time.perf_counter() - start

    def _point_bridge(self, role: str) -> None:
        """The bridge's entry for the service's MAC on host `role`'s port, replaced (RTM_NEWNEIGH with NTF_MASTER
        and NUD_REACHABLE: `bridge fdb replace MAC dev PORT master dynamic`), as learning from a frame of that host
        would set it, once that port forwards. A port whose host's svc0 just came up is disabled until the bridge
        sees the carrier (linkwatch, deferred): it refuses a learned entry (EPERM, net/bridge/br_fdb.c
        fdb_add_entry) and drops what comes or goes through it, an announce included, so this waits for it."""
        sock, index = self._rtnl, self._ports.get(role)
        if sock is None or index is None:
            raise NetnsError("the lab's bridge is not up (the lab was closed or never entered)")
        body = _NDMSG.pack(_AF_BRIDGE, index, _NUD_REACHABLE, _NTF_MASTER, 0) + attr(
            _NDA_LLADDR, bytes.fromhex(SERVICE_MAC.replace(":", "")))
        request = _NLMSG.pack(_NLMSG.size + len(body), _RTM_NEWNEIGH,
                              _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_REPLACE | _NLM_F_CREATE, 1, 0) + body
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            try:
                sock.send(request)
                answer = sock.recv(4096)
            except OSError as exc:
                raise NetnsError(f"{self.switch.name}: cannot point the bridge at s-{role}: {exc.strerror}") from None
            if _NLMSG.unpack_from(answer)[1] != _NLMSG_ERROR:
                return
            code = -struct.unpack_from("=i", answer, _NLMSG.size)[0]
            if not code:
                return
            if code != errno.EPERM or time.monotonic() > deadline:
                raise NetnsError(f"{self.switch.name}: cannot point the bridge at s-{role}: {os.strerror(code)}")
            time.sleep(0.0001)

    def _wait_bindable(self, host: Host) -> None:
        """Until the service addresses are usable as local addresses on `host` (a restore binds to them)."""
        deadline = time.monotonic() + _READY_TIMEOUT
        with host.entered():
            for family, addr in ((socket.AF_INET, SERVICE4), (socket.AF_INET6, SERVICE6)):
                while True:
                    with socket.socket(family, socket.SOCK_STREAM) as probe:
                        try:
                            probe.bind((addr, 0))
                            break
                        except OSError as exc:
                            if exc.errno != errno.EADDRNOTAVAIL or time.monotonic() > deadline:
                                raise NetnsError(f"service address {addr} not usable on {host.role}: {exc}") from None
                    time.sleep(0.0005)


# -- cleanup on signals and at exit ---------------------------------------------------------------------------------

_live: set[Lab] = set()
_live_lock = threading.Lock()
_previous: dict[int, Any] = {}


def _track(lab: Lab) -> None:
    with _live_lock:
        _live.add(lab)
        if threading.current_thread() is threading.main_thread() and not _previous:
            for sig in (signal.SIGINT, signal.SIGTERM):
                _previous[sig] = signal.signal(sig, _on_signal)


def _untrack(lab: Lab) -> None:
    with _live_lock:
        _live.discard(lab)
        if not _live and _previous:
            _restore_handlers()


def _restore_handlers() -> None:
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()


def _close_all() -> None:
    for lab in list(_live):
        with contextlib.suppress(Exception):
            lab.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Let the signal do what it did before. A handler (Python's KeyboardInterrupt, the CLI's) unwinds the program,
    whose `with Lab()` deletes the lab once what runs inside (recorders, clients) has stopped: deleted from here,
    under their feet, each failed with its own traceback and hid the interrupt. Death by the default action
    (SIGTERM outside the CLI) deletes the labs first."""
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        _close_all()
        _restore_handlers()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


atexit.register(_close_all)
