"""iptables rule and policy counters: read, diffed, tied to their hook and put in words."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from labctl.kernel import netns, xtnames
from labctl.lab.trace.model import RuleDelta

if TYPE_CHECKING:
    from labctl.kernel import iptables
    from labctl.lab.trace.knowledge import Knowledge


def _rule_key(row: iptables.RuleCounter) -> str:
    return f"{row.table}:{row.chain}:{'policy' if row.position == 0 else row.position}"


def _target(row: iptables.RuleCounter) -> str | None:
    if row.position == 0:
        return row.policy
    match = re.search(r"(?:^|\s)-[jg] (\S+)", row.rule)
    return match.group(1) if match else None


def read_rules(knowledge: Knowledge) -> dict[str, dict[str, iptables.RuleCounter]]:
    """Every iptables rule and policy counter of every node (tables that exist only)."""
    rows: dict[str, dict[str, iptables.RuleCounter]] = {}
    for node, ns in knowledge.namespaces.items():
        if not _has_tables(ns):  # python-iptables costs 0.15-0.5 s to import: only for nodes with tables
            rows[node] = {}
            continue
        from labctl.kernel import iptables

        try:
            rows[node] = {_rule_key(r): r for r in iptables.list_rules(ns)}
        except (iptables.RuleError, OSError):
            rows[node] = {}
    return rows


def _has_tables(namespace: str) -> bool:
    """Whether any xtables table exists in ``namespace`` (reading the names creates none)."""
    with netns.entered(namespace):
        return bool(xtnames.table_names_here("ip"))


def rule_deltas(
    before: dict[str, dict[str, iptables.RuleCounter]], after: dict[str, dict[str, iptables.RuleCounter]]
) -> dict[str, dict[str, RuleDelta]]:
    """Per node, every rule with its packet delta (zero included: a hook with rules but no count)."""
    result: dict[str, dict[str, RuleDelta]] = {}
    for node, rows in after.items():
        old = before.get(node, {})
        result[node] = {}
        for key, row in rows.items():
            prev = old.get(key)
            base = prev.packets if prev is not None and prev.rule == row.rule else 0
            result[node][key] = RuleDelta(row.table, row.chain, key, row.rule, row.packets - base, _target(row))
    return result


def hook_of(rule: RuleDelta, rows: dict[str, RuleDelta], depth: int = 0) -> str | None:
    """The hook a rule runs in; a user chain inherits it from a built-in chain that jumps to it."""
    if rule.hook is not None or depth > 8:
        return rule.hook
    for other in rows.values():
        if other.table == rule.table and re.search(rf"-[jg] {re.escape(rule.chain)}(\s|$)", other.rule):
            hook = hook_of(other, rows, depth + 1)
            if hook is not None:
                return hook
    return None


def rule_words(rule: RuleDelta) -> str:
    """``filter INPUT policy ACCEPT +1`` / ``filter INPUT #1 -p udp --dport 5000 -j DROP +1``."""
    if rule.key.endswith(":policy"):
        return f"{rule.table} {rule.chain} policy {rule.target} {rule.packets:+d}"
    number = rule.key.rpartition(":")[2]
    text = rule.rule.removeprefix(f"-A {rule.chain} ")
    return f"{rule.table} {rule.chain} #{number} {text} {rule.packets:+d}"


def moved_rules(rules: dict[str, dict[str, RuleDelta]]) -> dict[str, dict[str, RuleDelta]]:
    """Only the rules that counted packets, per node that has any."""
    moved = {node: {key: r for key, r in rows.items() if r.packets} for node, rows in rules.items()}
    return {node: rows for node, rows in moved.items() if rows}
