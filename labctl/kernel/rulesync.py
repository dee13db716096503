"""Converge a namespace's rules of one tool (iptables, ip6tables, ebtables) to a list of rule lines.

A second ``up`` of an unchanged file must change nothing -- not the counters a
user is watching, and not the firewall, which a flush-and-reapply leaves open
for a moment.  Rule lines cannot be compared with what the kernel holds as
text (``-p udp --dport 53`` is listed back as ``-p udp -m udp --dport 53``;
ebtables-nft prints its own spelling too), so the wanted rules are installed
in a scratch namespace of their own and listed back there by the same code
that lists the node's; the two listings are compared table by table.  Equal:
nothing is touched.  Different: the node's rules are swapped for the file's,
each table in one step (never empty in between); rules the kernel refuses
are found in the scratch namespace, so the node keeps its old rules whole.  A table with
no rules, no user chain and ACCEPT policies counts as absent (legacy tables
cannot be unregistered, so an emptied one stays).

This is the one way every xtables-style tool converges: each tool gives a
:class:`RuleTool` (its listing, installing and emptying functions), and this
module imports none of them -- so ebtables never loads python-iptables.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from labctl.kernel import netns
from labctl.kernel.iptrules import RuleCounter, RuleError
from labctl.names import scratch_namespace_name

Listing = dict[str, tuple[tuple[str, int, str], ...]]

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING", "BROUTING"})


@dataclass(frozen=True)
class RuleTool:
    """How one tool lists, installs and empties a namespace's rules (all take the namespace first)."""

    name: str
    """``iptables``, ``ip6tables``, ``ebtables``: what ``up`` prints (``r1: iptables replaced``)."""
    has_tables: Callable[[str], bool]
    """Whether the namespace holds any table of the tool (none: the rules go straight in)."""
    list_rules: Callable[[str], Sequence[RuleCounter]]
    apply_rules: Callable[[str, Sequence[str]], None]
    """Add rules to the namespace's, all or none (the scratch namespace, a node without tables)."""
    replace_rules: Callable[[str, Sequence[str]], None]
    """Swap the namespace's rules for these, each table in one step (never seen empty in between)."""
    flush: Callable[[str], None]


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
    """A user chain (the same on both sides when the files agree, so it only tells tables apart)."""
    return any(r.table == table and r.chain not in BUILTIN_CHAINS for r in rows)


def wanted_listing(tool: RuleTool, rules: Sequence[str], namespace: str) -> Listing:
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
        tool.apply_rules(scratch, rules)
        return listing(tool.list_rules(scratch))
    except RuleError as exc:
        raise exc.in_namespace(namespace) from exc
    finally:
        netns.remove(scratch)


def converge(tool: RuleTool, namespace: str, rules: Sequence[str]) -> str | None:
    """Make ``namespace``'s rules of ``tool`` be ``rules``; what was done or None (nothing).

    ``loaded`` (the node had no rules of the tool), ``replaced`` or ``removed``.  A namespace with no
    table of the tool gets the rules directly, with no scratch namespace.  Rules the kernel refuses leave
    the node's rules as they were (RuleError names the rule).
    """
    if not tool.has_tables(namespace):
        if not rules:
            return None
        tool.apply_rules(namespace, rules)
        return "loaded"
    have = listing(tool.list_rules(namespace))
    if have == wanted_listing(tool, rules, namespace):
        return None
    if not rules:
        tool.flush(namespace)
        return "removed"
    tool.replace_rules(namespace, rules)
    return "replaced" if have else "loaded"
