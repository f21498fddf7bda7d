"""Files and directories that hold payload bytes or name connections, kept from other users.

The policy (docs/migration.md, "Other users"): a directory sockrepair writes images to, or reads them from, must be
a real directory (not a symlink), owned by the caller (for reading, root-owned too), and writable by nobody else
(no group or other write bit: whoever can write there can swap an image, and its bytes would go into a live
connection). Files are created 0600 relative to the directory's fd, with O_NOFOLLOW|O_EXCL (a planted symlink or
file is refused, never followed or reused), and read back only as regular files (no symlink, FIFO or device) of a
bounded size. Refusals are OSError (PermissionError for ownership, mode and symlinks) with `.strerror` the reason
and `.filename` the path; callers wrap them into their own error."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import IO

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _refused(reason: str, path: str | Path, err: int = errno.EPERM) -> OSError:
    return (PermissionError if err == errno.EPERM else OSError)(err, reason, str(path))


def _check_dir(fd: int, path: str | Path, writing: bool) -> None:
    st = os.fstat(fd)
    euid = os.geteuid()
    trusted = (euid,) if writing else (euid, 0)
    if st.st_uid not in trusted:
        whose = "you" if writing or euid == 0 else "you or root"
        raise _refused(f"owned by uid {st.st_uid}, not by {whose} (uid {euid})", path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if st.st_mode & bit)
        raise _refused(f"writable by {who} (mode "
                       f"{stat.S_IMODE(st.st_mode):04o}): anyone who can write there can swap what it holds; "
                       "use a directory only you can write (chmod go-w)", path)


def open_dir(path: str | Path, *, writing: bool = False) -> int:
    """An O_RDONLY fd of the directory `path`, after checking it is not a symlink, is owned by the caller (reading:
    the caller or root) and is writable by nobody else. Close it. Raises FileNotFoundError, NotADirectoryError, or
    PermissionError (`.strerror` says why) when it is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and os.path.islink(path)):
            raise _refused("is a symlink: give the real directory", path) from None
        raise
    try:
        _check_dir(fd, path, writing)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dir(path: str | Path) -> int:
    """An fd (see open_dir) of the directory `path` to write into: created 0700 (with its parents) when missing; an
    existing one must pass open_dir's checks and be empty, so that nothing of an earlier dump mixes with this one.
    Raises what open_dir raises, and OSError EEXIST when the directory is not empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    fd = open_dir(path, writing=True)
    try:
        if os.listdir(fd):
            raise _refused("is not empty: give a new or empty directory (images of different dumps must not mix)",
                           path, errno.EEXIST)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private(dir_fd: int, name: str, mode: str = "wb") -> IO:  # type: ignore[type-arg]
    """Create the file `name` in the directory `dir_fd`, 0600, for writing: O_EXCL|O_NOFOLLOW, so an existing file
    or symlink of that name is refused (FileExistsError), never followed or truncated."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def replace_private(directory: str | Path, name: str, data: bytes, durable: bool = True) -> None:
    """`data` as the file `name` in `directory`, 0600, whole or not at all: written to NAME.part (one that a writer
    killed meanwhile left is removed first), fsynced, renamed over `name`, the directory fsynced; a crash leaves the
    old file or the new one. Not `durable`: nothing fsynced (a directory a reboot clears anyway), and a killed
    writer still leaves one or the other. Raises OSError."""
    part = name + ".part"
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part, dir_fd=dir_fd)
        with create_private(dir_fd, part) as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.rename(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if durable:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_regular(name: str | Path, dir_fd: int | None = None, *, shown: str | Path | None = None) -> IO[bytes]:
    """`name` (relative to `dir_fd` when given) opened for reading, refused unless it is a regular file: not a
    symlink (O_NOFOLLOW), FIFO, device or directory (fstat after the open, which O_NONBLOCK keeps from blocking on a
    FIFO). `shown` is the path errors name (default `name`). Raises OSError (ELOOP for a symlink, EINVAL for
    anything else that is not a regular file)."""
    shown = name if shown is None else shown
    try:
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused("is a symlink, not a regular file", shown, errno.ELOOP) from None
        raise OSError(exc.errno, exc.strerror, str(shown)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refused("is not a regular file", shown, errno.EINVAL)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(f: IO[bytes], limit: int, shown: str | Path) -> bytes:
    """The whole of the regular file `f`, refused (OSError EFBIG) when it holds more than `limit` bytes."""
    size = os.fstat(f.fileno()).st_size
    if size > limit:
        raise _refused(f"is larger than {limit} bytes", shown, errno.EFBIG)
    # sized by the file, not the limit: a buffered read allocates what it is asked for; one byte more shows a file
    # that grew after the fstat
    data = f.read(size + 1)
    if len(data) > size:
        raise _refused("grew while it was read", shown, errno.EAGAIN)
    return data


def read_regular(name: str | Path, limit: int, dir_fd: int | None = None, *, shown: str | Path | None = None) -> bytes:
    """open_regular then read_bounded."""
    with open_regular(name, dir_fd, shown=shown) as f:
        return read_bounded(f, limit, name if shown is None else shown)


def open_private(path: str | Path, mode: str = "wb") -> IO:  # type: ignore[type-arg]
    """Open `path` for writing (truncated), mode 0600 even when the file already existed with wider bits. A symlink
    is refused (O_NOFOLLOW), and so is an existing file that is not a regular file of the caller's with one link
    (another user's, or a hard link to one): PermissionError, before anything is truncated."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused("is a symlink", path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise _refused("exists and is not a regular file of yours with a single link", path)
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise
