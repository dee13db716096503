"""The verification engine: checks pass on evidence, and fail when the kernel disagrees."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from labctl.errors import LabFileError
from labctl.kernel import netns
from labctl.verify.runner import run_lab
from labctl.verify.scope import load_lab_file

REPO = Path(__file__).resolve().parents[2]

TWO_NODES = """\
topology:
  nodes:
    client:
      interfaces:
        eth0: {addresses: [10.0.7.1/24]}
    server:
      interfaces:
        eth0: {addresses: [10.0.7.2/24]}
  links:
    - endpoints: ["client:eth0", "server:eth0"]
"""


def write_lab(tmp_path: Path, name: str, checks: str, topology: str = TWO_NODES) -> str:
    file = tmp_path / f"{name}.yaml"
    file.write_text(f"name: {name}\n{topology}\nchecks:\n{checks}")
    return str(file)


def test_right_expectation_passes_wrong_one_fails(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: right
    traffic: [{inject: {node: client, packet: "IP(dst='10.0.7.2')/UDP(dport=5999)"}}]
    expect:
      dropped: {reason: NO_SOCKET, at: __udp4_lib_rcv, count: 1}
      counters: {server: {Udp.NoPorts: 1}}
  - name: wrong-reason
    traffic: [{inject: {node: client, packet: "IP(dst='10.0.7.2')/UDP(dport=5999)"}}]
    expect:
      dropped: {reason: SOCKET_RCVBUFF, count: 1}
  - name: wrong-count
    traffic: [{inject: {node: client, packet: "IP(dst='10.0.7.2')/UDP(dport=5999)"}}]
    expect:
      counters: {server: {Udp.NoPorts: 2}}
"""
    result = run_lab(write_lab(tmp_path, lab_name, checks))
    by_name = {c.name: c for c in result.checks}
    assert by_name["right"].passed
    assert not by_name["wrong-reason"].passed
    row = next(r for r in by_name["wrong-reason"].evidence if not r.ok)
    assert row.observed["drops"] == ["1× NO_SOCKET at __udp4_lib_rcv"]  # the report says what really happened
    assert not by_name["wrong-count"].passed
    assert [r.observed for r in by_name["wrong-count"].evidence] == [1]
    assert not result.passed
    assert netns.list_labctl(lab_name) == []


def test_blocked_traffic_fails_a_delivery_check(tmp_path: Path, lab_name: str) -> None:
    blocked = TWO_NODES.replace(
        "        eth0: {addresses: [10.0.7.2/24]}\n",
        '        eth0: {addresses: [10.0.7.2/24]}\n      iptables: ["-A INPUT -p udp --dport 5000 -j DROP"]\n',
    )
    checks = """\
  - name: should-arrive
    setup: {listen: [{node: server, port: 5000}]}
    traffic: [{udp: {node: client, to: "10.0.7.2:5000"}}]
    expect: {delivered: 1}
"""
    result = run_lab(write_lab(tmp_path, lab_name, checks, blocked))
    check = result.checks[0]
    assert not check.passed
    assert check.evidence[0].observed == 0
    # the failure shows where it died
    assert any("NETFILTER_DROP at nf_hook_slow" in line for line in check.explanation)


def test_a_check_without_expectations_cannot_pass(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: empty
    traffic: [{ping: {node: client, to: 10.0.7.2}}]
"""
    assert not run_lab(write_lab(tmp_path, lab_name, checks)).checks[0].passed


def test_unknown_drop_reason_and_key_are_errors_before_building(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: typo
    traffic: [{ping: {node: client, to: 10.0.7.2}}]
    expect:
      dropped: {reason: NO_SOKET}
      colour: red
"""
    file = write_lab(tmp_path, lab_name, checks)
    with pytest.raises(LabFileError) as info:
        load_lab_file(file)
    assert any(re.search(r":\d+: checks\[0\]\.expect\.colour: unknown key", str(p)) for p in info.value.problems)
    only_typo = write_lab(tmp_path, lab_name + "b", checks.replace("      colour: red\n", ""))
    with pytest.raises(LabFileError, match="no drop reason 'NO_SOKET'"):
        load_lab_file(only_typo)
    assert netns.list_labctl(lab_name) == []


def test_check_refers_to_unknown_node(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: ghost
    traffic: [{ping: {node: ghost, to: 10.0.7.2}}]
    expect: {reachable: true}
"""
    with pytest.raises(LabFileError, match=r"checks\[0\]\.traffic\[0\]: unknown node 'ghost'"):
        load_lab_file(write_lab(tmp_path, lab_name, checks))


def test_cli_run_exit_codes_json_and_junit(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: ok
    covers: [R7]
    traffic: [{inject: {node: client, packet: "IP(dst='10.0.7.2')/UDP(dport=5999)"}}]
    expect: {counters: {server: {Udp.NoPorts: 1}}}
  - name: not-ok
    traffic: [{inject: {node: client, packet: "IP(dst='10.0.7.2')/UDP(dport=5999)"}}]
    expect: {counters: {server: {Udp.NoPorts: 0}}}
"""
    file = write_lab(tmp_path, lab_name, checks)
    junit = tmp_path / "report.xml"
    cli = [sys.executable, "-m", "labctl.cli", "run", file, "--json", "--junit", str(junit)]
    proc = subprocess.run(cli, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert [c["passed"] for c in data["labs"][0]["checks"]] == [True, False]
    assert data["claims"]["proven"] == ["R7"]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1" and suite.get("tests") == "2"
    only_ok = subprocess.run([*cli[:5], "-k", "R7"], capture_output=True, text=True)
    assert only_ok.returncode == 0, only_ok.stdout + only_ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "labctl.cli", "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "missing.yaml" in bad.stdout + bad.stderr  # reported beside the other labs


def test_pytest_plugin_collects_lab_checks() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "labs" / "router.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout


def test_a_typo_in_a_counter_or_event_fails_instead_of_reading_zero(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: typos
    traffic: [{inject: {node: client, packet: "IP(dst='10.0.7.2')/UDP(dport=5999)"}}]
    expect:
      counters: {server: {Udp.NoPortz: 0}}
      events: {"net:netif_rx_typo": 0}
"""
    # caught before anything is built, each with its line and the names it may have meant
    with pytest.raises(LabFileError) as caught:
        load_lab_file(write_lab(tmp_path, lab_name, checks))
    text = str(caught.value)
    assert "no counter 'Udp.NoPortz'" in text and "did you mean Udp.NoPorts" in text
    assert "no tracepoint 'net:netif_rx_typo'" in text
    assert netns.list_labctl(lab_name) == []


def test_the_softirq_marks_are_refused_as_events_of_a_lab(tmp_path: Path, lab_name: str) -> None:
    """Every trace records the timer vectors' softirq entries and exits to tell a timer's work from the lab's;
    they are never a lab event, so counting them would read 0 whatever happened -- refused, with its line."""
    checks = """\
  - name: marks
    traffic: [{inject: {node: client, packet: "IP(dst='10.0.7.2')/UDP(dport=5999)"}}]
    expect:
      events: {"irq:softirq_entry": 1}
"""
    with pytest.raises(LabFileError, match=r"irq:softirq_entry.*never counted"):
        load_lab_file(write_lab(tmp_path, lab_name, checks))
    assert netns.list_labctl(lab_name) == []


def test_host_wide_sysctls_cannot_hide_in_a_node(tmp_path: Path, lab_name: str) -> None:
    topology = TWO_NODES.replace("    server:\n", "    server:\n      sysctls: {kernel.printk_ratelimit: 5}\n")
    with pytest.raises(LabFileError, match=r"kernel\.printk_ratelimit is not a network sysctl"):
        load_lab_file(write_lab(tmp_path, lab_name, "  []\n", topology))
    assert netns.list_labctl(lab_name) == []


def test_down_refuses_a_lab_name_that_is_a_path(tmp_path: Path) -> None:
    file = tmp_path / "evil.yaml"
    file.write_text("name: ../../../tmp/evil\ntopology: {nodes: {}}\n")
    proc = subprocess.run([sys.executable, "-m", "labctl.cli", "down", str(file)], capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a lab name" in proc.stderr
