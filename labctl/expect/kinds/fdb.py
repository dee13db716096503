"""fdb: what a bridge's forwarding database holds after the traffic (read in its namespace)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Needs, Row, register
from labctl.topology.model import Strict

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence

MacRefs = Annotated[list[str], Field(min_length=1)]


class FdbMatch(Strict):
    learnt: list[str] = Field(default_factory=list)
    """MACs (or 'node:iface' for that interface's MAC) the bridge must have learnt, on any port."""
    on: dict[str, str] = Field(default_factory=dict)
    """MAC (or 'node:iface') -> the bridge port it must be learnt on."""
    absent: list[str] = Field(default_factory=list)
    """MACs the bridge must not have."""


FdbForm = MacRefs | FdbMatch


def _form(value: Any) -> FdbMatch:
    return FdbMatch(learnt=value) if isinstance(value, list) else value


def resolve(ev: Evidence, ref: str) -> str:
    """'node:iface' names that interface's MAC (recorded in the evidence); anything else is a MAC."""
    return ev.macs.get(ref, ref).lower()


@register
class Fdb(Kind):
    key = "fdb"
    schema = Annotated[dict[str, FdbForm], Field(min_length=1)]
    doc = "Per 'node:bridge': MACs learnt (a list), or {learnt: [...], on: {MAC: port}, absent: [...]}."
    order = 80

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        issues: list[Issue] = []
        for key, form in value.items():
            node, _, bridge = key.partition(":")
            if node not in lab.nodes:
                issues.append(((key,), f"unknown node {node!r}"))
            elif bridge not in lab.bridges.get(node, frozenset()):
                issues.append(((key,), f"node {node} has no bridge {bridge!r}"))
            match = _form(form)
            if not (match.learnt or match.on or match.absent):
                issues.append(((key,), "states nothing: give learnt, on or absent"))
            for mac, port in match.on.items():
                if port not in lab.nodes.get(node, frozenset()):
                    issues.append(((key, "on", mac), f"node {node} has no port {port!r}"))
        return issues

    def needs(self, value: Any, needs: Needs) -> None:
        needs.fdb |= set(value)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for key, form in value.items():
            match = _form(form)
            table = {e.mac.lower(): e.port for e in ev.fdb.get(key, ())}
            if match.learnt:
                want = [resolve(ev, r) for r in match.learnt]
                rows.append(Row(f"fdb of {key} learnt", want, sorted(table), all(m in table for m in want)))
            for ref, port in match.on.items():
                mac = resolve(ev, ref)
                rows.append(
                    Row(f"fdb of {key}: {mac} on port", port, table.get(mac, "not learnt"), table.get(mac) == port)
                )
            if match.absent:
                want = [resolve(ev, r) for r in match.absent]
                present = [m for m in want if m in table]
                rows.append(Row(f"fdb of {key} does not hold", want, present or "none of them", not present))
        return rows
