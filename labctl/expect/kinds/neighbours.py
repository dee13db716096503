"""neighbours: the states a node's neighbour entries went through, as its own namespace announced them.

rtnetlink notifications are heard inside the node's namespace only, so this
is exact to the lab even when other namespaces resolve the same addresses on
devices of the same name.  ``{client: {10.0.1.99: FAILED}}`` -- the entry
for 10.0.1.99 was announced FAILED during the window (ARP went unanswered).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Row, register
from labctl.expect.values import Address

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence

STATES = ("INCOMPLETE", "REACHABLE", "STALE", "DELAY", "PROBE", "FAILED", "NOARP", "PERMANENT")


@register
class Neighbours(Kind):
    key = "neighbours"
    schema = Annotated[dict[str, Annotated[dict[Address, str], Field(min_length=1)]], Field(min_length=1)]
    doc = "Per node, address -> a neighbour state the node's namespace announced during the window (FAILED...)."
    order = 85

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        issues: list[Issue] = []
        for node, wanted in value.items():
            if node not in lab.nodes:
                issues.append(((node,), f"unknown node {node!r}"))
            for address, state in wanted.items():
                if state not in STATES:
                    issues.append(((node, address), f"{state!r} is not a neighbour state ({', '.join(STATES)})"))
        return issues

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for node, wanted in value.items():
            notes = [n.split() for n in ev.notifications.get(node, ()) if n.startswith("neigh ")]
            for address, state in wanted.items():
                seen = [words[3] for words in notes if len(words) >= 4 and words[1] == address]
                ok = any(state in s.split("|") for s in seen)
                rows.append(Row(f"{node} neighbour {address} announced", state, seen or "no announcement", ok))
        return rows
