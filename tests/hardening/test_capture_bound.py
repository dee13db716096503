"""``capture -B`` is pinned kernel memory: bounded by what the machine has, refused with a message."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from labctl.cli.traffic import capture
from labctl.lab.live import TargetError

LABCTL = os.path.join(os.path.dirname(sys.executable), "labctl")


def test_a_ring_within_memory_is_page_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "_mem_available", lambda: 8 << 30)
    assert capture.ring_bytes(32768) == 32 << 20
    assert capture.ring_bytes(5) == 4096


def test_a_ring_beyond_a_quarter_of_available_memory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "_mem_available", lambda: 8 << 30)
    with pytest.raises(TargetError, match="at most 2097152 KiB"):
        capture.ring_bytes(2097153)


def test_capture_with_100_gb_exits_2_at_once() -> None:
    start = time.monotonic()
    result = subprocess.run(
        [LABCTL, "capture", "no-such-lab", "n", "-B", str(100 << 20)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "more than this machine can give a capture ring" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - start < 10
