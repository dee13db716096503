"""One copy of the twin lab: up under NAME, run every check ITERATIONS times, print the statuses (JSON)."""

from __future__ import annotations

import json
import sys

from labctl.evidence.kept_trace import kept_traces
from labctl.lab import build
from labctl.lab.labfile import load_lab
from labctl.verify.runner import run_check


def main(file: str, name: str, iterations: int) -> None:
    lab, _ = load_lab(file)
    lab = lab.model_copy(update={"name": name})
    build.up(lab, file)
    statuses: dict[str, list[str]] = {c.name: [] for c in lab.checks}
    failures: list[str] = []
    try:
        with kept_traces():  # as run_lab runs them: one tracefs instance, paused between the windows
            for _ in range(iterations):
                for check in lab.checks:
                    result = run_check(lab, check)
                    statuses[check.name].append(result.status)
                    expected = "fail" if check.name == "wrong-on-purpose" else "pass"
                    if result.status != expected:
                        bad = [
                            f"{r.what}: expected {r.expected}, observed {r.observed}"
                            for r in result.evidence
                            if not r.ok
                        ]
                        failures.append(
                            f"{check.name}: {result.status}: {bad} {result.error or ''} {result.explanation}"
                        )
    finally:
        build.down(name)
    print(json.dumps({"statuses": statuses, "failures": failures}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
