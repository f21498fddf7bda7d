"""sockrepair: move live TCP connections between sockets, processes and hosts with Linux TCP_REPAIR.

The public API, all importable from here; each name but the errors loads its module on first use, so that
`import sockrepair` (and the `sockrepair` command's start) costs milliseconds and loads neither construct, protobuf
nor scapy:

- the engine, on one socket: checkpoint(sock) -> ConnectionState (the socket stays frozen in repair mode), then
  resume(sock) to let it go on, or discard(sock, state) to close it silently; restore(state) -> socket.socket
  builds the connection again without a handshake;
- the state: ConnectionState and its parts ConnTuple, TcpOptions, RepairWindow, SocketOptions (plain data;
  to_bytes()/from_bytes() for the image format, docs/image-format.md);
- the network lock (nftables, docs/lock.md): lock, unlock, locked, list_locks, unlock_all, Locker, LockRecord.
  `sockrepair.lock` is the function, whether or not the subpackage of that name was imported: so
  `import sockrepair.lock as m` gives the function too; `from sockrepair.lock import Locker` works as for any
  package (the subpackage is sys.modules["sockrepair.lock"]);
- migrate(pid, ...) -> MigrationReport: a process's connections to another namespace or program in one call;
  Quiescence(timeout, on_busy=OnBusy.REFUSE | OnBusy.MOVE) says how long it tries to freeze the program between
  requests and what it does with a program still busy then; KeepCaps(...) bounds what its lock keeps of what the
  peers send meanwhile;
- the errors: every exception derives from SockrepairError (sockrepair.errors); those carrying an errno are also
  OSError, ImageError is also ValueError.

The engine and the lock need CAP_NET_ADMIN in the network namespace they work in (TCP_REPAIR, nf_tables); without
it the engine raises NotPermittedError and the lock NftError (both with errno EPERM)."""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from sockrepair.errors import (
    AddressInUseError,
    AddressNotLocalError,
    BenchmarkError,
    CriuError,
    HandoffError,
    ImageError,
    LockError,
    NetnsError,
    NftError,
    NotPermittedError,
    ProcessError,
    RestoreError,
    SocketCallError,
    SocketStateError,
    SockrepairError,
    UnsupportedError,
    WireError,
)

if TYPE_CHECKING:
    from sockrepair.engine import checkpoint, discard, restore, resume
    from sockrepair.lock import (
        Locker,
        LockRecord,
        list_locks,
        lock,
        locked,
        unlock,
        unlock_all,
    )
    from sockrepair.lock.record import KeepCaps
    from sockrepair.move.migrate import MigrationReport, migrate
    from sockrepair.move.quiesce import OnBusy, Quiescence
    from sockrepair.state import (
        ConnectionState,
        ConnTuple,
        RepairWindow,
        SocketOptions,
        TcpOptions,
    )

# where each lazily loaded name lives
_HOMES = {
    **dict.fromkeys(("checkpoint", "discard", "restore", "resume"), "sockrepair.engine"),
    **dict.fromkeys(("Locker", "LockRecord", "list_locks", "lock", "locked", "unlock", "unlock_all"),
                    "sockrepair.lock"),
    "KeepCaps": "sockrepair.lock.record",
    **dict.fromkeys(("MigrationReport", "migrate"), "sockrepair.move.migrate"),
    **dict.fromkeys(("OnBusy", "Quiescence"), "sockrepair.move.quiesce"),
    **dict.fromkeys(("ConnectionState", "ConnTuple", "RepairWindow", "SocketOptions", "TcpOptions"),
                    "sockrepair.state"),
}


if not TYPE_CHECKING:  # to a type checker the names are the imports above: a misspelt one stays an error

    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


class _Package(types.ModuleType):
    """This package's module type: the import system binds each subpackage on its parent once it is first imported
    (sockrepair.lock the subpackage over sockrepair.lock the function); the function stays."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "lock" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"

__all__ = [
    "AddressInUseError",
    "AddressNotLocalError",
    "BenchmarkError",
    "ConnTuple",
    "ConnectionState",
    "CriuError",
    "HandoffError",
    "ImageError",
    "KeepCaps",
    "LockError",
    "LockRecord",
    "Locker",
    "MigrationReport",
    "NetnsError",
    "NftError",
    "NotPermittedError",
    "OnBusy",
    "ProcessError",
    "Quiescence",
    "RepairWindow",
    "RestoreError",
    "SocketCallError",
    "SocketOptions",
    "SocketStateError",
    "SockrepairError",
    "TcpOptions",
    "UnsupportedError",
    "WireError",
    "checkpoint",
    "discard",
    "list_locks",
    "lock",
    "locked",
    "migrate",
    "restore",
    "resume",
    "unlock",
    "unlock_all",
]
