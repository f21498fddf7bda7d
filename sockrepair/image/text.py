"""The text view of a connection state, one for every command that prints one: `sockrepair inspect`, `sockrepair
show` and `sockrepair criu show`. The JSON view is jsonview.py."""

from __future__ import annotations

import dataclasses
import errno

from sockrepair.state import (
    TCP_CLOSE,
    ConnectionState,
    ConnTuple,
    SocketOptions,
    state_name,
)

DETAIL = "     "  # the indent of every line after the first
_DEFAULT_SOCKOPTS = SocketOptions()


def head_line(conn: ConnTuple, state: str, head: str = "") -> str:
    """The first line: `head` (e.g. "fd 3    "), the 4-tuple, the TCP state name. Alone, it stands for a socket
    with no checkpoint (a LISTEN socket in `inspect`)."""
    return f"{head}{conn!s:<48} {state}"


def state_lines(state: ConnectionState, head: str = "", name: str | None = None) -> list[str]:
    """head_line (with `name` for the state's own name, when given: "ESTABLISHED (in repair mode)"), then sequence
    numbers and queue lengths (bytes), TCP options and the timestamp clock, the repair window when there is one,
    the socket options that differ from a new socket's, and in CLOSE the pending error and whether the peer's FIN
    had arrived."""
    o, w = state.options, state.window
    lines = [
        head_line(state.tuple, name or state_name(state.tcp_state), head),
        (f"{DETAIL}snd_seq {state.send_seq} rcv_seq {state.recv_seq}  unacked {len(state.unacked)} B  never sent "
         f"{state.unsent_len} B  unread {len(state.recv_queue)} B"),
        (f"{DETAIL}mss {o.mss}  wscale {o.snd_wscale},{o.rcv_wscale}{'' if o.wscale else ' (off)'}  "
         f"sack {_on(o.sack)}  timestamps {_on(o.timestamps)}  ts {state.timestamp}"),
    ]
    if w is not None:
        lines.append(f"{DETAIL}window snd_wnd {w.snd_wnd} rcv_wnd {w.rcv_wnd} max {w.max_window} "
                     f"snd_wl1 {w.snd_wl1} rcv_wup {w.rcv_wup}")
    lines.append(f"{DETAIL}sockopts {_sockopts(state.sockopts)}")
    if state.tcp_state == TCP_CLOSE:
        error = errno.errorcode.get(state.sk_err, str(state.sk_err)) if state.sk_err else "none"
        lines.append(f"{DETAIL}closed: pending error {error}, the peer's FIN "
                     f"{'received' if state.fin_received else 'not seen'}")
    return lines


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _sockopts(opts: SocketOptions) -> str:
    changed = [(f.name, getattr(opts, f.name)) for f in dataclasses.fields(opts)
               if getattr(opts, f.name) != getattr(_DEFAULT_SOCKOPTS, f.name)]
    if not changed:
        return "as a new socket's"
    return "  ".join(f"{name} {_on(value) if isinstance(value, bool) else value}" for name, value in changed)
