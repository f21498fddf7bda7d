"""A connection state as JSON-ready data: a summary to read, or with `payload` a full image to turn back into a
state (`state_from_dict`). Errors name the offending key as a path ("options.sack", "send_queue.base64") in the
message and as ImageError's `.field`; JSON has no byte offsets, so `.offset` stays None."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import hashlib
import socket
from typing import Any

from sockrepair.errors import ImageError
from sockrepair.image import layout
from sockrepair.image._codec import problem_of
from sockrepair.state import (
    TCP_CLOSE,
    TCP_STATES,
    ConnectionState,
    ConnTuple,
    Payload,
    RepairWindow,
    SocketOptions,
    TcpOptions,
    state_name,
)

_STATE_NUMBERS = {name: number for number, name in TCP_STATES.items()}
_SCALARS = ("send_seq", "recv_seq", "unsent_len", "timestamp")
# The socket options a version 1 view has no key for.
_V2_SOCKOPTS = (*layout.MORE_SOCKOPT_FLAGS, *layout.MORE_SOCKOPT_INTS, *layout.MORE_SOCKOPT_LONGS)
_KEYS = {"version", "tuple", "state", *_SCALARS, "send_queue", "recv_queue", "options", "window", "sockopts"}


def state_to_dict(state: ConnectionState, payload: bool = False) -> dict[str, Any]:
    """Queues appear as {length, sha256}, plus their bytes in base64 when `payload` is set. A connection in CLOSE
    has a "close" key: {"sk_err": the pending errno (0 for none), "error": its name ("" for none),
    "fin_received": whether the peer's FIN had arrived}."""
    view = {
        "version": layout.VERSION,
        "tuple": str(state.tuple),
        "state": state_name(state.tcp_state),
        "send_seq": state.send_seq,
        "recv_seq": state.recv_seq,
        "send_queue": _queue(state.send_queue, payload),
        "unsent_len": state.unsent_len,
        "recv_queue": _queue(state.recv_queue, payload),
        "timestamp": state.timestamp,
        "options": dataclasses.asdict(state.options),
        "window": None if state.window is None else dataclasses.asdict(state.window),
        "sockopts": dataclasses.asdict(state.sockopts),
    }
    if state.tcp_state == TCP_CLOSE:
        view["close"] = {"sk_err": state.sk_err, "error": errno.errorcode.get(state.sk_err, ""),
                         "fin_received": state.fin_received}
    return view


def _queue(data: Payload, payload: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if payload:
        summary["base64"] = base64.b64encode(data).decode("ascii")
    return summary


def state_from_dict(d: Any) -> ConnectionState:
    """The state a `state_to_dict(state, payload=True)` dict describes; anything else raises ImageError naming the
    offending key."""
    _keys(d, _KEYS | ({"close"} if isinstance(d, dict) and "close" in d else set()), "")
    _typed(d["version"], int, "version")
    if d["version"] not in layout.VERSIONS:
        known = ", ".join(map(str, layout.VERSIONS))
        raise _bad("version", f"{d['version']!r} is not one of {known}, the versions this sockrepair reads")
    tcp_state = _STATE_NUMBERS.get(d["state"]) if isinstance(d["state"], str) else None
    if tcp_state is None:
        raise _bad("state", f"{d['state']!r} is not a TCP state name")
    for key in _SCALARS:
        _typed(d[key], int, key)
    state = ConnectionState(
        tuple=_conn_tuple(d["tuple"]),
        tcp_state=tcp_state,
        send_seq=d["send_seq"],
        recv_seq=d["recv_seq"],
        send_queue=_payload(d["send_queue"], "send_queue"),
        unsent_len=d["unsent_len"],
        recv_queue=_payload(d["recv_queue"], "recv_queue"),
        options=_record(TcpOptions, d["options"], "options"),
        window=None if d["window"] is None else _record(RepairWindow, d["window"], "window"),
        timestamp=d["timestamp"],
        sockopts=_record(SocketOptions, d["sockopts"], "sockopts", () if d["version"] >= 2 else _V2_SOCKOPTS),
    )
    if "close" in d:
        close = d["close"]
        _keys(close, {"sk_err", "error", "fin_received"}, "close")
        _typed(close["sk_err"], int, "close.sk_err")
        _typed(close["fin_received"], bool, "close.fin_received")
        state = state.replace(sk_err=close["sk_err"], fin_received=close["fin_received"])
    problem = problem_of(state)
    if problem is not None:
        raise ImageError(f"bad JSON connection image: {problem[1]}", field=problem[0])
    return state


def _conn_tuple(text: Any) -> ConnTuple:
    _typed(text, str, "tuple")
    try:
        t = ConnTuple.parse(text)
    except ValueError as exc:
        raise _bad("tuple", str(exc)) from None
    # Addresses as inet_ntop spells them, like getsockname() does: ipaddress writes v4-mapped ones differently.
    canon = [socket.inet_ntop(t.family, socket.inet_pton(t.family, a)) for a in (t.local_addr, t.remote_addr)]
    return ConnTuple(t.family, canon[0], t.local_port, canon[1], t.remote_port)


def _payload(summary: Any, key: str) -> bytes:
    if isinstance(summary, dict) and summary.keys() == {"length", "sha256"}:
        raise _bad(key, "only a summary, no payload (write the JSON with payload=True)")
    _keys(summary, {"length", "sha256", "base64"}, key)
    _typed(summary["base64"], str, f"{key}.base64")
    try:
        data = base64.b64decode(summary["base64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"{key}.base64", f"not base64 ({exc})") from None
    if summary["length"] != len(data):
        raise _bad(f"{key}.length", f"says {summary['length']!r} but the payload has {len(data)} bytes")
    if summary["sha256"] != hashlib.sha256(data).hexdigest():
        raise _bad(f"{key}.sha256", "does not match the payload")
    return data


def _record(cls: type, fields: Any, key: str, absent: tuple[str, ...] = ()) -> Any:
    """An instance of the dataclass `cls` from a dict holding exactly its fields but `absent` (which take their
    defaults), each of its declared type."""
    kinds = {"bool": bool, "int": int, "str": str}
    spec = {f.name: kinds[f.type if isinstance(f.type, str) else f.type.__name__] for f in dataclasses.fields(cls)
            if f.name not in absent}
    _keys(fields, set(spec), key)
    for name, kind in spec.items():
        _typed(fields[name], kind, f"{key}.{name}")
    return cls(**fields)


def _keys(d: Any, expected: set[str], key: str) -> None:
    where = key or "the image"
    if not isinstance(d, dict):
        raise _error(where, f"want an object, not {type(d).__name__}", key or None)
    missing, unknown = sorted(expected - d.keys()), sorted(map(str, d.keys() - expected))
    # the field blamed is the first missing or unknown key itself, not the object holding it
    for names, what in ((missing, "missing"), (unknown, "unknown")):
        if names:
            raise _error(where, f"{what} {', '.join(names)}", f"{key}.{names[0]}" if key else names[0])


def _typed(value: Any, kind: type, key: str) -> None:
    # JSON true/false load as bool, a subclass of int: an integer field must not accept them, nor the reverse.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(key, f"{value!r} is not {'an' if kind is int else 'a'} {kind.__name__}")


def _bad(key: str, what: str) -> ImageError:
    return _error(key, what, key)


def _error(shown: str, what: str, field: str | None) -> ImageError:
    """`shown` is where the message says the problem is; `field` the path ImageError.field blames."""
    return ImageError(f"bad JSON connection image: {shown}: {what}", field=field)
