"""Judge one check's Evidence: every key its ``expect`` states, through that key's kind.

Judging reads only the Evidence (and the check), never the kernel, so a
recorded Evidence replays the same verdict without root.  A check passes only
when every row agrees; a check that states nothing cannot pass; a step that
could not do what it said makes the check an ERROR whatever the rows say.
"""

from __future__ import annotations

from labctl.evidence.model import Evidence
from labctl.expect.base import JudgeContext, Needs, Row, kinds
from labctl.topology.checks import Check


def needs_of(check: Check) -> Needs:
    needs = Needs()
    for key, kind in kinds().items():
        value = getattr(check.expect, key)
        if value is not None:
            kind.needs(value, needs)
    return needs


def judge(check: Check, evidence: Evidence, ctx: JudgeContext) -> list[Row]:
    rows: list[Row] = []
    for key, kind in kinds().items():
        value = getattr(check.expect, key)
        if value is not None:
            rows += kind.judge(value, evidence, ctx)
    if evidence.lost_events and needs_of(check).whole_trace:
        rows.append(
            Row(
                "trace complete (no lost events)",
                0,
                evidence.lost_events,
                False,
                hint="the trace ring overflowed: fewer packets, or a larger buffer",
            )
        )
    if not rows:
        rows.append(Row("the check states at least one expectation", "an expectation", "none", False))
    return rows
