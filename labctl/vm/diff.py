"""The verdict table across kernels: one row per check, one column per kernel, differences first.

A row is
- ``differs`` when the verdicts differ and the lab does not explain it (a FAIL or ERROR on one kernel and a
  PASS on another, or a lab that could not even load on one kernel);
- ``explained`` when they differ only because the lab says the check does not apply there: it is SKIPped
  on that kernel for a kernel option it lacks (``requires:``) or a version range (``kernel: ">=6.2"``);
- ``same`` when every kernel gave the same verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from labctl.verify.results import LabResult

LAB_ROW = "(lab)"
"""The check column of a row that stands for a whole lab that could not run on some kernel."""
ORDER = {"differs": 0, "explained": 1, "same": 2}


@dataclass
class Verdict:
    status: str
    """pass, fail, error, skip, or absent (the kernel's run has no such check)."""
    reason: str = ""


@dataclass
class DiffRow:
    lab: str
    check: str
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    kind: str = "same"

    def as_dict(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "check": self.check,
            "kind": self.kind,
            "verdicts": {k: {"status": v.status, "reason": v.reason} for k, v in self.verdicts.items()},
        }


def _verdicts(results: list[LabResult]) -> dict[tuple[str, str], Verdict]:
    found: dict[tuple[str, str], Verdict] = {}
    for lab in results:
        if lab.error:
            found[(lab.lab, LAB_ROW)] = Verdict("error", lab.error.splitlines()[0])
        for check in lab.checks:
            reason = ""
            if check.status == "skip":
                reason = "lacks " + ", ".join(check.not_provable)
            elif check.status in ("fail", "error"):
                bad = [r.what for r in check.evidence if not r.ok]
                reason = (check.error or "").splitlines()[0] if check.error else "; ".join(bad)
            found[(lab.lab, check.name)] = Verdict(check.status, reason)
    return found


def classify(verdicts: list[Verdict]) -> str:
    statuses = {v.status for v in verdicts}
    if len(statuses) == 1:
        return "same"
    if statuses <= {"pass", "skip"}:
        return "explained"  # skipped where the lab says it does not apply, passed where it does
    return "differs"


def table(runs: list[tuple[str, list[LabResult]]]) -> list[DiffRow]:
    """Rows for every (lab, check) seen on any kernel, in run order, differences first."""
    per_kernel = [(label, _verdicts(results)) for label, results in runs]
    keys: dict[tuple[str, str], None] = {}
    for _, verdicts in per_kernel:
        keys.update(dict.fromkeys(verdicts))
    rows = []
    for lab, check in keys:
        row = DiffRow(lab, check)
        for label, verdicts in per_kernel:
            row.verdicts[label] = verdicts.get((lab, check), Verdict("absent", "not run on this kernel"))
        row.kind = classify(list(row.verdicts.values()))
        rows.append(row)
    return sorted(rows, key=lambda r: ORDER[r.kind])  # stable: run order within each kind


def counts(rows: list[DiffRow]) -> dict[str, int]:
    return {kind: sum(r.kind == kind for r in rows) for kind in ORDER}
