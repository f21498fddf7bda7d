"""Network namespaces as throwaway hosts: created with iproute2, entered per thread with setns(2), and deleted
(with every process still inside killed) on exit, error or Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator, Sequence

from sockrepair.errors import NetnsError, UnsupportedError, refused_advice

# setns needs CAP_SYS_ADMIN, even into a namespace of the caller's own process
_ROOT_NEEDED = "run as root: setns needs CAP_SYS_ADMIN, and sockrepair CAP_NET_ADMIN there"


def _ip(*args: str) -> str:
    ip = shutil.which("ip")
    if ip is None:
        raise UnsupportedError("iproute2's `ip` is not installed (apt-get install iproute2)")
    done = subprocess.run([ip, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or 'exit ' + str(done.returncode)}")
    return done.stdout


def _setns(fd: int, what: str) -> None:
    # imported here: the engine package this loads imports the lock, which imports this module (with `import
    # sockrepair` loading nothing, the first import decides the order, and netns first was a cycle)
    from sockrepair.engine._ffi import ffi, lib

    if lib.setns(fd, lib.CLONE_NEWNET) < 0:
        err = ffi.errno
        hint = f" ({refused_advice(_ROOT_NEEDED)})" if err == errno.EPERM else ""
        raise NetnsError(f"setns({what}): {os.strerror(err)}{hint}")


@contextlib.contextmanager
def inside(path: str) -> Iterator[None]:
    """Move the calling thread into the network namespace at `path` (/run/netns/NAME, /proc/PID/ns/net) for the
    block, and back afterwards whatever happens."""
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            new = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise NetnsError(f"no network namespace at {path} (see `ip netns list`)") from None
        except PermissionError:
            raise NetnsError(f"not permitted to enter the network namespace at {path} ({refused_advice(_ROOT_NEEDED)})"
                             ) from None
        try:
            _setns(new, path)
        finally:
            os.close(new)
        try:
            yield
        finally:
            _setns(old, "the original namespace")
    finally:
        os.close(old)


def named(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Inside the namespace `name` as `ip netns` knows it; the current one when None. NetnsError for a name that
    is empty (it must not mean the current namespace) or a path."""
    if name is None:
        return contextlib.nullcontext()
    if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or "\0" in name:
        raise NetnsError(f"not a network namespace name (see `ip netns list`): {name!r}", name=str(name))
    return inside(f"/run/netns/{name}")


class NetNS:
    """A named network namespace owned by this process; `with NetNS() as ns:` deletes it whatever happens."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"sockrepair-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = f"/run/netns/{self.name}"
        self._created = False

    def create(self) -> NetNS:
        _ip("netns", "add", self.name)
        self._created = True
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        if not self._created:
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _ip("netns", "delete", self.name)
        self._created = False

    def pids(self) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.name).split()]

    def ip(self, *args: str) -> str:
        return _ip("-n", self.name, *args)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """The argument list that runs `argv` inside this namespace (for subprocess.Popen)."""
        ip = shutil.which("ip") or "ip"
        return [ip, "netns", "exec", self.name, *argv]

    @contextlib.contextmanager
    def entered(self) -> Iterator[NetNS]:
        """Run the calling thread inside the namespace; sockets made here stay in it after the block."""
        with inside(self.path):
            yield self

    def __enter__(self) -> NetNS:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()
