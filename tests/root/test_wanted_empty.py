"""An empty `wanted` is refused before the program is touched: it is not None ("every connection"), so a caller's
filter that kept no fd does not end the program with all its connections (before, migrate(pid, wanted=[]) moved
them all and killed it)."""

from __future__ import annotations

import pytest

import sockrepair
from sockrepair.move.dump import dump
from tests.root.streams import echo_clients, echo_round


@pytest.mark.parametrize("mover", ["migrate", "dump"])
def test_an_empty_wanted_is_refused(netns, tmp_path, mover):
    with echo_clients(3, 5000) as (server, clients, offsets, _):
        with pytest.raises(sockrepair.ProcessError, match=r"no fd of process \d+ asked for \(wanted=\[\]") as err:
            if mover == "migrate":
                sockrepair.migrate(server.pid, wanted=[], journal=tmp_path / "j")
            else:
                dump(server.pid, tmp_path / "j", wanted=[])
        assert err.value.pid == server.pid
        assert server.poll() is None
        echo_round(clients, offsets, 20_000)
        assert sockrepair.list_locks() == []
