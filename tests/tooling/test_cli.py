"""validate, generate, --version and completion through the CLI (no lab is built here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import labctl
from labctl.cli import app, tooling
from labctl.lab import state

runner = CliRunner()
GOLDEN = Path(__file__).parent / "golden"
BROKEN = """\
name: broken
topology:
  nodes:
    a:
      interfaces:
        eth0: {addresses: [10.0.0.1/24]}
      routes:
        - {dst: default, via: 10.9.9.9}
    b: {}
  links:
    - endpoints: ["a:eth0", "c:eth0"]
"""
BAD_VALUE = "topology:\n  nodes:\n    a: {interfaces: {eth0: {mtu: 5}}}\n"


def invoke(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), input=stdin)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_version() -> None:
    code, out = invoke("--version")
    assert (code, out) == (0, f"labctl {labctl.__version__}\n")


def test_validate_ok_file(tmp_path: Path) -> None:
    code, out = invoke("validate", str(GOLDEN / "linear-3.yaml"))
    assert code == 0
    assert "linear-3.yaml: ok (lab linear-3: 5 nodes, 4 links, 1 checks)" in out


def test_validate_prints_every_problem_as_file_line_key(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(BROKEN)
    code, out = invoke("validate", str(bad))
    assert code == 2
    assert f"{bad}:11: topology.links[0].endpoints[1]: unknown node 'c' (nodes: a, b)" in out.splitlines()


def test_validate_exit_2_when_any_file_is_bad_and_reports_the_good_ones(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_VALUE)
    code, out = invoke("validate", str(GOLDEN / "star-3.yaml"), str(bad), str(tmp_path / "missing.yaml"))
    assert code == 2
    assert "star-3.yaml: ok" in out
    assert f"{bad}:3: topology.nodes.a.interfaces.eth0.mtu: " in out
    assert f"{tmp_path / 'missing.yaml'}: (top level): cannot read: No such file or directory" in out


def test_validate_reads_standard_input() -> None:
    code, out = invoke("validate", "-", stdin=BAD_VALUE)
    assert code == 2
    assert out.startswith("<stdin>:3: topology.nodes.a.interfaces.eth0.mtu: ")
    code, out = invoke("validate", "-", stdin=(GOLDEN / "tree-2-2.yaml").read_text())
    assert (code, out.strip()) == (0, "<stdin>: ok (lab tree-2-2: 7 nodes, 6 links, 1 checks)")


def test_validate_json(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(BROKEN)
    code, out = invoke("validate", "--json", str(GOLDEN / "star-3.yaml"), str(bad))
    assert code == 2
    good, broken = json.loads(out)
    assert good == {"file": str(GOLDEN / "star-3.yaml"), "ok": True, "lab": "star-3", "problems": [],
                    "nodes": 4, "links": 3, "checks": 1}
    assert broken["ok"] is False and broken["lab"] is None
    assert {"file": str(bad), "line": 11, "key": "topology.links[0].endpoints[1]",
            "message": "unknown node 'c' (nodes: a, b)"} in broken["problems"]


def test_validate_a_folder_means_its_lab_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text((GOLDEN / "star-3.yaml").read_text())
    (tmp_path / "b.yml").write_text(BAD_VALUE)
    (tmp_path / "notes.txt").write_text("not a lab")
    code, out = invoke("validate", "--json", str(tmp_path))
    assert code == 2
    assert [(Path(r["file"]).name, r["ok"]) for r in json.loads(out)] == [("a.yaml", True), ("b.yml", False)]


def test_generate_to_stdout_matches_golden() -> None:
    code, out = invoke("generate", "clos", "--spines", "2", "--leaves", "2", "--hosts-per-leaf", "2",
                       "--name", "clos-2-2-2")
    assert code == 0
    assert out == (GOLDEN / "clos-2-2-2.yaml").read_text()


def test_generate_file_is_named_after_it_and_validates(tmp_path: Path) -> None:
    out_file = tmp_path / "my-star.yaml"
    code, out = invoke("generate", "star", "--hosts", "10", "-o", str(out_file))
    assert code == 0, out
    assert "name: my-star\n" in out_file.read_text()
    assert invoke("validate", str(out_file))[0] == 0


def test_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out_file = tmp_path / "t.yaml"
    out_file.write_text("mine")
    code, out = invoke("generate", "linear", "-o", str(out_file))
    assert code == 2 and "use --force" in out and out_file.read_text() == "mine"
    assert invoke("generate", "linear", "-o", str(out_file), "--force")[0] == 0
    assert "r3:" in out_file.read_text()


@pytest.mark.parametrize(
    "args",
    [["star", "--hosts", "0"], ["tree", "--depth", "9", "--fanout", "9"], ["linear", "--name", "a b"]],
)
def test_generate_bad_input_is_exit_2_without_traceback(args: list[str]) -> None:
    code, out = invoke("generate", *args)
    assert code == 2 and "error:" in out and "Traceback" not in out


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete -o default -F"), ("zsh", "#compdef labctl"),
                                               ("fish", "complete --command labctl")])
def test_completion_prints_the_script(shell: str, marker: str) -> None:
    code, out = invoke("completion", shell)
    assert code == 0 and marker in out and "_LABCTL_COMPLETE" in out


def test_completion_refuses_other_shells() -> None:
    assert invoke("completion", "tcsh")[0] == 2


@pytest.fixture
def fake_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two labs' state files in a private folder, one of them with its lab file."""
    monkeypatch.setattr(state, "LABS_DIR", str(tmp_path))
    lab_file = tmp_path / "tgfake.yaml"
    lab_file.write_text((GOLDEN / "linear-3.yaml").read_text())
    nodes = {n: f"labctl-tgfake.{n}" for n in ("h1", "r1", "r2", "r3", "h2")}
    (tmp_path / "tgfake.json").write_text(json.dumps({"name": "tgfake", "file": str(lab_file), "status": "up",
                                                      "nodes": nodes}))
    (tmp_path / "tgother.json").write_text(json.dumps({"name": "tgother", "file": "/nonexistent.yaml",
                                                       "status": "up", "nodes": {"x": "labctl-tgother.x"}}))
    return tmp_path


def test_lab_and_node_candidates_come_from_state(fake_state: Path) -> None:
    assert tooling.lab_names("tg") == ["tgfake", "tgother"]
    assert tooling.lab_names("tgf") == ["tgfake"]
    assert tooling.node_names("tgfake", "r") == ["r1", "r2", "r3"]
    assert tooling.node_names("tgfake", "r2:") == ["r2:eth0", "r2:eth1"]
    assert tooling.node_names("tgother", "x:") == []  # its file is gone: no interfaces, no error
    assert tooling.node_names("nosuchlab", "") == []
    assert tooling.node_names("../etc", "") == []


@pytest.mark.parametrize(
    ("shell", "env"),
    [
        ("bash", {"COMP_WORDS": "labctl exec tgfake r", "COMP_CWORD": "3"}),
        ("zsh", {"_TYPER_COMPLETE_ARGS": "labctl exec tgfake r"}),
        ("fish", {"_TYPER_COMPLETE_ARGS": "labctl exec tgfake r", "_TYPER_COMPLETE_FISH_ACTION": "get-args"}),
    ],
)
def test_shells_get_node_names_through_typer_completion(
    fake_state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], shell: str,
    env: dict[str, str],
) -> None:
    monkeypatch.setenv(tooling.COMPLETE_VAR, f"complete_{shell}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        tooling.complete(app)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for node in ("r1", "r2", "r3"):
        assert node in out
    assert "h1" not in out


def test_completion_of_lab_names_for_any_lab_parameter(
    fake_state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for words in ("labctl down tgf", "labctl trace tgf", "labctl rules tgf", "labctl clean --lab tgf"):
        monkeypatch.setenv(tooling.COMPLETE_VAR, "complete_bash")
        monkeypatch.setenv("COMP_WORDS", words)
        monkeypatch.setenv("COMP_CWORD", str(len(words.split()) - 1))
        with pytest.raises(SystemExit):
            tooling.complete(app)
        assert capsys.readouterr().out.split() == ["tgfake"], words


def test_help_does_not_import_heavy_modules() -> None:
    """labctl --help must stay quick: the tooling commands import their work inside the command."""
    code = (
        "import sys, labctl.cli.app; "
        "print(sorted(m for m in ('pyroute2', 'iptc', 'scapy', 'labctl.topology.generate', 'labctl.lab.labfile')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ)).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [("labctl capture tgfake r2 :", 4, ["eth0", "eth1"]), ("labctl capture tgfake r2 : eth1", 5, ["eth1"])],
)
def test_bash_split_node_colon_interface_still_completes(
    fake_state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], words: str, cword: int,
    expected: list[str],
) -> None:
    """bash splits r2:eth at ':' (COMP_WORDBREAKS) and replaces only the part after it."""
    monkeypatch.setenv(tooling.COMPLETE_VAR, "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(cword))
    with pytest.raises(SystemExit):
        tooling.complete(app)
    assert capsys.readouterr().out.split() == expected
