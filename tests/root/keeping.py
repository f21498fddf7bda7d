"""A request the peer sends after the kept packets were delivered and before the unlock: the moment both keeping
tests (migrate() and `sockrepair criu restore`) need, made by patching the keeper and the unlock."""

from __future__ import annotations

import socket
from types import ModuleType

import pytest

from sockrepair.lock import Locker
from sockrepair.move.keep import Keeper
from sockrepair.state import ConnTuple
from tests.root.pairs import wait_for


def request_before_the_unlock(monkeypatch: pytest.MonkeyPatch, made_in: ModuleType, client: socket.socket,
                              request: bytes) -> list[ConnTuple]:
    """Watch the keepers `made_in` makes (the module that calls Keeper), and at the first Locker.unlock after one
    exists (the delivery is over, the connections still locked) send `request` from `client` and wait until the
    keeper holds it. Returns the list that receives the tuples of that unlock: empty if none came."""
    keepers: list[Keeper] = []

    class Watched(Keeper):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            keepers.append(self)

    real_unlock = Locker.unlock
    sent: list[ConnTuple] = []

    def unlock_after_a_request(self: Locker, items: list[ConnTuple], *args: object, **kwargs: object) -> object:
        if keepers and items and not sent:
            sent[:] = items
            client.sendall(request)
            wait_for(lambda: keepers[0].pending(items) == 1, "the request to reach the lock", 5.0)
        return real_unlock(self, items, *args, **kwargs)

    monkeypatch.setattr(made_in, "Keeper", Watched)
    monkeypatch.setattr(Locker, "unlock", unlock_after_a_request)
    return sent
