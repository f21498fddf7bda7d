"""Who holds a lock: a short text kept in each set element's userdata, in the TLV form libnftnl uses for comments, so
`nft list table inet sockrepair` prints it as `comment "..."` too."""

from __future__ import annotations

import os
import socket

from sockrepair.lock import nfconst as c

DEFAULT_LABEL = "sockrepair"
# nft refuses longer comments (NFTNL_UDATA_COMMENT_MAXLEN, NUL included).
MAX_OWNER_BYTES = 127


def default_owner(label: str | None = None) -> str:
    """`LABEL pid=N host=H`: enough to find the process that locked a connection, or to know it is gone."""
    who = f"pid={os.getpid()} host={socket.gethostname()}"
    return f"{label or DEFAULT_LABEL} {who}"


def owner_label(owner: str) -> str:
    """The LABEL of an owner text `LABEL pid=N host=H` (a label may hold spaces); the whole text when it is not of
    that form (another tool's comment)."""
    label, sep, _ = owner.rpartition(" pid=")
    return label if sep else owner


def encode_owner(owner: str) -> bytes:
    raw = owner.encode()[:MAX_OWNER_BYTES].decode(errors="ignore").encode()
    return bytes((c.NFTNL_UDATA_SET_ELEM_COMMENT, len(raw) + 1)) + raw + b"\0"


def decode_owner(udata: bytes | memoryview) -> str:
    """The comment TLV of an element's userdata; "" when another tool added the element without one."""
    data = bytes(udata)
    pos = 0
    while pos + 2 <= len(data):
        kind, size = data[pos], data[pos + 1]
        value = data[pos + 2 : pos + 2 + size]
        if kind == c.NFTNL_UDATA_SET_ELEM_COMMENT:
            return value.split(b"\0", 1)[0].decode(errors="replace")
        pos += 2 + size
    return ""
