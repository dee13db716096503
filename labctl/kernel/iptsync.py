"""Converge a namespace's iptables / ip6tables rules to a list of rule lines: untouched when they already match.

The comparison (the file's rules installed in a scratch namespace, listed back and compared with the
node's) is :mod:`labctl.kernel.rulesync`, shared with ebtables; this module gives it the xtables
functions of each family.
"""

from __future__ import annotations

from collections.abc import Sequence

from labctl.kernel import rulesync
from labctl.kernel.iptapply import apply_rules, replace_rules
from labctl.kernel.iptlist import existing_tables, flush, list_rules
from labctl.kernel.iptrules import TOOL, Family


def tool(family: Family = "ip") -> rulesync.RuleTool:
    """iptables (``ip``) or ip6tables (``ip6``) as :func:`rulesync.converge` drives it."""
    return rulesync.RuleTool(
        name=TOOL[family],
        has_tables=lambda namespace: bool(existing_tables(namespace, family)),
        list_rules=lambda namespace: list_rules(namespace, family=family),
        apply_rules=lambda namespace, rules: apply_rules(namespace, rules, family),
        replace_rules=lambda namespace, rules: replace_rules(namespace, rules, family),
        flush=lambda namespace: flush(namespace, family),
    )


def converge(namespace: str, rules: Sequence[str], family: Family = "ip") -> str | None:
    """Make ``namespace``'s ``family`` rules be ``rules``: ``loaded``, ``replaced``, ``removed`` or None.

    None: they already were, and nothing was touched (counters keep counting).  Rules the kernel refuses
    leave the node's rules as they were (RuleError names the rule).
    """
    return rulesync.converge(tool(family), namespace, rules)
