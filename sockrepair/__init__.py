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
    "restore",
    "resume",
]
