"""Converge a namespace's iptables / ip6tables rules to a list of rule lines: untouched when they already match.

A second ``up`` of an unchanged file must change nothing -- not even the
counters a user is watching.  Rule lines cannot be compared with what the
kernel holds as text (``-p udp --dport 53`` is listed back as ``-p udp -m udp
--dport 53``), so the wanted rules are installed in a scratch namespace of
their own and listed back there with the same libxt ``save`` functions; the
two listings are compared table by table.  Equal: nothing is touched.
Different: the node's tables are emptied and the rules installed (one batch,
all or nothing; rules the kernel refuses are found in the scratch namespace,
so the node keeps its old rules whole).  A table with no rules, no user chain and ACCEPT policies
counts as absent (legacy tables cannot be unregistered, so an emptied one stays).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from labctl.kernel import netns
from labctl.kernel.iptapply import apply_rules
from labctl.kernel.iptlist import existing_tables, flush, list_rules
from labctl.kernel.iptrules import Family, RuleCounter, RuleError
from labctl.names import scratch_namespace_name

Listing = dict[str, tuple[tuple[str, int, str], ...]]


def listing(rows: Sequence[RuleCounter]) -> Listing:
    """Per table, its chains' rules and policies as text, empty tables left out (counters ignored)."""
    tables: dict[str, list[tuple[str, int, str]]] = {}
    for row in rows:
        tables.setdefault(row.table, []).append((row.chain, row.position, row.rule))
    return {
        table: tuple(entries)
        for table, entries in tables.items()
        if any(position or not rule.endswith(" ACCEPT") for _, position, rule in entries)
        or _has_user_chain(rows, table)
    }


def _has_user_chain(rows: Sequence[RuleCounter], table: str) -> bool:
    """A user chain with rules (an empty one lists no row on either side, so it never makes a difference)."""
    return any(r.table == table and r.chain not in _BUILTIN for r in rows)


_BUILTIN = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


def wanted_listing(rules: Sequence[str], family: Family, namespace: str) -> Listing:
    """``rules`` as the kernel lists them back, installed in a scratch namespace that is gone afterwards.

    A rule the kernel refuses raises RuleError naming it (and ``namespace``, the node it was meant for),
    before the node is touched: its rules stay whole.
    """
    if not rules:
        return {}
    # tid + 1: the culprit search of a refused batch makes its own scratch namespace with this thread's id
    scratch = scratch_namespace_name(os.getpid(), threading.get_ident() + 1)  # reclaimed by clean if we die
    netns.create(scratch)
    try:
        apply_rules(scratch, rules, family)
        return listing(list_rules(scratch, family=family))
    except RuleError as exc:
        raise exc.in_namespace(namespace) from exc
    finally:
        netns.remove(scratch)


def converge(namespace: str, rules: Sequence[str], family: Family = "ip") -> str | None:
    """Make ``namespace``'s ``family`` rules be ``rules``; what was done (``replaced``, ``removed``) or None.

    A namespace with no table of the family gets the rules directly.  Rules the kernel refuses leave the
    node's rules as they were (RuleError names the rule).
    """
    if not existing_tables(namespace, family):
        if rules:
            apply_rules(namespace, rules, family)
        return None
    have = listing(list_rules(namespace, family=family))
    if have == wanted_listing(rules, family, namespace):
        return None
    flush(namespace, family)
    if rules:
        apply_rules(namespace, rules, family)
        return "replaced"
    return "removed"
