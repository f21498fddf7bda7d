"""sockrepair: move live TCP connections between sockets, processes and hosts with Linux TCP_REPAIR."""

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
    "LockRecord",
    "Locker",
    "MigrationReport",
    "LockError",
    "NetnsError",
    "NftError",
    "NotPermittedError",
    "ProcessError",
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
