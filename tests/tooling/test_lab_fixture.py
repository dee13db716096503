"""The pytest ``lab`` fixture and claim markers, as a user's test would use them (real kernel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root"),
    pytest.mark.lab("fixture_lab/tooling-fixture.yaml", name=f"tf{os.getpid()}"),
]

CLOSED = "IP(dst='10.9.0.2')/UDP(dport=5999)"


def test_exec_runs_inside_the_node(lab: Any) -> None:
    result = lab.exec("client", "ping", "-c1", "-W1", "10.9.0.2")
    assert "1 received" in result.stdout
    assert lab.name == f"tf{os.getpid()}"


@pytest.mark.claim("R7")
def test_inject_counters_and_capture_show_the_closed_port(lab: Any) -> None:
    before = lab.counters("server")
    with lab.capture("server:eth0", "udp port 5999") as capture:
        sent = lab.inject("client:eth0", CLOSED, count=2)
        capture.wait(timeout=1.0)
    after = lab.counters("server")
    assert sent.sent == 2
    assert after["Udp.NoPorts"] - before["Udp.NoPorts"] == 2
    assert after["eth0.rx_packets"] - before["eth0.rx_packets"] >= 2
    assert len(capture.frames) == 2


def test_send_and_trace_explain_the_drop(lab: Any) -> None:
    assert lab.send("client", "10.9.0.2:5999", b"hi").sent == 1
    result = lab.trace("client:eth0", CLOSED)
    ending = result.packets[0].ending
    assert (ending.fate, ending.reason, ending.node) == ("dropped", "NO_SOCKET", "server")


def test_a_check_of_the_file_runs_against_the_fixture(lab: Any) -> None:
    result = lab.check("closed-port")
    assert result.status == "pass", [r.as_dict() for r in result.evidence]


def test_claim_option_selects_tests_by_claim(tmp_path: Path) -> None:
    (tmp_path / "test_claims.py").write_text(
        "import pytest\n"
        "@pytest.mark.claim('R7')\n"
        "def test_r7(): pass\n"
        "@pytest.mark.claim('T1')\n"
        "def test_t1(): pass\n"
        "def test_none(): pass\n"
    )
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    picked = subprocess.run([*base, "--claim", "R7"], capture_output=True, text=True, timeout=60)
    assert "1 passed, 2 deselected" in picked.stdout, picked.stdout
    marked = subprocess.run([*base, "-m", "claim(id='T1')"], capture_output=True, text=True, timeout=60)
    assert "1 passed, 2 deselected" in marked.stdout, marked.stdout


def test_the_commands_work_on_the_fixture_lab_and_trace_draws_the_path(lab: Any, tmp_path: Path) -> None:
    out = tmp_path / "path.svg"
    result = subprocess.run(
        [sys.executable, "-m", "labctl.cli", "trace", lab.name, "client:eth0", CLOSED, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"wrote {out}" in result.stdout
    svg = out.read_text()
    assert "NO_SOCKET" in svg and "1: eth0 → eth0" in svg and "LOCAL_IN" in svg
