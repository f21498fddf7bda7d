"""sockrepair: move live TCP connections between sockets, processes and hosts with Linux TCP_REPAIR."""

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

__version__ = "0.1.0"

__all__ = [
    "AddressInUseError",
    "AddressNotLocalError",
    "CriuError",
    "ImageError",
    "LockError",
    "NotPermittedError",
    "RestoreError",
    "SocketCallError",
    "SocketStateError",
    "SockrepairError",
    "UnsupportedError",
]
