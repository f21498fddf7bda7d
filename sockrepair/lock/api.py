"""The module-level lock functions: each uses a cached Locker for the network namespace it targets (the calling
thread's, or a named one), so repeated calls reuse one netlink socket per namespace.

Common to all of them: `items` is a ConnTuple, an object with a `.tuple` ConnTuple (a ConnectionState), or an
iterable of either; tuples are locked as the connection's own socket sees them (local first) and matched as packets
carry them (ConnTuple.wire()). `netns` is a name from `ip netns list` (a file under /run/netns), None for the
calling thread's namespace. They raise LockError for bad arguments (an item without a tuple, a ttl outside
(0, 3600] seconds, an unknown namespace) and NftError (a LockError and an OSError: `.errno`, `.op`) when the kernel
refuses an nf_tables message, EPERM without CAP_NET_ADMIN in that namespace."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from sockrepair.errors import LockError
from sockrepair.lock.locker import DEFAULT_TTL, Lockable, Locker, LockRecord
from sockrepair.lock.netlink import check_netns_name
from sockrepair.state import ConnTuple

# Each cached socket pins its namespace in the kernel: keep a few, close the least recently used.
_CACHE_MAX = 8
_cache: OrderedDict[tuple[int, int], Locker] = OrderedDict()
_cache_mutex = threading.Lock()


def _namespace_id(netns: str | None) -> tuple[int, int]:
    """The namespace's nsfs inode: a thread that moved to another namespace gets another Locker."""
    path = "/proc/thread-self/ns/net" if netns is None else f"/run/netns/{check_netns_name(netns)}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LockError(f"no network namespace named {netns!r} (see `ip netns list`)") from None
    return (st.st_dev, st.st_ino)


def default_locker(netns: str | None = None) -> Locker:
    """The cached Locker of `netns` (created on first use; at most 8 are kept, least recently used closed first).
    Raises LockError for an unknown namespace name."""
    key = _namespace_id(netns)
    with _cache_mutex:
        locker = _cache.get(key)
        if locker is not None:
            _cache.move_to_end(key)
            return locker
        locker = _cache[key] = Locker(netns)
        if len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)[1].close()
        return locker


def close_cached_lockers() -> None:
    """Close the cached sockets (and let the namespaces they pin go)."""
    with _cache_mutex:
        while _cache:
            _cache.popitem()[1].close()


def _forget_after_fork() -> None:
    global _cache_mutex
    _cache_mutex = threading.Lock()
    close_cached_lockers()


os.register_at_fork(after_in_child=_forget_after_fork)


def lock(items: Lockable | Iterable[Lockable], ttl: float = DEFAULT_TTL, netns: str | None = None,
         group: int | None = None) -> int:
    """Drop both directions of these connections' packets for `ttl` seconds (a float in (0, 3600], default 60;
    locking again renews the timeout), in one nf_tables transaction: all are locked or none. With `group` (a
    Recorder's, sockrepair.lock.record) what the peers send is copied to that nfnetlink_log group first; without,
    tuples locked already keep their group (Locker.lock). Returns the number of distinct tuples locked. Raises
    LockError (bad item or ttl; a table `inet sockrepair` of another layout) or NftError."""
    return default_locker(netns).lock(items, ttl, group)


def unlock(items: Lockable | Iterable[Lockable], netns: str | None = None) -> None:
    """Release these connections in one transaction; tuples that are not locked, or no lock table at all, are
    skipped silently. Raises LockError (bad item) or NftError."""
    default_locker(netns).unlock(items)


@contextlib.contextmanager
def locked(
    items: Lockable | Iterable[Lockable], ttl: float = DEFAULT_TTL, netns: str | None = None, group: int | None = None
) -> Iterator[list[ConnTuple]]:
    """Context manager: lock `items` for `ttl` seconds (`group` as for lock()), yield them as a list of ConnTuples,
    unlock on the way out (also on error). The lock still expires after `ttl` seconds inside the block: lock() again
    to renew it. Raises what lock() and unlock() raise: LockError, NftError."""
    with default_locker(netns).locked(items, ttl, group) as tuples:
        yield tuples


def list_locks(netns: str | None = None) -> list[LockRecord]:
    """Every connection locked now in `netns`, by whichever process locked it, sorted by tuple (as packets carry
    it); [] when there is no lock table. Raises NftError."""
    return default_locker(netns).list_locks()


def unlock_all(netns: str | None = None) -> None:
    """Remove sockrepair's table `inet sockrepair` with every lock, set, chain and rule in it, whoever took them
    (`sockrepair unlock --everything`); nothing happens when there is none. To release one owner's locks only, use
    Locker(netns).unlock_owned(label) (`sockrepair unlock --all --owner LABEL`). Raises NftError."""
    default_locker(netns).unlock_all()
