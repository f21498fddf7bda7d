"""The network lock: drop a migrating connection's packets, both directions, per 4-tuple, with nf_tables verdict-map
elements that expire on their own (ttl in seconds, default DEFAULT_TTL = 60, at most MAX_TTL = 3600), copying what
the peer sends to its mover's nfnetlink_log group first when locked with one (lock/record.py). Errors are LockError,
and NftError (also an OSError with `.errno`) when the kernel refuses a message. See docs/lock.md."""

from sockrepair.errors import NftError
from sockrepair.lock.api import (
    close_cached_lockers,
    default_locker,
    list_locks,
    lock,
    locked,
    unlock,
    unlock_all,
)
from sockrepair.lock.locker import DEFAULT_TTL, MAX_TTL, Locker, LockRecord
from sockrepair.lock.status import nft_status

__all__ = [
    "DEFAULT_TTL",
    "MAX_TTL",
    "LockRecord",
    "Locker",
    "NftError",
    "close_cached_lockers",
    "default_locker",
    "list_locks",
    "lock",
    "locked",
    "nft_status",
    "unlock",
    "unlock_all",
]
