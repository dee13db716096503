"""rules, ip6tables and ebtables: packet-counter deltas of the lab's netfilter rules and chain policies."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, MachineFacts, Row, register
from labctl.expect.bounds import Count, matches

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence

RuleCounts = Annotated[dict[str, Annotated[dict[str, Count], Field(min_length=1)]], Field(min_length=1)]
_KEY = re.compile(r"^(?P<table>\w+):(?P<chain>[\w-]+):(?P<n>\d+|policy)$")


def _key_issues(value: Any, lab: LabView, tables: dict[str, tuple[str, ...]], family: str) -> list[Issue]:
    issues: list[Issue] = []
    for node, wanted in value.items():
        if node not in lab.nodes:
            issues.append(((node,), f"unknown node {node!r}"))
            continue
        for key in wanted:
            match = _KEY.match(key)
            if match is None:
                issues.append(((node, key), f"{key!r} is not 'table:CHAIN:N' or 'table:CHAIN:policy'"))
            elif match["table"] not in tables:
                issues.append(((node, key), f"{family} has no table {match['table']!r} ({', '.join(tables)})"))
            elif match["n"] == "policy" and match["chain"] not in tables[match["table"]]:
                issues.append(((node, key), f"{match['table']} has no built-in chain {match['chain']!r}"))
    return issues


class _RuleKind(Kind):
    family = ""
    label = ""

    def tables(self, facts: MachineFacts) -> dict[str, tuple[str, ...]]:
        return dict(facts.bridge_tables if self.family == "bridge" else facts.ip_tables)  # ip6 has ip's tables

    def machine(self, value: Any, facts: MachineFacts) -> list[Issue]:
        view = LabView(nodes={n: frozenset() for n in value}, bridges={}, captures=frozenset(), listeners=0)
        return _key_issues(value, view, self.tables(facts), self.label)

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return [((node,), f"unknown node {node!r}") for node in value if node not in lab.nodes]

    def source(self, ev: Evidence) -> Any:
        return {"ip": ev.rules, "ip6": ev.ip6tables, "bridge": ev.ebtables}[self.family]

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for node, wanted in value.items():
            for key, bound in wanted.items():
                delta = self.source(ev).get(node, {}).get(key)
                observed: Any = delta if delta is not None else "no such rule"
                ok = delta is not None and matches(bound, delta)
                hint = "" if ok else self.family_hint(ctx)
                rows.append(Row(f"{node} {self.label} {key} packets (delta)", bound, observed, ok, hint))
        return rows

    def family_hint(self, ctx: JudgeContext) -> str:
        """IPv6 traffic judged on iptables counters (or IPv4 on ip6tables'): name the other key."""
        protocols = ctx.traffic_protocols
        if self.family == "ip" and _ETH_P_IPV6 in protocols and _ETH_P_IP not in protocols:
            return "the check's traffic is IPv6: ip6tables rules count it (expect ip6tables:, not rules:)"
        if self.family == "ip6" and _ETH_P_IP in protocols and _ETH_P_IPV6 not in protocols:
            return "the check's traffic is IPv4: iptables rules count it (expect rules:, not ip6tables:)"
        return ""


_ETH_P_IP, _ETH_P_IPV6 = 0x0800, 0x86DD


@register
class Rules(_RuleKind):
    key = "rules"
    schema = RuleCounts
    doc = "Per node, packet-counter deltas of iptables rules: 'table:chain:N' (N-th rule) or 'table:chain:policy'."
    order = 60
    family = "ip"
    label = "iptables"


@register
class Ip6tables(_RuleKind):
    key = "ip6tables"
    schema = RuleCounts
    doc = "Per node, packet-counter deltas of ip6tables rules, keyed as for 'rules' ('filter:INPUT:1')."
    order = 60
    family = "ip6"
    label = "ip6tables"


@register
class Ebtables(_RuleKind):
    key = "ebtables"
    schema = RuleCounts
    doc = "Per node, packet-counter deltas of ebtables rules, keyed as for 'rules'."
    order = 61
    family = "bridge"
    label = "ebtables"
