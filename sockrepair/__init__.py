"""sockrepair: move live TCP connections between sockets, processes and hosts with Linux TCP_REPAIR."""

from .checkpoint import checkpoint, discard, resume
from .errors import (
    AddressInUseError,
    AddressNotLocalError,
    CriuError,
    ImageError,
    LockError,
    NotPermittedError,
    RestoreError,
    SocketCallError,
    SocketStateError,
    SockrepairError,
    UnsupportedError,
)
from .lock import Locker, LockRecord, list_locks, lock, locked, unlock, unlock_all
from .migrate import MigrationReport, migrate
from .restore import restore
from .state import ConnectionState, ConnTuple, RepairWindow, SocketOptions, TcpOptions

__version__ = "0.1.0"

__all__ = [
    "AddressInUseError",
    "AddressNotLocalError",
    "ConnTuple",
    "ConnectionState",
    "CriuError",
    "ImageError",
    "LockRecord",
    "Locker",
    "MigrationReport",
    "LockError",
    "NotPermittedError",
    "RepairWindow",
    "RestoreError",
    "SocketCallError",
    "SocketOptions",
    "SocketStateError",
    "SockrepairError",
    "TcpOptions",
    "UnsupportedError",
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
