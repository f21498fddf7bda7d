"""Locker: lock, renew, unlock and list connections over one long-lived nf_tables netlink socket.

The lock lives in the kernel, keyed by tuple: any process may release a lock another one took, and a crashed
locker leaves only elements that expire on their own."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sockrepair.errors import LockError, NftError
from sockrepair.lock import nfconst as c
from sockrepair.lock import ruleset
from sockrepair.lock.netlink import NfSocket, Request, attrs, be64, cstr, iter_attrs
from sockrepair.lock.owner import decode_owner, default_owner, encode_owner, owner_label
from sockrepair.state import ConnTuple

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
# A peer gives up on an unanswered connection after ~15 minutes (tcp_retries2): a longer lock only blocks a corpse.
MAX_TTL = 3600.0


class HasTuple(Protocol):
    @property
    def tuple(self) -> ConnTuple: ...


Lockable = ConnTuple | HasTuple


@dataclass(frozen=True)
class LockRecord:
    """One locked connection, from the kernel's set element: `tuple` the ConnTuple as packets carry it (v4-mapped
    addresses as IPv4), `seconds_left` (float seconds) until the lock expires, `ttl` (float seconds) it was given or
    last renewed with, `owner` the text of whoever took it (`LABEL pid=N host=H`; "" when another tool added the
    element without one), `group` the nfnetlink_log group its peer's packets are copied to before they are dropped
    (its element's verdict `jump keep_G`), None when they are only dropped. to_dict() gives the JSON form
    `sockrepair locks --json` prints."""

    tuple: ConnTuple
    seconds_left: float
    ttl: float
    owner: str
    group: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """{"tuple": str, "family": 4 or 6, "local": [addr, port], "remote": [addr, port], "seconds_left",
        "ttl", "owner", "group": int or null}."""
        return {
            "tuple": str(self.tuple),
            "family": 4 if self.tuple.family == ruleset.V4.sock_family else 6,
            "local": [self.tuple.local_addr, self.tuple.local_port],
            "remote": [self.tuple.remote_addr, self.tuple.remote_port],
            "seconds_left": self.seconds_left,
            "ttl": self.ttl,
            "owner": self.owner,
            "group": self.group,
        }


def as_tuples(items: Lockable | Iterable[Lockable]) -> list[ConnTuple]:
    """ConnTuples from tuples, states (anything with a `.tuple`), or one of either; LockError for anything else."""
    if isinstance(items, ConnTuple) or hasattr(items, "tuple"):
        items = [items]  # type: ignore[list-item]
    out = []
    for item in items:
        conn = item if isinstance(item, ConnTuple) else getattr(item, "tuple", None)
        if not isinstance(conn, ConnTuple):
            raise LockError(f"cannot lock {item!r}: want a ConnTuple or an object with a .tuple ConnTuple")
        out.append(conn)
    return out


def ttl_ms(ttl: float) -> int:
    """`ttl` seconds as the milliseconds nf_tables takes (at least 1); LockError unless 0 < ttl <= MAX_TTL."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or not 0 < ttl <= MAX_TTL:
        raise LockError(f"lock ttl must be a number of seconds in (0, {MAX_TTL:g}], not {ttl!r}")
    return max(1, round(ttl * 1000))


def _about(exc: NftError, reqs: list[Request]) -> bool:
    """Whether the message the kernel refused is one of `reqs`."""
    return any(exc.op == req.op for req in reqs)


_DUMP_TRIES = 5  # list_locks: dumps tried until one repeats no element


class Locker:
    """Keeps one netlink socket in the namespace it was created for (`netns`: a name from `ip netns list`, or
    None for the calling thread's). Elements it adds carry its owner text, `LABEL pid=N host=H` (label default
    "sockrepair"). Safe to share between threads; not across fork() (LockError in the child). Items and ttl (in
    seconds) are as for sockrepair.lock(). Creating one raises LockError for an unknown namespace and NftError
    when no nf_tables netlink socket can be opened; close() it, or use it as a context manager."""

    def __init__(self, netns: str | None = None, label: str | None = None) -> None:
        self.netns = netns
        self.owner = default_owner(label)
        self._udata = encode_owner(self.owner)
        self._sock = NfSocket(netns)
        self._mutex = threading.Lock()
        self._pid = os.getpid()
        self._ready = False  # our table, maps, base chains and rules are known to be in place
        self._chains: set[int] = set()  # the groups whose keep chain is known to be in place
        self._destroy = True  # the kernel knows the DESTROY messages (6.3+); cleared when it turns out it does not

    def close(self) -> None:
        """Close the netlink socket; the locks stay in the kernel until unlocked or expired."""
        self._sock.close()

    def __enter__(self) -> Locker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self, group: int | None = None) -> None:
        """Build the table, maps and rules now (idempotent), and the keep chain of `group` when given, so that a
        later lock() inside a downtime window sends only its elements."""
        groups = set() if group is None else {group}
        with self._guard():
            if not self._ready or groups - self._chains:
                self._send_lock([], groups)

    def lock(self, items: Lockable | Iterable[Lockable], ttl: float = DEFAULT_TTL, group: int | None = None) -> int:
        """Drop every packet of these connections, both ways, for `ttl` seconds (0 < ttl <= 3600); locking again
        renews the timeout. With `group` (Recorder.group: the nfnetlink_log group its mover records on) what the
        peers send is copied to that group before it is dropped, and a tuple locked already is switched to it;
        without, new tuples are only dropped and tuples locked already keep copying where they did (a renewal by
        anyone keeps a mover's recording; any verdict but a keep chain's becomes `drop`). One transaction: all are
        locked or none. Returns the number of distinct tuples locked. Raises LockError (bad item or ttl; a table of
        another layout) or NftError."""
        timeout = ttl_ms(ttl)
        keys = ruleset.group_keys(as_tuples(items))
        if not keys:
            return 0
        element_reqs = ruleset.add_element_requests(keys, timeout, self._udata, group)
        with self._guard():
            try:
                self._send_lock(element_reqs, set() if group is None else {group})
            except NftError as exc:
                if exc.errno != errno.EEXIST or not _about(exc, element_reqs):
                    raise
                # some of them are locked already with another verdict: the kernel refuses to change it in place
                self._relock(keys, timeout, group)
        return sum(len(k) for k in keys.values())

    def _send_lock(self, element_reqs: list[Request], groups: set[int]) -> None:
        """Send elements (or nothing) with whatever the table, maps, rules and keep chains of `groups` still need."""
        try:
            self._sock.transact(self._setup(groups) + element_reqs)
        except NftError as exc:
            if exc.errno == errno.EEXIST and not _about(exc, element_reqs):
                self._replace_layout(element_reqs, groups)
            elif exc.errno == errno.ENOENT and (self._ready or self._chains):
                # Someone removed the table since we built it (`unlock --everything`, `nft flush ruleset`): build it
                # again.
                self._ready = False
                self._chains.clear()
                self._sock.transact(self._setup(groups) + element_reqs)
            else:
                raise
        self._ready = True
        self._chains |= groups

    def _setup(self, groups: set[int]) -> list[Request]:
        reqs = [] if self._ready else ruleset.setup_requests(round(DEFAULT_TTL * 1000))
        for group in sorted(groups - self._chains):
            reqs += ruleset.keep_chain_requests(group)
        return reqs

    def _replace_layout(self, element_reqs: list[Request], groups: set[int]) -> None:
        """The kernel refused our maps (EEXIST): the table is of an older layout, whose conn4/conn6 are plain sets.
        Replace them in one transaction if they hold no element; never mix layouts."""
        reqs = ruleset.replace_sets_requests() + ruleset.setup_requests(round(DEFAULT_TTL * 1000))
        for group in sorted(groups):
            reqs += ruleset.keep_chain_requests(group)
        try:
            self._sock.transact(reqs + element_reqs)
        except NftError as exc:
            if exc.errno == errno.EBUSY:
                raise LockError(
                    f"table inet {ruleset.TABLE} is of an older sockrepair layout (sets, not verdict maps) and "
                    "still holds locks of it: wait until they expire (`sockrepair locks`), or remove every lock "
                    "and the table with `sockrepair unlock --everything`"
                ) from None
            raise LockError(
                f"{exc}: table inet {ruleset.TABLE} has another layout (older sockrepair?); "
                "`sockrepair unlock --everything` removes it"
            ) from None
        log.info("replaced the empty sets of an older layout in table inet %s by verdict maps", ruleset.TABLE)

    def _relock(self, keys: dict[ruleset.Family, list[bytes]], timeout: int, group: int | None) -> None:
        """lock() when some tuples are locked with another verdict: delete those and add them again in one
        transaction (atomic: no packet sees them unlocked), each with the verdict lock() promises."""
        for _attempt in range(3):
            present = {fam: {bytes(k): v for k, v in self._dump_verdicts(fam)} for fam in keys}
            stale: dict[ruleset.Family, list[bytes]] = {}
            wanted: dict[int | None, dict[ruleset.Family, list[bytes]]] = {}
            for fam, fam_keys in keys.items():
                for key in fam_keys:
                    have = present[fam].get(key)
                    want = group if group is not None or have is None else ruleset.verdict_group(have)
                    if have is not None and have != ruleset.verdict_of(want):
                        stale.setdefault(fam, []).append(key)
                    wanted.setdefault(want, {}).setdefault(fam, []).append(key)
            reqs = ruleset.delete_element_requests(stale, destroy=False) if stale else []
            for want, want_keys in wanted.items():
                reqs += ruleset.add_element_requests(want_keys, timeout, self._udata, want)
            try:
                self._send_lock(reqs, {g for g in wanted if g is not None})
                return
            except NftError as exc:
                # an element expired (ENOENT) or was locked again with another verdict (EEXIST) since the dump
                if exc.errno not in (errno.ENOENT, errno.EEXIST) or not _about(exc, reqs):
                    raise
        raise LockError("lock: locked elements kept changing while being renewed; try again")

    def unlock(self, items: Lockable | Iterable[Lockable]) -> None:
        """Let these connections' packets through again. Tuples that are not locked are skipped silently. Raises
        LockError (bad item) or NftError."""
        keys = ruleset.group_keys(as_tuples(items))
        if not keys:
            return
        with self._guard():
            if self._destroy:
                try:
                    self._sock.transact(ruleset.delete_element_requests(keys, destroy=True))
                    log.debug("unlocked %d tuple(s); those not locked were skipped", sum(map(len, keys.values())))
                    return
                except NftError as exc:
                    if exc.errno == errno.ENOENT:
                        log.debug("unlock: no sockrepair lock table here, nothing is locked")
                        self._ready = False
                        self._chains.clear()
                        return
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    log.debug("kernel lacks NFT_MSG_DESTROYSETELEM (< 6.3): deleting only present elements")
                    self._destroy = False
            self._delete_present(keys)

    def _delete_present(self, keys: dict[ruleset.Family, list[bytes]]) -> None:
        """For kernels without DESTROY: DELSETELEM fails the whole transaction on one missing element, so delete
        only what a dump shows, and look again if one expired in between."""
        for _attempt in range(3):
            present = {fam: set(self._dump_keys(fam)) for fam in keys}
            todo = {fam: [k for k in fam_keys if k in present[fam]] for fam, fam_keys in keys.items()}
            todo = {fam: k for fam, k in todo.items() if k}
            skipped = sum(map(len, keys.values())) - sum(map(len, todo.values()))
            if skipped:
                log.debug("unlock: %d tuple(s) were not locked", skipped)
            if not todo:
                return
            try:
                self._sock.transact(ruleset.delete_element_requests(todo, destroy=False))
                return
            except NftError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        raise LockError("unlock: set elements kept disappearing while being deleted; try again")

    @contextlib.contextmanager
    def locked(self, items: Lockable | Iterable[Lockable], ttl: float = DEFAULT_TTL,
               group: int | None = None) -> Iterator[list[ConnTuple]]:
        """Hold the lock for the block (`group` as for lock()), yielding the ConnTuples (renew with `lock()` inside
        it if the block may outlast `ttl` seconds); unlocks on the way out, also on error."""
        tuples = as_tuples(items)
        self.lock(tuples, ttl, group)
        try:
            yield tuples
        finally:
            self.unlock(tuples)

    def list_locks(self) -> list[LockRecord]:
        """Every connection locked now in this namespace, sorted by tuple; [] without a table. Raises NftError."""
        # A dump longer than one netlink message resumes by counting the elements already sent; when the set's hash
        # table is resized in between (the kernel shrinks it in a worker after many deletions), that count skips
        # some elements and repeats as many others. A repeated element shows it: dump again.
        for _ in range(_DUMP_TRIES):
            records = self._list_once()
            if len({r.tuple for r in records}) == len(records):
                return records
        return sorted({r.tuple: r for r in records}.values(), key=lambda r: r.tuple)

    def _list_once(self) -> list[LockRecord]:
        with self._guard():
            records = []
            for fam in ruleset.FAMILIES:
                for elem in self._dump_elements(fam):
                    key = attrs(elem[c.NFTA_SET_ELEM_KEY]).get(c.NFTA_DATA_VALUE)
                    if key is None or len(key) != fam.key_len:
                        continue
                    verdict = ruleset.element_verdict(elem.get(c.NFTA_SET_ELEM_DATA))
                    timeout = elem.get(c.NFTA_SET_ELEM_TIMEOUT)
                    left = elem.get(c.NFTA_SET_ELEM_EXPIRATION)
                    udata = elem.get(c.NFTA_SET_ELEM_USERDATA)
                    records.append(
                        LockRecord(
                            ruleset.decode_key(fam, key),
                            be64(left) / 1000 if left is not None else 0.0,
                            be64(timeout) / 1000 if timeout is not None else DEFAULT_TTL,
                            decode_owner(udata) if udata is not None else "",
                            ruleset.verdict_group(verdict),
                        )
                    )
        return sorted(records, key=lambda r: r.tuple)

    def unlock_owned(self, label: str) -> list[LockRecord]:
        """Release every lock whose owner has the label `label` (its owner text is `LABEL pid=N host=H`; "" picks
        the elements another tool added without one) and return them as listed just before; the locks of other
        owners and the table stay. The kernel keeps no owner of its own: this is a courtesy between lockers (any
        process with CAP_NET_ADMIN can remove any element), and a lock another owner takes on one of these tuples
        between the listing and the release is released too. Raises NftError."""
        mine = [r for r in self.list_locks() if owner_label(r.owner) == label]
        self.unlock([r.tuple for r in mine])
        return mine

    def unlock_all(self) -> None:
        """Remove the whole table: every lock of every owner, rule and set of sockrepair in this namespace (none:
        nothing happens); unlock_owned() releases one owner's locks only. Raises NftError."""
        with self._guard():
            self._ready = False
            self._chains.clear()
            try:
                self._sock.transact([ruleset.delete_table_request(self._destroy)])
            except NftError as exc:
                if exc.errno == errno.ENOENT:
                    return
                if not self._destroy or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._destroy = False
                try:
                    self._sock.transact([ruleset.delete_table_request(False)])
                except NftError as again:
                    if again.errno != errno.ENOENT:
                        raise

    def rule_count(self) -> int:
        """Rules in our base chains (15 when intact), 0 when there is no table; keep chains are not counted."""
        with self._guard():
            try:
                return sum(
                    1
                    for msg in self._sock.dump(
                        c.NFT_MSG_GETRULE, ruleset.FAMILY, ruleset.dump_rules_payload(), "list rules"
                    )
                    if cstr(attrs(msg).get(c.NFTA_RULE_CHAIN, memoryview(b""))) in ruleset.BASE_CHAINS
                )
            except NftError as exc:
                if exc.errno == errno.ENOENT:
                    return 0
                raise

    def validate(self) -> None:
        """Send the setup, a keep chain and one element jumping to it without committing: the kernel checks
        everything and applies nothing."""
        probe = ConnTuple(ruleset.V4.sock_family, "127.0.0.1", 1, "127.0.0.1", 2)
        reqs = ruleset.setup_requests(round(DEFAULT_TTL * 1000)) + ruleset.keep_chain_requests(ruleset.NFLOG_GROUP)
        reqs += ruleset.add_element_requests(ruleset.group_keys([probe]), 1000, self._udata, ruleset.NFLOG_GROUP)
        with self._guard():
            self._sock.transact(reqs, commit=False)

    def _dump_elements(self, fam: ruleset.Family) -> Iterator[dict[int, Any]]:
        try:
            for msg in self._sock.dump(
                c.NFT_MSG_GETSETELEM, ruleset.FAMILY, ruleset.dump_elements_payload(fam), f"list set {fam.set_name}"
            ):
                elements = attrs(msg).get(c.NFTA_SET_ELEM_LIST_ELEMENTS)
                if elements is None:
                    continue
                for _kind, elem in iter_attrs(elements):
                    yield attrs(elem)
        except NftError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def _dump_keys(self, fam: ruleset.Family) -> Iterator[bytes]:
        for key, _verdict in self._dump_verdicts(fam):
            yield key

    def _dump_verdicts(self, fam: ruleset.Family) -> Iterator[tuple[bytes, ruleset.Verdict | None]]:
        for elem in self._dump_elements(fam):
            key = attrs(elem[c.NFTA_SET_ELEM_KEY]).get(c.NFTA_DATA_VALUE)
            if key is not None:
                yield bytes(key), ruleset.element_verdict(elem.get(c.NFTA_SET_ELEM_DATA))

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        if os.getpid() != self._pid:
            raise LockError("this Locker was created before fork(); make a new one in the child")
        with self._mutex:
            yield
