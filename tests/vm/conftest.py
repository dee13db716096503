"""Tests that boot the QEMU guest are marked ``vm``: they run from .ci/run (LABCTL_VM_TESTS=1), never in the
host suite by default -- the host suite must not depend on building the image."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots the QEMU guest (image built on first use); LABCTL_VM_TESTS=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("LABCTL_VM_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="boots a VM: run from .ci/run, or with LABCTL_VM_TESTS=1")
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(skip)
