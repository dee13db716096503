"""exec, tcp, listen proto tcp, features, and the tcp/socket/exec expectations: bad input is
``file:line: key.path: message`` before anything is built (issue #10)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.errors import LabFileError
from labctl.lab.labfile import load_lab

LABCTL = os.path.join(os.path.dirname(sys.executable), "labctl")
HEAD = """\
name: v
topology:
  nodes:
    a:
      interfaces: {eth0: {addresses: [10.0.0.1/24]}}
    b:
      interfaces: {eth0: {addresses: [10.0.0.2/24]}}
  links:
    - endpoints: ["a:eth0", "b:eth0"]
checks:
  - name: c
"""


def _path(dotted: str) -> str:
    """'checks.0.traffic.1.x' as problems print it: 'checks[0].traffic[1].x'."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", dotted)


def problems(tmp_path: Path, body: str) -> list[str]:
    file = tmp_path / "lab.yaml"
    file.write_text(HEAD + body)
    with pytest.raises(LabFileError) as info:
        load_lab(str(file))
    return [str(p).removeprefix(f"{file}:") for p in info.value.problems]


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        ("    traffic: [{exec: {node: a, cmd: ls}}]\n", "12: checks.0.traffic.0.exec.cmd", "valid list"),
        ("    traffic: [{exec: {node: a, cmd: [ls, 3]}}]\n", "12: checks.0.traffic.0.exec.cmd.1", "valid string"),
        ("    traffic: [{exec: {node: a, cmd: []}}]\n", "12: checks.0.traffic.0.exec.cmd", "argv is empty"),
        ("    traffic: [{exec: {node: a, cmd: [ls], shell: true}}]\n", "12: checks.0.traffic.0.exec.shell",
         "unknown key"),
        ("    traffic: [{exec: {node: z, cmd: [ls]}}]\n", "12: checks.0.traffic.0", "unknown node 'z'"),
        ("    traffic: [{exec: {node: a, cmd: [ls], timeout: 0}}]\n", "12: checks.0.traffic.0.exec.timeout",
         "greater than 0"),
        ("    traffic: [{exec: {node: a, cmd: [ls], stdout: '(('}}]\n", "12: checks.0.traffic.0.exec.stdout",
         "not a regular expression"),
        ("    setup: {exec: [{node: a, cmd: [ls], undo: [1]}]}\n", "12: checks.0.setup.exec.0.undo.0",
         "valid string"),
        ("    setup: {exec: [{node: q, cmd: [ls]}]}\n", "12: checks.0.setup.exec.0.node", "unknown node 'q'"),
        ("    traffic: [{tcp: {node: a, to: '10.0.0.2:70000'}}]\n", "12: checks.0.traffic.0.tcp",
         "port 1-65535"),
        ("    traffic: [{tcp: {node: a, to: 'host:80'}}]\n", "12: checks.0.traffic.0.tcp", "not an IP address"),
        ("    traffic: [{tcp: {node: a, to: '10.0.0.2:80', bytez: 1}}]\n", "12: checks.0.traffic.0.tcp.bytez",
         "unknown key"),
        ("    setup: {listen: [{node: b, port: 80, proto: sctp}]}\n", "12: checks.0.setup.listen.0.proto",
         "'udp' or 'tcp'"),
        ("    setup: {listen: [{node: b, port: 0, proto: tcp}]}\n", "12: checks.0.setup.listen.0.port",
         "greater than or equal to 1"),
        ("    setup: {features: {'b:eth9': {gro: true}}}\n", "12: checks.0.setup.features.b:eth9",
         "no interface 'eth9'"),
        ("    setup: {features: {'b': {gro: true}}}\n", "12: checks.0.setup.features", "keyed by 'node:iface'"),
        ("    setup: {features: {'b:eth0': {'GRO ON': true}}}\n", "12: checks.0.setup.features",
         "not an ethtool feature name"),
        ("    setup: {features: {'b:eth0': {rx-gro-lists: true}}}\n", "12: checks.0.setup.features.b:eth0.rx-gro-lists",
         "did you mean rx-gro-list"),
    ],
)
def test_bad_steps(tmp_path: Path, body: str, where: str, message: str) -> None:
    found = problems(tmp_path, body)
    assert any(p.startswith(_path(where)) and message in p for p in found), found


TCP = "    traffic: [{tcp: {node: a, to: '10.0.0.2:80'}}]\n"
LISTEN = "    setup: {listen: [{node: b, port: 80, proto: tcp}, {node: b, port: 53}]}\n"


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        ("    traffic: [{ping: {node: a, to: 10.0.0.2}}]\n    expect: {tcp: {refused: 1}}\n",
         "checks.0.expect.tcp", "needs a tcp traffic step"),
        (TCP + "    expect: {tcp: {errno: ECONREFUSED}}\n", "checks.0.expect.tcp.errno", "not an errno name"),
        (TCP + "    expect: {tcp: {refuse: 1}}\n", "checks.0.expect.tcp.refuse", "unknown key"),
        (TCP + "    expect: {tcp: {}}\n", "checks.0.expect.tcp", "states nothing"),
        (TCP + "    expect: {tcp: {states: {ESTABLISH: 1}}}\n", "checks.0.expect.tcp.states.ESTABLISH",
         "not a TCP state"),
        (TCP + LISTEN + "    expect: {socket: {'b:81': {received: 1}}}\n", "checks.0.expect.socket.b:81",
         "no listener 'b:81'"),
        (TCP + LISTEN + "    expect: {socket: {'b:53': {state: LISTEN}}}\n", "checks.0.expect.socket.b:53.state",
         "for a tcp listener"),
        (TCP + LISTEN + "    expect: {socket: {'b:80': {state: LISTENING}}}\n",
         "checks.0.expect.socket.b:80.state", "not a TCP state"),
        (TCP + LISTEN + "    expect: {socket: {'b:80': {accept_queue: '>=x'}}}\n",
         "checks.0.expect.socket.b:80.accept_queue", ""),
        (TCP + "    expect: {exec: {'traffic[0]': {exit: 0}}}\n", "checks.0.expect.exec.traffic[0]",
         "no exec step"),
        ("    traffic: [{exec: {node: a, cmd: [ls], exit: 1}}]\n    expect: {exec: {'traffic[0]': {exit: 0}}}\n",
         "checks.0", "disagrees with what the step states"),
    ],
)
def test_bad_expectations(tmp_path: Path, body: str, where: str, message: str) -> None:
    found = problems(tmp_path, body)
    assert any(_path(where) in p and message in p for p in found), found


def test_good_steps_load_and_exec_outcomes_become_the_exec_expectation(tmp_path: Path) -> None:
    file = tmp_path / "lab.yaml"
    file.write_text(HEAD + """\
    setup:
      listen: [{node: b, port: 80, proto: tcp, backlog: 2, accept: false}]
      features: {"b:eth0": {gro: true, rx-gro-list: true}}
      exec: [{node: b, cmd: [ip, link], undo: [ip, link]}]
    traffic:
      - exec: {node: a, cmd: [ip, -br, link], exit: 0, stdout: "eth0"}
      - tcp: {node: a, to: "10.0.0.2:80", bytes: 10, count: 2}
    expect:
      tcp: {connected: 2}
      socket: {"b:80": {accept_queue: 2, state: LISTEN}}
""")
    lab, _ = load_lab(str(file))
    check = lab.checks[0]
    assert check.expect.exec["traffic[0]"].exit == 0
    assert check.expect.exec["traffic[0]"].stdout == "eth0"
    assert check.setup.exec[0].exit == 0  # a setup step must succeed unless it says otherwise


def test_cli_exit_2_and_nothing_built(tmp_path: Path) -> None:
    file = tmp_path / "lab.yaml"
    file.write_text(HEAD + "    traffic: [{exec: {node: a, cmd: [ls, 3]}}]\n")
    done = subprocess.run([LABCTL, "up", str(file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "lab.yaml:12: checks[0].traffic[0].exec.cmd[1]" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_hook_trace_singles_out_the_tcp_step(tmp_path: Path) -> None:
    from labctl.verify.stage import trace_match

    file = tmp_path / "lab.yaml"
    file.write_text(HEAD + "    traffic: [{exec: {node: a, cmd: [ip, link]}}, {tcp: {node: a, to: '10.0.0.2:8080'}}]\n")
    lab, _ = load_lab(str(file))
    assert trace_match(lab.checks[0]) == "-p tcp --dport 8080"
