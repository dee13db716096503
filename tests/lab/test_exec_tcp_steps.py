"""exec and tcp steps, tcp listeners and per-check features on the real kernel (issue #10).

A step that cannot do what it says makes the check ERROR (never PASS); setup exec steps and features are
undone after the check; TCP outcomes are what the kernel made of each connect.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from labctl.kernel import netns
from labctl.kernel.offloads import swap_features
from labctl.verify.runner import run_lab

TWO_NODES = """\
topology:
  nodes:
    client:
      interfaces:
        eth0: {addresses: [10.0.77.1/24]}
    server:
      interfaces:
        eth0: {addresses: [10.0.77.2/24]}
  links:
    - endpoints: ["client:eth0", "server:eth0"]
"""


def _lab(tmp_path: Path, name: str, checks: str) -> str:
    file = tmp_path / f"{name}.yaml"
    file.write_text(f"name: {name}\n{TWO_NODES}\nchecks:\n{checks}")
    return str(file)


def test_exec_steps_error_pass_fail_and_undo(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: not-found
    traffic: [{exec: {node: client, cmd: [no-such-program-labctl], exit: 0}}]
  - name: times-out
    traffic: [{exec: {node: client, cmd: [sleep, "5"], timeout: 0.3}}]
    expect: {counters: {client: {Udp.OutDatagrams: 0}}}
  - name: sees-its-node
    traffic: [{exec: {node: server, cmd: [ls, /sys/class/net], exit: 0, stdout: "^eth0$"}}]
  - name: wrong-exit
    traffic: [{exec: {node: server, cmd: ["false"], exit: 0}}]
  - name: setup-fails-no-traffic
    setup:
      exec: [{node: server, cmd: ["false"]}]
    traffic: [{ping: {node: client, to: 10.0.77.2}}]
    expect: {reachable: true}
  - name: setup-undone
    setup:
      exec:
        - {node: server, cmd: [ip, link, set, eth0, mtu, "1400"], undo: [ip, link, set, eth0, mtu, "1500"]}
    traffic: [{exec: {node: server, cmd: [ip, link, show, eth0], stdout: "mtu 1400"}}]
"""
    result = run_lab(_lab(tmp_path, lab_name, checks), keep=True)
    try:
        by = {c.name: c for c in result.checks}
        assert by["not-found"].status == "error" and "no-such-program-labctl" in (by["not-found"].error or "")
        assert by["times-out"].status == "error" and "timed out" in (by["times-out"].error or "")
        assert by["sees-its-node"].status == "pass", by["sees-its-node"].evidence
        assert by["wrong-exit"].status == "fail"
        failed = by["setup-fails-no-traffic"]
        assert failed.status == "error" and "did not do what it said" in (failed.error or "")
        assert failed.observation["sends"] == []  # no traffic on a stage that is not in place
        undone = by["setup-undone"]
        assert undone.status == "pass", undone.evidence
        labels = [x["label"] for x in undone.observation["execs"]]
        assert labels == ["setup.exec[0]", "traffic[0]", "undo setup.exec[0]"]
        shown = netns.run(netns.namespace_name(lab_name, "server"), ["ip", "link", "show", "eth0"],
                          capture_output=True, text=True, check=True)
        assert "mtu 1500" in shown.stdout
    finally:
        subprocess.run([".venv/bin/labctl", "down", lab_name], check=False, capture_output=True)


def test_tcp_outcomes_and_features_are_undone(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: refused
    traffic: [{tcp: {node: client, to: "10.0.77.2:9"}}]
    expect:
      tcp: {refused: 1, errno: ECONNREFUSED}
      dropped: {reason: NO_SOCKET, at: tcp_v4_rcv, count: 1}
  - name: transfer
    setup:
      listen: [{node: server, port: 8080, proto: tcp}]
      features: {"server:eth0": {gro: true, rx-gro-list: true, rx-udp-gro-forwarding: true, tso: false}}
    traffic:
      - exec: {node: server, cmd: [ethtool, -k, eth0], stdout: "rx-gro-list: on", exit: 0}
      - tcp: {node: client, to: "10.0.77.2:8080", bytes: 100000}
    expect:
      tcp: {connected: 1, sent_bytes: 100000}
      socket: {"server:8080": {received: 1, bytes: 100000, state: LISTEN}}
  - name: wrong-count-fails
    setup:
      listen: [{node: server, port: 8080, proto: tcp, accept: false}]
    traffic: [{tcp: {node: client, to: "10.0.77.2:8080"}}]
    expect:
      socket: {"server:8080": {accept_queue: 2}}
  - name: fixed-feature-errors
    setup:
      features: {"server:eth0": {lro: true}}
    traffic: [{tcp: {node: client, to: "10.0.77.2:9"}}]
    expect: {tcp: {refused: 1}}
"""
    ns = netns.namespace_name(lab_name, "server")
    result = run_lab(_lab(tmp_path, lab_name, checks), keep=True)
    try:
        by = {c.name: c for c in result.checks}
        assert by["refused"].status == "pass", by["refused"].evidence
        assert by["transfer"].status == "pass", by["transfer"].evidence
        assert by["wrong-count-fails"].status == "fail"
        row = next(r for r in by["wrong-count-fails"].evidence if not r.ok)
        assert row.observed == 1
        fixed = by["fixed-feature-errors"]  # veth's large-receive-offload is "off [fixed]"
        assert fixed.status == "error" and "did not change rx-lro" in (fixed.error or ""), fixed.error
        assert fixed.observation["sends"] == []
        # the features were put back: swapping in the defaults again reports them as they were
        defaults = {"rx-gro": False, "rx-gro-list": False, "rx-udp-gro-forwarding": False, "tx-tcp-segmentation": True}
        assert swap_features(ns, "eth0", defaults) == defaults
    finally:
        subprocess.run([".venv/bin/labctl", "down", lab_name], check=False, capture_output=True)


def test_tcp_over_ipv6(tmp_path: Path, lab_name: str) -> None:
    file = tmp_path / f"{lab_name}.yaml"
    file.write_text(f"""\
name: {lab_name}
topology:
  nodes:
    server: {{ipv6: true}}
checks:
  - name: v6-loopback
    setup:
      listen: [{{node: server, port: 80, proto: tcp, address: "::"}}]
    traffic:
      - tcp: {{node: server, to: "[::1]:80", bytes: 1000}}
      - tcp: {{node: server, to: "[::1]:81"}}
    expect:
      tcp: {{connected: 1, refused: 1}}
      socket: {{"server:80": {{received: 1, bytes: 1000}}}}
      dropped: {{reason: NO_SOCKET, at: tcp_v6_rcv, count: 1}}
""")
    result = run_lab(str(file))
    assert result.checks[0].status == "pass", result.checks[0].evidence


def test_tcp_connect_that_cannot_leave_is_an_error_unless_stated(tmp_path: Path, lab_name: str) -> None:
    checks = """\
  - name: unstated
    traffic: [{tcp: {node: client, to: "10.9.9.9:80"}}]
    expect: {socket: {"server:80": {received: 0}}}
    setup: {listen: [{node: server, port: 80, proto: tcp}]}
  - name: stated
    traffic: [{tcp: {node: client, to: "10.9.9.9:80"}}]
    expect: {tcp: {connected: 0, errno: ENETUNREACH}}
"""
    result = run_lab(_lab(tmp_path, lab_name, checks))
    by = {c.name: c for c in result.checks}
    assert by["unstated"].status == "error" and "ENETUNREACH" in (by["unstated"].error or "")
    assert by["stated"].status == "pass", by["stated"].evidence


def test_packets_of_an_exec_steps_children_are_the_labs(tmp_path: Path, lab_name: str) -> None:
    """The ping a shell starts is followed: its echo request's drop is attributed to the lab."""
    checks = """\
  - name: shell-ping
    setup:
      iptables: {server: ["-A INPUT -p icmp -j DROP"]}
    traffic:
      - exec: {node: client, cmd: [sh, -c, "sleep 0.1; ping -n -c1 -W1 10.0.77.2; exit 0"], exit: 0}
    expect:
      dropped: {reason: NETFILTER_DROP, at: nf_hook_slow, count: 1}
      counters: {client: {Icmp.OutEchos: 1}}
"""
    result = run_lab(_lab(tmp_path, lab_name, checks))
    assert result.checks[0].status == "pass", result.checks[0].evidence


def test_socket_per_udp_listener(tmp_path: Path, lab_name: str) -> None:
    """Two UDP listeners judged apart: one reads, one never reads and overflows (its own drops)."""
    checks = """\
  - name: two-listeners
    setup:
      listen:
        - {node: server, port: 5000}
        - {node: server, port: 5001, rcvbuf: 1, read: false}
    traffic:
      - udp: {node: client, to: "10.0.77.2:5000", payload: hello, count: 2}
      - udp: {node: client, to: "10.0.77.2:5001", size: 1000, count: 20}
    expect:
      socket:
        "server:5000": {received: 2, bytes: 10, drops: 0, queued_bytes: 0}
        "server:5001": {received: 0, queued_bytes: ">=1", drops: ">=1"}
      delivered: 2
"""
    result = run_lab(_lab(tmp_path, lab_name, checks))
    assert result.checks[0].status == "pass", result.checks[0].evidence
