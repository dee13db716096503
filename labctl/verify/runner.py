"""Run lab files: bring the lab up, run its checks one by one, bring it down."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.errors import LabctlError
from labctl.lab import build
from labctl.lab.labfile import load_lab
from labctl.topology.checks import Check, LabFile
from labctl.verify.evaluate import Evidence, evaluate
from labctl.verify.observe import Observation, observe


@dataclass
class CheckResult:
    name: str
    covers: list[str]
    description: str
    passed: bool
    evidence: list[Evidence]
    observation: dict[str, Any]
    seconds: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "covers": self.covers,
            "description": self.description,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "evidence": [e.as_dict() for e in self.evidence],
            "observation": self.observation,
        }


@dataclass
class LabResult:
    lab: str
    file: str
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "file": self.file,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "checks": [c.as_dict() for c in self.checks],
        }


def load_lab_file(file: str) -> LabFile:
    return load_lab(file)[0]


def lab_files(paths: Iterable[str]) -> list[str]:
    files: list[str] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files += sorted(str(f) for f in p.glob("*.yaml"))
        else:
            files.append(str(p))
    return files


def run_check(lab: LabFile, check: Check) -> CheckResult:
    start = time.monotonic()
    evidence: list[Evidence] = []
    seen = Observation()
    error = None
    for _ in range(check.repeat):
        try:
            seen = observe(lab, check)
            rows = evaluate(lab, check, seen)
        except LabctlError as exc:
            error = str(exc)
            rows = [Evidence("the check ran", "no error", error, False)]
        except Exception as exc:  # the report must say what broke, not hide it
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            rows = [Evidence("the check ran", "no error", f"{type(exc).__name__}: {exc}", False)]
        evidence = rows
        if not all(r.ok for r in rows):
            break
    return CheckResult(
        name=check.name,
        covers=check.covers,
        description=check.description,
        passed=all(r.ok for r in evidence),
        evidence=evidence,
        observation=seen.as_dict(),
        seconds=time.monotonic() - start,
        error=error,
    )


def run_lab(
    file: str,
    select: str | None = None,
    keep: bool = False,
    on_check: Callable[[str, str], None] | None = None,
) -> LabResult:
    """Bring the lab up, run its (selected) checks, bring it down unless ``keep``."""
    start = time.monotonic()
    lab = load_lab_file(file)
    result = LabResult(lab=lab.name, file=file)
    chosen = [c for c in lab.checks if select is None or select in c.name or select in c.covers]
    if not chosen:
        return result  # nothing to prove here: do not build the lab for nothing
    build.up(lab, file)
    try:
        for check in chosen:
            if on_check:
                on_check(lab.name, check.name)
            result.checks.append(run_check(lab, check))
    finally:
        if not keep:
            build.down(lab.name)
    result.seconds = time.monotonic() - start
    return result
