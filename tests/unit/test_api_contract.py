"""The public API's contract (in the spirit of psutil's test_contracts): the names `sockrepair` exports, the
exception tree and the fields callers branch on, docstrings, and the verbs' signatures. A change here is a change of
the API: it must be deliberate, and it shows in this file's diff."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import sockrepair
from sockrepair import errors
from sockrepair.state import ConnectionState, ConnTuple

EXPORTED = [
    "AddressInUseError",
    "AddressNotLocalError",
    "BenchmarkError",
    "ConnTuple",
    "ConnectionState",
    "CriuError",
    "HandoffError",
    "ImageError",
    "KeepCaps",
    "LockError",
    "LockRecord",
    "Locker",
    "MigrationReport",
    "NetnsError",
    "NftError",
    "NotPermittedError",
    "OnBusy",
    "ProcessError",
    "Quiescence",
    "RepairWindow",
    "RestoreError",
    "SocketCallError",
    "SocketOptions",
    "SocketStateError",
    "SockrepairError",
    "TcpOptions",
    "UnsupportedError",
    "WireError",
    "checkpoint",
    "discard",
    "list_locks",
    "lock",
    "locked",
    "migrate",
    "restore",
    "resume",
    "unlock",
    "unlock_all",
]

TUPLE = ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 443)


# ---- the names ----------------------------------------------------------------------------------------------------


def test_all_is_exactly_the_public_api() -> None:
    assert sockrepair.__all__ == EXPORTED
    assert sorted(EXPORTED) == EXPORTED
    for name in EXPORTED:
        assert getattr(sockrepair, name) is not None, name


def test_every_exception_class_is_exported() -> None:
    public = {name for name, obj in vars(errors).items()
              if isinstance(obj, type) and issubclass(obj, BaseException) and not name.startswith("_")}
    assert public <= set(EXPORTED), public - set(EXPORTED)
    for name in public:
        assert getattr(sockrepair, name) is getattr(errors, name)


def test_import_loads_no_heavy_dependency() -> None:
    # construct (the image definition), protobuf (criu's images) and scapy (the wire tools) load only where used.
    code = (
        "import sys, sockrepair\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('construct', 'scapy')"
        " or m == 'google.protobuf' or m.startswith('google.protobuf.'))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", out.stdout


def _fresh(code: str) -> str:
    """What `code` prints in a fresh interpreter (this one has imported most of sockrepair already)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_import_loads_the_errors_only_and_each_name_on_first_use() -> None:
    """`import sockrepair` loaded the engine, the lock and migrate() (~120 ms): the `sockrepair` command's start, where
    a Ctrl-C printed an import's traceback."""
    code = (
        "import sys, sockrepair, sockrepair.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('sockrepair')))\n"
        "sockrepair.checkpoint\n"
        "print('sockrepair.engine' in sys.modules, 'sockrepair.move.migrate' in sys.modules)\n"
    )
    assert _fresh(code).splitlines() == ["['sockrepair', 'sockrepair.cli', 'sockrepair.errors']", "True False"]


@pytest.mark.parametrize("module", ["sockrepair.netns", "sockrepair.lock.inject", "sockrepair.lock.record",
                                    "sockrepair.move.keeper", "sockrepair.move.handoff", "sockrepair.engine"])
def test_a_module_imported_first_imports(module: str) -> None:
    """With `import sockrepair` loading no module, the first one a program (the keeper, a benchmark) imports decides
    the order: sockrepair.netns first met its own partial module through the engine and the lock."""
    assert _fresh(f"import {module}\nprint('imported')") == "imported\n"


@pytest.mark.parametrize("first", ["import sockrepair.lock", "import sockrepair.move.migrate", "sockrepair.Locker",
                                   "from sockrepair import lock", "sockrepair.lock"])
def test_sockrepair_lock_is_the_function_whatever_was_imported_first(first: str) -> None:
    """The import system binds a subpackage on its package when it first loads it: sockrepair.lock the subpackage
    must not replace sockrepair.lock the function. `import sockrepair.lock as m` gives the function (documented)."""
    code = (f"import sys, sockrepair\n{first}\nimport sockrepair.lock as m\n"
            "from sockrepair.lock import Locker, lock\n"
            "print(sockrepair.lock is m is lock,\n"
            "      sys.modules['sockrepair.lock'].Locker is Locker is sockrepair.Locker)\n")
    assert _fresh(code) == "True True\n"


# ---- the exception tree -------------------------------------------------------------------------------------------

# Each exception's public ancestors: what `except` clauses can rely on (private helper bases left out).
ANCESTORS: dict[str, set[type]] = {
    "SockrepairError": set(),
    "SocketCallError": {errors.SockrepairError, OSError},
    "SocketStateError": {errors.SockrepairError},
    "RestoreError": {errors.SockrepairError},
    "AddressInUseError": {errors.RestoreError, errors.SockrepairError, OSError},
    "AddressNotLocalError": {errors.RestoreError, errors.SockrepairError, OSError},
    "ImageError": {errors.SockrepairError, ValueError},
    "ProcessError": {errors.SockrepairError},
    "NetnsError": {errors.SockrepairError},
    "UnsupportedError": {errors.SockrepairError},
    "NotPermittedError": {errors.UnsupportedError, errors.SockrepairError, PermissionError, OSError},
    "LockError": {errors.SockrepairError},
    "NftError": {errors.LockError, errors.SockrepairError, OSError},
    "HandoffError": {errors.SockrepairError},
    "WireError": {errors.SockrepairError},
    "CriuError": {errors.SockrepairError},
    "BenchmarkError": {errors.SockrepairError},
}
_ROOTS = {object, BaseException, Exception}


@pytest.mark.parametrize("name", sorted(ANCESTORS))
def test_exception_ancestors(name: str) -> None:
    cls = getattr(sockrepair, name)
    public = {c for c in cls.__mro__[1:] if c not in _ROOTS and not c.__name__.startswith("_")}
    assert public == ANCESTORS[name]
    assert issubclass(cls, sockrepair.SockrepairError)


def test_every_exported_exception_is_in_the_tree() -> None:
    exported = {n for n in EXPORTED if isinstance(getattr(sockrepair, n), type)
                and issubclass(getattr(sockrepair, n), BaseException)}
    assert exported == set(ANCESTORS)


def _errno_cases() -> list[tuple[BaseException, int]]:
    return [
        (sockrepair.SocketCallError(errno.EINVAL, "setsockopt(TCP_REPAIR_WINDOW)", 7), errno.EINVAL),
        (sockrepair.AddressInUseError("held"), errno.EADDRINUSE),
        (sockrepair.AddressNotLocalError("not here"), errno.EADDRNOTAVAIL),
        (sockrepair.NotPermittedError("no CAP_NET_ADMIN"), errno.EPERM),
        (sockrepair.NftError("add 1 element(s) of set inet sockrepair conn4", errno.ENOENT), errno.ENOENT),
    ]


def _case_id(value: object) -> str:
    return errno.errorcode[value] if isinstance(value, int) else type(value).__name__


@pytest.mark.parametrize(("exc", "err"), _errno_cases(), ids=_case_id)
def test_errno_carrying_errors_are_oserrors(exc: OSError, err: int) -> None:
    assert isinstance(exc, OSError)
    assert exc.errno == err
    # str() is the message alone, not OSError's "[Errno N] ..." form
    assert not str(exc).startswith("[Errno")
    with pytest.raises(OSError) as caught:
        raise exc
    assert caught.value.errno == err


def test_permission_error_is_a_permission_error() -> None:
    with pytest.raises(PermissionError):
        raise sockrepair.NotPermittedError("TCP_REPAIR refused", fd=3)


def test_image_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        raise sockrepair.ImageError("bad", offset=4, field="version")


# ---- the fields callers branch on ---------------------------------------------------------------------------------


def test_socket_call_error_fields() -> None:
    exc = sockrepair.SocketCallError(errno.EAGAIN, "recv(MSG_PEEK)", 5, tuple=TUPLE)
    assert (exc.errno, exc.op, exc.fd, exc.tuple) == (errno.EAGAIN, "recv(MSG_PEEK)", 5, TUPLE)
    assert str(exc) == "recv(MSG_PEEK) on fd 5: Resource temporarily unavailable (EAGAIN)"
    named = sockrepair.SocketCallError(errno.EBADF, "close", sock="the frozen socket")
    assert named.fd is None and named.tuple is None
    assert str(named).startswith("close on the frozen socket: ")


def test_socket_state_error_fields() -> None:
    exc = sockrepair.SocketStateError("listening", fd=4, pid=99, tuple=TUPLE, tcp_state=10)
    assert (exc.fd, exc.pid, exc.tuple, exc.tcp_state) == (4, 99, TUPLE, 10)
    assert str(exc) == "listening"
    bare = sockrepair.SocketStateError("x")
    assert (bare.fd, bare.pid, bare.tuple, bare.tcp_state) == (None, None, None, None)


@pytest.mark.parametrize("cls", ["RestoreError", "AddressInUseError", "AddressNotLocalError"])
def test_restore_error_fields(cls: str) -> None:
    exc = getattr(sockrepair, cls)(f"cannot restore {TUPLE}", tuple=TUPLE)
    assert exc.tuple == TUPLE
    assert str(exc) == f"cannot restore {TUPLE}"
    assert getattr(sockrepair, cls)("x").tuple is None


def test_image_error_fields() -> None:
    exc = sockrepair.ImageError("bad connection image at byte 47: ...", path="/tmp/c.img", offset=47,
                                field="window.snd_wnd")
    assert (exc.path, exc.offset, exc.field) == ("/tmp/c.img", 47, "window.snd_wnd")
    bare = sockrepair.ImageError("x")
    assert (bare.path, bare.offset, bare.field) == (None, None, None)


def test_process_error_fields() -> None:
    exc = sockrepair.ProcessError("process 12 has no fd 3", pid=12, fd=3)
    assert (exc.pid, exc.fd) == (12, 3)
    assert (sockrepair.ProcessError("x").pid, sockrepair.ProcessError("x").fd) == (None, None)


def test_not_permitted_error_fields() -> None:
    exc = sockrepair.NotPermittedError("refused", fd=3, pid=12)
    assert (exc.fd, exc.pid, exc.errno, str(exc)) == (3, 12, errno.EPERM, "refused")


def test_netns_error_fields() -> None:
    assert sockrepair.NetnsError("gone", name="hostb").name == "hostb"
    assert sockrepair.NetnsError("gone").name is None


def test_benchmark_error_fields() -> None:
    assert sockrepair.BenchmarkError("the traced cycles failed: 1", part="syscalls").part == "syscalls"
    assert sockrepair.BenchmarkError("x").part is None


def test_nft_error_fields() -> None:
    exc = sockrepair.NftError("create table inet sockrepair", errno.EPERM)
    assert (exc.op, exc.errno) == ("create table inet sockrepair", errno.EPERM)
    assert "CAP_NET_ADMIN" in str(exc)
    assert "kernel says no" in str(sockrepair.NftError("op", errno.EINVAL, "kernel says no"))


def test_cli_json_fields_of_an_error() -> None:
    exc = sockrepair.SocketCallError(errno.EINVAL, "setsockopt(TCP_REPAIR_WINDOW)", 7, tuple=TUPLE)
    from sockrepair.cli.output import error_object

    assert error_object(exc)["error"] == {"type": "SocketCallError", "message": str(exc), "errno": errno.EINVAL,
                                          "op": "setsockopt(TCP_REPAIR_WINDOW)", "fd": 7, "tuple": str(TUPLE)}


@pytest.mark.parametrize("name", sorted(ANCESTORS))
def test_exceptions_pickle_with_their_fields(name: str) -> None:
    cls = getattr(sockrepair, name)
    samples = {
        "SocketCallError": lambda: cls(errno.EINVAL, "setsockopt(TCP_REPAIR_WINDOW)", 7, tuple=TUPLE),
        "SocketStateError": lambda: cls("listening", fd=4, pid=9, tuple=TUPLE, tcp_state=10),
        "ImageError": lambda: cls("bad", path="/x.img", offset=47, field="window.snd_wnd"),
        "NftError": lambda: cls("create table inet sockrepair", errno.EPERM),
        "NotPermittedError": lambda: cls("refused", fd=3, pid=12),
        "ProcessError": lambda: cls("gone", pid=12, fd=3),
        "NetnsError": lambda: cls("gone", name="hostb"),
        "BenchmarkError": lambda: cls("the traced cycles failed: 1", part="syscalls"),
    }
    if name in samples:
        exc = samples[name]()
    elif name in ("RestoreError", "AddressInUseError", "AddressNotLocalError"):
        exc = cls(f"cannot restore {TUPLE}", tuple=TUPLE)
    else:
        exc = cls("message")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert (str(back), back.args, vars(back)) == (str(exc), exc.args, vars(exc))
    assert getattr(back, "errno", None) == getattr(exc, "errno", None)


# ---- docstrings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_names_have_docstrings(name: str) -> None:
    obj = getattr(sockrepair, name)
    assert callable(obj), name
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 30, name
    if isinstance(obj, type) and not issubclass(obj, BaseException):
        for attr, member in vars(obj).items():
            if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                assert inspect.getdoc(member), f"{name}.{attr}"


@pytest.mark.parametrize("name", ["checkpoint", "resume", "discard", "restore", "migrate", "lock", "unlock",
                                  "locked", "list_locks", "unlock_all", "Locker"])
def test_callables_say_what_they_raise(name: str) -> None:
    doc = inspect.getdoc(getattr(sockrepair, name)) or ""
    assert "Raises" in doc or "raise" in doc, name
    assert "Error" in doc, name


@pytest.mark.parametrize("name", ["ConnectionState", "ConnTuple", "TcpOptions", "RepairWindow", "SocketOptions"])
def test_state_docstrings_name_every_field(name: str) -> None:
    cls = getattr(sockrepair, name)
    doc = inspect.getdoc(cls) or ""
    for f in dataclasses.fields(cls):
        assert f"`{f.name}`" in doc or f"`{f.name}`/" in doc, f"{name}.{f.name} is not described"


def test_state_docstrings_give_the_kernel_sources() -> None:
    doc = inspect.getdoc(ConnectionState) or ""
    for source in ("TCP_QUEUE_SEQ", "TCP_SEND_QUEUE", "TCP_RECV_QUEUE", "write_seq", "rcv_nxt", "snd_una",
                   "snd_nxt", "SIOCOUTQNSD", "MSG_PEEK", "TCP_TIMESTAMP", "low bit"):
        assert source in doc, source
    assert "mss_clamp" in (inspect.getdoc(sockrepair.TcpOptions) or "")
    assert "tcpi_options" in (inspect.getdoc(sockrepair.TcpOptions) or "")
    assert "struct tcp_repair_window" in (inspect.getdoc(sockrepair.RepairWindow) or "")
    so = inspect.getdoc(sockrepair.SocketOptions) or ""
    for source in ("SOL_SOCKET", "IPPROTO_TCP", "IPPROTO_IP", "SO_MARK", "TCP_USER_TIMEOUT", "IPV6_TCLASS"):
        assert source in so, source


def test_lock_docstrings_give_units() -> None:
    assert "seconds" in (inspect.getdoc(sockrepair.lock) or "")
    assert "seconds" in (inspect.getdoc(sockrepair.LockRecord) or "")


# ---- signatures ---------------------------------------------------------------------------------------------------

P = inspect.Parameter
SockLike = socket.socket | int
POS, KW = P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY

# name: ([(parameter, kind, default, annotation)], return annotation)
SIGNATURES: dict[str, tuple[list[tuple[str, object, object, object]], object]] = {
    "checkpoint": ([("sock", POS, P.empty, SockLike)], ConnectionState),
    "resume": ([("sock", POS, P.empty, SockLike)], None),
    "discard": ([("sock", POS, P.empty, SockLike), ("state", POS, None, ConnectionState | None)], None),
    "restore": ([("state", POS, P.empty, ConnectionState)], socket.socket),
    "migrate": (
        [
            ("pid", POS, P.empty, int),
            ("wanted", KW, None, Sequence[int] | None),
            ("dest_netns", KW, None, str | None),
            ("network", KW, None, Callable[[], object] | None),
            ("handoff", KW, None, Callable[[list[socket.socket], list[ConnTuple]], object] | None),
            ("ttl", KW, 60.0, float),
            ("keep", KW, True, bool | sockrepair.KeepCaps),
            ("journal", KW, None, str | Path | None),
            ("quiescence", KW, sockrepair.Quiescence(), sockrepair.Quiescence),
        ],
        sockrepair.MigrationReport,
    ),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name: str) -> None:
    sig = inspect.signature(getattr(sockrepair, name), eval_str=True)
    params, returns = SIGNATURES[name]
    assert [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()] == params
    assert sig.return_annotation == returns
