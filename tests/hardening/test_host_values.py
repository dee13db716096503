"""A second, idempotent ``up`` must not write a host-wide sysctl back and forth."""

from __future__ import annotations

import pytest

from labctl.kernel import sysctl
from tests.conftest import LabFactory

KEY = "net.core.netdev_max_backlog"


def test_a_second_up_writes_no_host_value(make_lab: LabFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the lab asks for the value the host has now, so the host never really changes in this test
    current = sysctl.read(KEY)
    body = f"sysctls: {{{KEY}: {current}}}\ntopology:\n  nodes:\n    a: {{}}\n"
    make_lab(body)
    writes: list[tuple[str, str]] = []
    real = sysctl._write_here

    def spy(key: str, value: str) -> None:
        if key == KEY:
            writes.append((key, value))
        real(key, value)

    monkeypatch.setattr(sysctl, "_write_here", spy)
    make_lab(body)  # the idempotent second up
    assert writes == []
    assert sysctl.read(KEY) == current
