"""Progress: a Rich bar on a terminal for ``up`` and ``run``, nothing extra when piped (real kernel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.lab import build
from labctl.lab.labfile import load_lab
from labctl.topology import generate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")
LABCTL = f"{sys.executable} -m labctl.cli"


def _lab_file(tmp_path: Path, name: str) -> Path:
    file = tmp_path / f"{name}.yaml"
    file.write_text(generate.to_yaml(generate.star(20, name=name), "test"))
    return file


def test_up_tells_its_callback_each_step(tmp_path: Path) -> None:
    name = f"tp{os.getpid()}c"
    topo, _ = load_lab(str(_lab_file(tmp_path, name)))
    told: list[tuple[str, int, int]] = []
    try:
        build.up(topo, str(tmp_path / f"{name}.yaml"), progress=lambda *step: told.append(step))
    finally:
        build.down(name)
    assert [s[0] for s in told][:3] == ["namespaces", "bridges", "links"]
    assert [s[1] for s in told] == list(range(len(told))) and all(s[2] == build.BUILD_STEPS for s in told)


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script(1) for a terminal")
def test_a_terminal_gets_a_bar_and_a_pipe_gets_only_the_result(tmp_path: Path) -> None:
    name = f"tp{os.getpid()}t"
    file = _lab_file(tmp_path, name)
    log = tmp_path / "tty.log"
    try:
        subprocess.run(["script", "-qec", f"{LABCTL} up {file}", str(log)], capture_output=True, timeout=120)
        shown = log.read_text(errors="replace")
        assert f"up {name}" in shown and "━" in shown  # the bar (a 20-host up may end before a step is drawn)
        piped = subprocess.run([*LABCTL.split(), "up", str(file)], capture_output=True, text=True, timeout=120)
        assert piped.returncode == 0
        assert "━" not in piped.stdout + piped.stderr and piped.stderr == ""
        assert piped.stdout.strip() == f"lab {name} is up: 21 nodes, 20 links"
    finally:
        subprocess.run([*LABCTL.split(), "down", name], capture_output=True, timeout=120)
