"""exec: what the check's exec traffic steps ended with (exit status, output), one row per stated key.

A user states these on the step itself (``exec: {..., exit: 0, stdout: REGEX}``); the check model copies
them here under the step's label (``traffic[2]``), so they are judged like every other expectation.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Row, register
from labctl.topology.steps import ExecOutcome

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


@register
class Exec(Kind):
    key = "exec"
    schema = dict[str, ExecOutcome]
    doc = "Per exec traffic step ('traffic[N]'): its exit status, and patterns its stdout/stderr must match."
    order = 73

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return [
            ((label,), f"no exec traffic step {label!r} (exec steps: {', '.join(sorted(lab.exec_steps)) or 'none'})")
            for label in value
            if label not in lab.exec_steps
        ]

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        runs = {run.label: run for run in ev.execs}
        for label, wanted in value.items():
            run = runs.get(label)
            if run is None or run.error:
                reason = "did not run" if run is None else run.error
                rows.append(Row(f"{label} ran", "ran", reason, False))
                continue
            argv = " ".join(run.argv)
            if wanted.exit is not None:
                rows.append(Row(f"{label} exit ({argv})", wanted.exit, run.exit, run.exit == wanted.exit,
                                hint=_last_line(run.stderr or run.stdout)))
            for stream in ("stdout", "stderr"):
                pattern = getattr(wanted, stream)
                if pattern is None:
                    continue
                text = getattr(run, stream)
                found = re.search(pattern, text, re.MULTILINE)
                rows.append(Row(f"{label} {stream} matches", pattern, found.group(0) if found else _last_line(text),
                                found is not None))
        return rows


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""
