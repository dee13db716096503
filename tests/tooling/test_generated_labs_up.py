"""Generated labs on the real kernel: ``generate`` -> ``up`` -> ping end to end -> completion from state -> ``down``.

Each lab is named ``tg<pid>...`` so it cannot collide with another engineer's
or test run's labs, and is always brought down.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")

LABCTL = [sys.executable, "-m", "labctl.cli"]
SHAPES = {
    "star": (["star", "--hosts", "3"], "h1", "10.0.0.3"),
    "linear": (["linear", "--routers", "3"], "h1", "10.0.4.2"),
    "tree": (["tree", "--depth", "2", "--fanout", "2"], "h1", "10.0.0.4"),
    "clos": (["clos", "--spines", "2", "--leaves", "2", "--hosts-per-leaf", "2"], "h1-1", "10.0.2.3"),
}


def labctl(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABCTL, *args], capture_output=True, text=True, timeout=120, env=env, check=check)


@pytest.fixture
def generated(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """(lab name, node that pings, address it pings): the lab is up, and comes down afterwards."""
    shape = request.param
    args, node, address = SHAPES[shape]
    name = f"tg{os.getpid()}{shape[:2]}"
    file = tmp_path / f"{name}.yaml"
    labctl("generate", *args, "-o", str(file))
    try:
        labctl("up", str(file))
        yield name, node, address
    finally:
        labctl("down", name, check=False)


@pytest.mark.parametrize("generated", sorted(SHAPES), indirect=True)
def test_generated_lab_comes_up_and_ends_reach_each_other(generated: tuple[str, str, str]) -> None:
    name, node, address = generated
    result = labctl("exec", name, node, "--", "ping", "-c1", "-W1", address, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 received" in result.stdout


def _complete(words: str) -> list[str]:
    """What bash completion offers for the command line ``words`` (the cursor after the last word)."""
    cword = str(len(words.split(" ")) - 1)
    env = dict(os.environ, _LABCTL_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=cword)
    return labctl(env=env).stdout.split()


@pytest.mark.parametrize("generated", ["linear"], indirect=True)
def test_completion_offers_lab_and_node_names_from_state(generated: tuple[str, str, str]) -> None:
    name, _, _ = generated
    assert name in _complete(f"labctl down {name[:-2]}")
    assert name in _complete(f"labctl clean --lab {name[:-2]}")
    assert _complete(f"labctl exec {name} r") == ["r1", "r2", "r3"]
    assert _complete(f"labctl capture {name} r2:") == ["r2:eth0", "r2:eth1"]
    assert sorted(_complete(f"labctl send {name} ")) == ["h1", "h2", "r1", "r2", "r3"]
    assert _complete("labctl exec no-such-lab ") == []


@pytest.mark.parametrize("generated", ["linear"], indirect=True)
def test_bash_itself_completes_with_the_printed_script(generated: tuple[str, str, str], tmp_path: Path) -> None:
    """The script from ``labctl completion bash``, run by bash with the words split as bash splits them."""
    name, _, _ = generated
    (tmp_path / "labctl").write_text(f"#!/bin/sh\nexec {sys.executable} -m labctl.cli \"$@\"\n")
    (tmp_path / "labctl").chmod(0o755)
    script = labctl("completion", "bash").stdout
    probe = f"""{script}
reply() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); _labctl_completion labctl; echo "${{COMPREPLY[*]}}"; }}
reply labctl exec {name} r
reply labctl capture {name} r2 :
reply labctl capture {name} r2 : eth1
"""
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=60).stdout
    assert out.splitlines() == ["r1 r2 r3", "eth0 eth1", "eth1"]
