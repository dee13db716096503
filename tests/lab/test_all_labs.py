"""The product's main job: the labs in labs/ prove every claim of PATHS.md on this kernel."""

from __future__ import annotations

import re
from pathlib import Path

from labctl.kernel import netns
from labctl.verify.runner import lab_files, run_lab

REPO = Path(__file__).resolve().parents[2]
PATHS = REPO.parent / "shared" / "PATHS.md"
# the claim ids of PATHS.md when these labs were written; the file, when present, is the list
KNOWN_CLAIMS = (
    {f"R{i}" for i in range(1, 14)}
    | {f"T{i}" for i in range(1, 9)}
    | {f"B{i}" for i in range(1, 6)}
    | {f"N{i}" for i in range(1, 6)}
    | {f"E{i}" for i in range(1, 6)}
)


def claims_in_paths() -> set[str]:
    if not PATHS.exists():
        return KNOWN_CLAIMS
    return set(re.findall(r"^\| ([RTBNE]\d+) \|", PATHS.read_text(), flags=re.MULTILINE))


def test_every_documented_claim_is_proven() -> None:
    results = [run_lab(file) for file in lab_files([str(REPO / "labs")])]
    failed = [f"{r.lab}/{c.name}" for r in results for c in r.checks if not c.passed]
    assert failed == []
    proven = {claim for r in results for c in r.checks if c.passed for claim in c.covers}
    missing = claims_in_paths() - proven
    assert missing == set(), f"claims without a passing check: {sorted(missing)}"
    assert not any(netns.list_labctl(r.lab) for r in results)
