"""One exit code per kind of error, whichever command meets it: an unknown lab or node is 2 everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.lab import build
from labctl.lab.labfile import load_lab

LABCTL = os.path.join(os.path.dirname(sys.executable), "labctl")

# every command that names a lab, with the rest of its arguments ({lab} and {node} filled in)
LAB_COMMANDS = [
    "down {lab}",
    "status {lab}",
    "exec {lab} {node} -- true",
    "inject {lab} {node} IP(dst='10.0.0.2')",
    "send {lab} {node} udp 10.0.0.2:5000",
    "listen {lab} {node} udp :5000 --timeout 0.1",
    "capture {lab} {node} -c 1 --timeout 0.1",
    "trace {lab} {node} IP(dst='10.0.0.2')",
    "trace {lab} --follow",
    "rules {lab}",
    "rules {lab} {node}",
    "hooks {lab} {node} IP(dst='10.0.0.2')",
]
NODE_COMMANDS = [c for c in LAB_COMMANDS if "{node}" in c]


def labctl(words: str, **fill: str) -> subprocess.CompletedProcess[str]:
    argv = [LABCTL, *(w.format(**fill) for w in words.split())]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def assert_bad_input(result: subprocess.CompletedProcess[str], *words: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    for word in words:
        assert word in output, output


def _command_id(command: str) -> str:
    words = command.split()
    return "-".join(w for w in words[:3] if not w.startswith("{"))


@pytest.mark.parametrize("command", LAB_COMMANDS, ids=_command_id)
def test_an_unknown_lab_is_exit_2_for_every_command(command: str, lab_name: str) -> None:
    assert_bad_input(labctl(command, lab=lab_name, node="n1"), lab_name, "not up")


def test_down_of_an_unknown_lab_still_removes_the_lock_a_killed_up_left(lab_name: str) -> None:
    from labctl.lab import state

    with state.locked(lab_name):
        os.link(os.path.join(state.LABS_DIR, f"{lab_name}.lock"), os.path.join(state.LABS_DIR, f"{lab_name}.keep"))
    lock = Path(state.LABS_DIR) / f"{lab_name}.lock"
    keep = Path(state.LABS_DIR) / f"{lab_name}.keep"
    os.replace(keep, lock)  # what a kill -9 between lock and state leaves
    assert_bad_input(labctl("down {lab}", lab=lab_name), "not up")
    assert not lock.exists()


@pytest.fixture(scope="module")
def up_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"t{os.getpid()}xc"
    file = tmp_path_factory.mktemp("exit") / f"{name}.yaml"
    file.write_text(
        f"name: {name}\ntopology:\n  nodes:\n    a: {{interfaces: {{eth0: {{addresses: [10.0.0.1/24]}}}}}}\n"
        "    b: {interfaces: {eth0: {addresses: [10.0.0.2/24]}}}\n"
        '  links:\n    - endpoints: ["a:eth0", "b:eth0"]\n'
    )
    topo, _ = load_lab(str(file))
    build.up(topo, str(file))
    try:
        yield name
    finally:
        build.down(name)


@pytest.mark.parametrize("command", NODE_COMMANDS, ids=lambda c: c.split()[0])
def test_an_unknown_node_is_exit_2_for_every_command(command: str, up_lab: str) -> None:
    assert_bad_input(labctl(command, lab=up_lab, node="nosuchnode"), "nosuchnode")


@pytest.mark.parametrize(
    "command",
    [
        "inject {lab} a IP(dst=os.system('x'))",
        "trace {lab} a NoSuchLayer()",
        "hooks {lab} a IP(dst='10.0.0.2')/Bogus()",
        "send {lab} a udp nowhere",
        "listen {lab} b udp :99999 --timeout 0.1",
        "capture {lab} b -f 'not a filter ((' -c 1 --timeout 0.1",
        "capture {lab} b -B 100000000000 -c 1",
    ],
    ids=lambda c: c.split()[0] + "-" + c.split()[3][:12],
)
def test_a_bad_argument_is_exit_2_and_says_what(command: str, up_lab: str) -> None:
    argv = [LABCTL, *(w.format(lab=up_lab) for w in _split(command))]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def _split(command: str) -> list[str]:
    import shlex

    return shlex.split(command)


def test_exec_of_a_missing_command_is_127_as_env_says(up_lab: str) -> None:
    result = labctl("exec {lab} a -- /no/such/command", lab=up_lab)
    assert result.returncode == 127 and "command not found" in result.stderr, result.stderr
    assert labctl("exec {lab} a -- /etc", lab=up_lab).returncode == 126


def test_a_missing_lab_file_is_exit_2_for_every_command(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    for words in ("up", "down", "status", "graph", "run", "validate"):
        assert_bad_input(labctl(f"{words} {{f}}", f=missing), "missing.yaml")


def test_a_known_lab_is_0(up_lab: str) -> None:
    assert labctl("status {lab}", lab=up_lab).returncode == 0
    assert labctl("rules {lab}", lab=up_lab).returncode == 0
    assert labctl("exec {lab} a -- true", lab=up_lab).returncode == 0
