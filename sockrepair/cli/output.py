"""How every command prints: JSON documents on stdout, and errors as one line on stderr (under `--json`, also as a
JSON object on stdout, so a script reading stdout learns what failed and where)."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from sockrepair.errors import ECHO_LIMIT, SockrepairError, shown

# The attributes of sockrepair.errors exceptions a caller branches on (see that module's docstring).
ERROR_FIELDS = ("errno", "op", "fd", "pid", "tuple", "tcp_state", "path", "offset", "field", "name", "journal",
                "part")


def print_json(data: Any) -> None:
    """The one JSON printer of the CLI: indented, one document, a newline after it."""
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def message(exc: BaseException, inputs: Iterable[str] = ()) -> str:
    """The one-line text of an error: its own for sockrepair's; for a plain OSError "PATH: what the kernel said",
    never Python's "[Errno N] ...: 'PATH'". A long path or name the error carries, or a long one of `inputs` (the
    command's arguments), is cut where the text quotes it (clip_echoes)."""
    if isinstance(exc, OSError) and not isinstance(exc, SockrepairError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename is not None else str(exc.strerror)
        if exc.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
            # what a user without the capabilities meets first is often a file of /proc or /run
            text += " (sockrepair needs root: CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE)"
    else:
        text = str(exc)
    echoed = [getattr(exc, n, None) for n in ("path", "name", "filename", "filename2")]
    return clip_echoes(text, [*inputs, *(os.fsdecode(v) for v in echoed if isinstance(v, (str, bytes, os.PathLike)))])


def clip_echoes(text: str, inputs: Iterable[str]) -> str:
    """`text` with each of `inputs` (what the user gave: arguments, paths) longer than ECHO_LIMIT characters
    replaced, quoted or not, by its errors.shown() form: a 5,000-character path is not echoed whole."""
    for value in sorted({v for v in inputs if len(v) > ECHO_LIMIT}, key=len, reverse=True):
        text = text.replace(repr(value), shown(value)).replace(value, shown(value))
    return text


def error_object(exc: BaseException, inputs: Iterable[str] = ()) -> dict[str, Any]:
    """{"error": {"type": class name, "message": the one-line text (message()), and each of ERROR_FIELDS the exception
    has, whole}}; the tuple as its `ADDR:PORT->ADDR:PORT` text. A plain OSError's file name counts as `path`."""
    fields = {n: (str(v) if n == "tuple" else v) for n in ERROR_FIELDS if (v := getattr(exc, n, None)) is not None}
    if isinstance(exc, OSError) and exc.filename is not None:
        fields.setdefault("path", str(exc.filename))
    return {"error": {"type": type(exc).__name__, "message": message(exc, inputs), **fields}}


def print_error(exc: BaseException, as_json: bool, inputs: Sequence[str] = ()) -> None:
    """The error as one line on stderr (with its notes), and as error_object() on stdout when `as_json`; `inputs`:
    the command's arguments, cut in the text where they are long."""
    print(f"sockrepair: error: {message(exc, inputs)}", file=sys.stderr)
    # notes say how to finish or retry what failed half-way (e.g. the journal of a move whose source is gone)
    for note in getattr(exc, "__notes__", ()):
        print(f"sockrepair: {note}", file=sys.stderr)
    if as_json:
        print_json(error_object(exc, inputs))
