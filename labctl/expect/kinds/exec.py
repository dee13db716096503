"""exec: what the check's exec steps ended with (exit status, output), one row per stated key.

A user states these on the step itself (``exec: {..., exit: 0, stdout: REGEX}``); the check model copies
them here under the step's label (``traffic[2]``, ``setup.exec[0]``: a setup step states exit 0 unless it
says otherwise), so they are judged like every other expectation, on the recorded result.  A setup step
that does not end as it says is also a stage error: the check is an ERROR and its traffic is not sent.
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
    doc = "Per exec step ('traffic[N]', 'setup.exec[N]'): its exit status, patterns its stdout/stderr match."
    order = 73

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return [
            ((label,), f"no exec step {label!r} (exec steps: {', '.join(sorted(lab.exec_steps)) or 'none'})")
            for label in value
            if label not in lab.exec_steps
        ]

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        runs = {run.label: run for run in ev.execs}
        for label, wanted in sorted(value.items(), key=lambda item: _order(item[0])):
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


def _order(label: str) -> tuple[int, int, str]:
    """Setup steps first, then traffic, each by index (however the labels were written)."""
    found = re.search(r"\[(\d+)\]$", label)
    return (0 if label.startswith("setup.") else 1, int(found[1]) if found else 0, label)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""
