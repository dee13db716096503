"""A corpus of malformed lab files: every one is bad input (exit 2), named by file:line, nothing built.

Each file's first line says what its problem is (``# expect: TEXT``).  All of
them are loaded in-process (fast); a sample goes through the real CLI
(``labctl up FILE`` as a subprocess) to prove the exit code, the absence of
a traceback, and that no namespace appeared.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.errors import LabFileError
from labctl.lab.labfile import load_lab

CORPUS = Path(__file__).parent / "corpus"
FILES = sorted(CORPUS.glob("*.yaml"))
LABCTL = os.path.join(os.path.dirname(sys.executable), "labctl")
SAMPLE = [
    "alias-bomb",
    "deep-nesting",
    "python-tag",
    "not-a-lab",
    "shadow-like",
    "lab-name-0",
    "node-name-6",
    "ifname-1",
    "iptables-newline",
    "ebtables-broute",
    "sysctl-lwtunnel",
    "sysctl-traversal",
    "host-sysctl-value",
    "check-sysctl-missing",
    "bad-int-tag",
    "nul-char",
    "empty",
    "kinds-vlan-id",
    "nft-syntax",
    "tc-rate-unit",
    "iptables-target-typo",
    "iptables-match-absent",
    "check-iptables-target-typo",
    "ip6tables-match-ipv4-only",
    "check-ip6tables-target-typo",
    "node-name-markup",
    "iface-name-markup",
]


def expected(file: Path) -> str:
    first = file.read_text(encoding="utf-8").split("\n", 1)[0]
    assert first.startswith("# expect: "), file
    return first.removeprefix("# expect: ")


def test_the_corpus_is_large_enough() -> None:
    assert len(FILES) >= 120


@pytest.mark.parametrize("file", FILES, ids=[f.stem for f in FILES])
def test_each_malformed_file_is_refused_with_its_line(file: Path) -> None:
    with pytest.raises(LabFileError) as info:
        load_lab(str(file))
    problems = info.value.problems
    assert problems and all(p.file == str(file) for p in problems)
    assert all(p.line is not None for p in problems), [str(p) for p in problems]
    assert any(expected(file) in str(p) for p in problems), [str(p) for p in problems]
    assert info.value.exit_code == 2


def _lab_namespaces() -> set[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("stem", SAMPLE)
def test_the_cli_exits_2_without_a_traceback_and_builds_nothing(stem: str) -> None:
    file = CORPUS / f"{stem}.yaml"
    before = _lab_namespaces()
    result = subprocess.run([LABCTL, "up", str(file)], capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert re.match(rf"error: {re.escape(str(file))}:\d+: ", result.stderr), result.stderr
    new = _lab_namespaces() - before
    assert not {n for n in new if n.startswith(("labctl-corpus.", "labctl-ebdiag"))}
