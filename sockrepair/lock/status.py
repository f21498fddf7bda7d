"""Whether the network lock works here, for `sockrepair check`: the kernel is asked to validate the lock's whole
table in a transaction that is never committed, so checking changes nothing."""

from __future__ import annotations

import os
from typing import Any

from sockrepair.errors import LockError
from sockrepair.lock.locker import Locker
from sockrepair.lock.ruleset import RULE_COUNT, TABLE


def nft_status(netns: str | None = None) -> dict[str, Any]:
    """`available`: nf_tables accepts the lock (needs CAP_NET_ADMIN); `table`: sockrepair's table exists;
    `intact`: it has all its rules (or does not exist yet); `locks`: connections locked now."""
    out: dict[str, Any] = {
        "available": False,
        "detail": "",
        "kernel": os.uname().release,
        "table": f"inet {TABLE}",
        "table_present": False,
        "intact": False,
        "rules": 0,
        "locks": 0,
    }
    try:
        with Locker(netns) as locker:
            locker.validate()
            rules = locker.rule_count()
            locks = len(locker.list_locks())
    except LockError as exc:
        out["detail"] = str(exc)
        return out
    expected = RULE_COUNT
    out.update(
        available=True,
        table_present=rules > 0,
        intact=rules in (0, expected),
        rules=rules,
        locks=locks,
        detail="nf_tables netlink works: the lock's table, sets and rules are accepted"
        + (
            "" if rules in (0, expected) else f"; the table has {rules} rules instead of {expected} (next lock repairs)"
        ),
    )
    return out
