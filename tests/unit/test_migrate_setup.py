"""migrate() before the freeze: what it opened (the lockers' netlink sockets, the keeper's recorders, which hold the
lock's nfnetlink_log group bound) is closed when a later step of its set-up fails."""

from __future__ import annotations

import contextlib

import pytest

from sockrepair.move import migrate as migrate_module


class _Opened:
    def __init__(self, name: str, closed: list[str]) -> None:
        self.name, self._closed = name, closed

    def close(self) -> None:
        self._closed.append(self.name)


@pytest.mark.parametrize("same", [False, True])
def test_a_journal_directory_that_cannot_be_made_closes_the_lockers_and_the_keeper(
        monkeypatch: pytest.MonkeyPatch, same: bool) -> None:
    closed: list[str] = []

    def no_directory(pid: int) -> None:
        raise OSError("cannot create a journal directory under /run/sockrepair or /tmp")

    monkeypatch.setattr(migrate_module, "process_locker", lambda pid: _Opened("source locker", closed))
    monkeypatch.setattr(migrate_module, "named", lambda netns: contextlib.nullcontext())
    monkeypatch.setattr(migrate_module, "_same_namespace", lambda a, b: same)
    monkeypatch.setattr(migrate_module, "Locker", lambda: _Opened("destination locker", closed))
    monkeypatch.setattr(migrate_module, "Keeper", lambda paths, caps: _Opened("keeper", closed))
    monkeypatch.setattr(migrate_module, "new_directory", no_directory)
    with pytest.raises(OSError, match="journal directory"):
        migrate_module.migrate(12345, dest_netns="dest", keep=True)
    # once each: the same namespace shares one locker
    assert closed == (["keeper", "source locker"] if same else ["keeper", "destination locker", "source locker"])


@pytest.mark.parametrize("keep", [{"total_bytes": 1}, "x", 1.5, None, 0])
def test_a_keep_that_is_neither_a_bool_nor_caps_is_refused_before_anything_opens(
        monkeypatch: pytest.MonkeyPatch, keep: object) -> None:
    opened: list[int] = []
    monkeypatch.setattr(migrate_module, "process_locker", lambda pid: opened.append(pid))
    with pytest.raises(TypeError, match="keep must be True, False or a sockrepair.KeepCaps, not "):
        migrate_module.migrate(12345, keep=keep)  # type: ignore[arg-type]
    assert opened == []
