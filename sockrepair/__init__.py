"""sockrepair: move live TCP connections between sockets, processes and hosts with Linux TCP_REPAIR.

The public API, all importable from here (importing it loads neither construct, protobuf nor scapy):

- the engine, on one socket: checkpoint(sock) -> ConnectionState (the socket stays frozen in repair mode), then
  resume(sock) to let it go on, or discard(sock, state) to close it silently; restore(state) -> socket.socket
  builds the connection again without a handshake;
- the state: ConnectionState and its parts ConnTuple, TcpOptions, RepairWindow, SocketOptions (plain data;
  to_bytes()/from_bytes() for the image format, docs/image-format.md);
- the network lock (nftables, docs/lock.md): lock, unlock, locked, list_locks, unlock_all, Locker, LockRecord;
- migrate(pid, ...) -> MigrationReport: a process's connections to another namespace or program in one call;
  Quiescence(timeout, on_busy=OnBusy.REFUSE | OnBusy.MOVE) says how long it tries to freeze the program between
  requests and what it does with a program still busy then;
- the errors: every exception derives from SockrepairError (sockrepair.errors); those carrying an errno are also
  OSError, ImageError is also ValueError.

The engine and the lock need CAP_NET_ADMIN in the network namespace they work in (TCP_REPAIR, nf_tables); without
it the engine raises NotPermittedError and the lock NftError (both with errno EPERM)."""

from sockrepair.engine import checkpoint, discard, restore, resume
from sockrepair.errors import (
    AddressInUseError,
    AddressNotLocalError,
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
from sockrepair.lock import (
    Locker,
    LockRecord,
    list_locks,
    lock,
    locked,
    unlock,
    unlock_all,
)
from sockrepair.move.migrate import MigrationReport, migrate
from sockrepair.move.quiesce import OnBusy, Quiescence
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)

__version__ = "0.1.0"

__all__ = [
    "AddressInUseError",
    "AddressNotLocalError",
    "ConnTuple",
    "ConnectionState",
    "CriuError",
    "HandoffError",
    "ImageError",
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
