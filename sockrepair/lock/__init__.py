"""The network lock: drop a migrating connection's packets, both directions, per 4-tuple, with nf_tables set
elements that expire on their own. See docs/lock.md."""

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
from sockrepair.lock.netlink import NftError
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
