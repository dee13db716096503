"""The netfilter and ebtables verification labs pass on this kernel, and a wrong claim fails.

Each lab runs under a unique name (a copy of the file in tmp_path), so a
``labctl demo`` running beside the tests cannot tear down the test's lab.
The negative test is the point of the engine: the notes' article says ACCEPT
ends netfilter for the packet; stated as an expectation, the kernel's
counters must make that check fail.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from labctl.kernel import ebtables, netns
from labctl.verify.results import LabResult
from labctl.verify.runner import run_lab
from tests.hostcheck import host_snapshot

LABS = Path(__file__).resolve().parents[2] / "labs"
NETFILTER_LABS = ["netfilter-hooks.yaml", "nat.yaml", "ebtables.yaml"]
CLAIMS = {
    "netfilter-hooks.yaml": {"N1", "N3", "N4", "N5"},
    "nat.yaml": {"N2"},
    "ebtables.yaml": {"E1", "E2", "E3", "E4", "E5"},
}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")


def _copy(source: str, tmp_path: Path, edit: Any = None) -> str:
    """The lab file under a unique lab name, optionally edited (``edit(data)``)."""
    data = yaml.safe_load((LABS / source).read_text())
    data["name"] = f"nf{uuid.uuid4().hex[:10]}"
    if edit is not None:
        edit(data)
    target = tmp_path / source
    target.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return str(target)


def _failures(result: LabResult) -> str:
    lines = [result.error or ""]
    for check in result.checks:
        for row in check.evidence:
            if not row.ok:
                lines.append(f"{check.name}: {row.what}: expected {row.expected!r}, observed {row.observed!r}")
        if check.error:
            lines.append(f"{check.name}: {check.error}")
    return "\n".join(line for line in lines if line)


@pytest.mark.parametrize("source", NETFILTER_LABS)
def test_lab_passes(source: str, tmp_path: Path) -> None:
    before = host_snapshot()
    result = run_lab(_copy(source, tmp_path))
    assert result.passed, _failures(result)
    covered = {claim for check in result.checks for claim in check.covers}
    assert CLAIMS[source] <= covered
    assert result.seconds < 10, f"{source} took {result.seconds:.1f}s"
    assert host_snapshot() == before


def test_wrong_expectation_fails(tmp_path: Path) -> None:
    """The article's claim (ACCEPT in mangle INPUT ends netfilter) as an expectation: the kernel refutes it."""

    def claim_of_the_article(data: dict[str, Any]) -> None:
        (check,) = [c for c in data["checks"] if c["name"] == "accept-ends-only-its-table"]
        check["expect"]["rules"]["router"]["filter:INPUT:1"] = 0
        data["checks"] = [check]

    result = run_lab(_copy("netfilter-hooks.yaml", tmp_path, claim_of_the_article))
    (check,) = result.checks
    assert not check.passed
    assert check.error is None  # it ran; the evidence disagrees
    bad = [row for row in check.evidence if not row.ok]
    assert [(row.what, row.expected, row.observed) for row in bad] == [
        ("router iptables filter:INPUT:1 packets (delta)", 0, 2)
    ]


def test_wrong_hook_order_fails(tmp_path: Path) -> None:
    """Order matters: filter before mangle on INPUT is not what the kernel does."""

    def swapped(data: dict[str, Any]) -> None:
        (check,) = [c for c in data["checks"] if c["name"] == "order-local-delivery"]
        check["expect"]["hooks"]["router"] = ["filter:INPUT", "mangle:INPUT"]
        data["checks"] = [check]

    result = run_lab(_copy("netfilter-hooks.yaml", tmp_path, swapped))
    (check,) = result.checks
    assert not check.passed and check.error is None
    (bad,) = [row for row in check.evidence if not row.ok]
    assert bad.what == "router netfilter walk of each packet"
    (walk,) = bad.observed  # the one packet's whole walk, as the kernel ran it
    assert walk.index("ip:mangle:INPUT") < walk.index("ip:filter:INPUT")
    assert any(line.startswith("✗") for line in bad.detail)  # the first differing step is marked


def test_broute_is_not_available_here() -> None:
    """E3's premise on this machine: no broute table, so ebtables.yaml shows the effect another way."""
    scratch = netns.namespace_name(f"broute{os.getpid()}", "x")
    netns.create(scratch)
    try:
        listing = netns.run(scratch, [ebtables.EBTABLES, "-t", "broute", "-L"], capture_output=True, text=True)
        assert listing.returncode != 0
        with pytest.raises(ebtables.RuleError, match="broute is not available"):
            ebtables.apply_rules(scratch, ["-t broute -A BROUTING -p IPv4 -j DROP"])
    finally:
        netns.remove(scratch)
