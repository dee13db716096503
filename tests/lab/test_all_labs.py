"""The product's main job: the labs in labs/ prove every claim of PATHS.md on this kernel."""

from __future__ import annotations

import re
from pathlib import Path

from labctl.kernel import kconfig, netns
from labctl.verify.report import claims
from labctl.verify.runner import run_lab
from labctl.verify.scope import lab_files

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
    """Proven on this kernel, or reported as not provable here because this kernel lacks an option a check needs."""
    results = [run_lab(file) for file in lab_files([str(REPO / "labs")])]
    failed = [f"{r.lab}/{c.name}" for r in results for c in r.checks if c.status in ("fail", "error")]
    assert failed == []
    verdicts = claims(results)
    missing = claims_in_paths() - set(verdicts.proven) - set(verdicts.not_provable)
    assert missing == set(), f"claims without a passing check: {sorted(missing)}"
    for claim, options in verdicts.not_provable.items():
        assert options and all(kconfig.missing([o]) for o in options), claim  # really absent here
    assert not any(netns.list_labctl(r.lab) for r in results)
