"""Unit tests run anywhere; tests under tests/root need root and run inside a network namespace they create."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (CAP_NET_ADMIN, network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
