"""Netfilter evidence: rule counters as the user numbers them, and hook walks grouped per packet.

**Rule numbers are the user's.**  A hook trace inserts an NFLOG rule at the
top of every traced chain (see :mod:`labctl.kernel.nftrace`); the counters
skip those rules and number the rest as ``iptables -L --line-numbers`` would
without the trace, so ``filter:INPUT:1`` means the same whether or not the
check also traces hooks.

**Walks are per packet.**  nfnetlink_log numbers every message of a group,
so the steps of all packets come back in one kernel order; each step carries
the IPv4 id of the packet as it was at that hook (NAT rewrites addresses, not
the id), which splits the sequence into one walk per packet.  IPv6 has no id:
an IPv6 step carries its flow label, and since identical datagrams of one
flow share it, a packet's walk also ends where a table:chain it already
passed comes round again (a node runs each hook once per packet, and the
hooks of one packet run one after another).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from labctl.kernel.nftrace import HookStep

if TYPE_CHECKING:  # python-iptables is imported by the functions that read rules, when a lab has some
    from labctl.kernel.iptrules import RuleCounter

RuleCounts = dict[str, dict[str, int]]

TRACE_RULE = re.compile(r"lt[0-9a-f]{6}\|(?:ip|ip6|bridge|nft)\|")
"""The NFLOG prefix a HookTracer's own rules carry (``lt<tag>|ip|raw|PREROUTING``)."""


def rule_key(table: str, chain: str, position: int, policy: str | None) -> str:
    return f"{table}:{chain}:{'policy' if policy is not None and position == 0 else position}"


def is_trace_rule(row: RuleCounter) -> bool:
    """A rule a HookTracer inserted (it disappears when the trace ends)."""
    return bool(TRACE_RULE.search(row.rule))


def user_rows(rows: list[RuleCounter]) -> list[RuleCounter]:
    """``rows`` without trace rules, renumbered per table and chain as if the trace were absent."""
    from labctl.kernel.iptrules import RuleCounter

    kept: list[RuleCounter] = []
    numbers: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.position == 0:
            kept.append(row)
            continue
        if is_trace_rule(row):
            continue
        key = (row.table, row.chain)
        numbers[key] = numbers.get(key, 0) + 1
        kept.append(RuleCounter(row.table, row.chain, numbers[key], row.rule, row.packets, row.bytes, row.policy))
    return kept


def counts(rows: list[RuleCounter]) -> dict[str, int]:
    """``table:CHAIN:N`` (and ``table:CHAIN:policy``) -> packets, trace rules left out."""
    return {rule_key(r.table, r.chain, r.position, r.policy): r.packets for r in user_rows(rows)}


def read_rule_counts(ip_nodes: Mapping[str, str], bridge_nodes: Mapping[str, str]) -> tuple[RuleCounts, RuleCounts]:
    """Packet counters of every rule and policy of the given nodes (node -> namespace)."""
    if not ip_nodes and not bridge_nodes:
        return {}, {}
    from labctl.kernel import ebtables, iptables

    ip = {node: counts(iptables.list_rules(ns)) for node, ns in ip_nodes.items()}
    eb = {node: counts(ebtables.list_rules(ns)) for node, ns in bridge_nodes.items()}
    return ip, eb


def rule_deltas(
    before: tuple[RuleCounts, RuleCounts], after: tuple[RuleCounts, RuleCounts]
) -> tuple[RuleCounts, RuleCounts]:
    """Per node and rule, packets counted between the two readings.

    A rule that did not exist before (a table the trace instantiated) counts
    from zero.  ebtables-nft policies have no counter (-1): they have no delta, so an expectation
    on one reads "no such rule" and fails instead of passing on a made-up 0.
    """

    def diff(old: RuleCounts, new: RuleCounts) -> RuleCounts:
        # a counter the kernel does not keep (-1: nf_tables base chain policies) has no delta at all
        return {
            node: {key: value - old.get(node, {}).get(key, 0) for key, value in rows.items() if value >= 0}
            for node, rows in new.items()
        }

    return diff(before[0], after[0]), diff(before[1], after[1])


def read_ip6_counts(nodes: Mapping[str, str]) -> RuleCounts:
    """Packet counters of every ip6tables rule and policy of the given nodes (node -> namespace)."""
    if not nodes:
        return {}
    from labctl.kernel import iptables

    return {node: counts(iptables.list_rules(ns, family="ip6")) for node, ns in nodes.items()}


def read_nft_counts(nodes: Mapping[str, str]) -> RuleCounts:
    """Packet counters of every nf_tables rule with a ``counter`` of the given nodes (node -> namespace)."""
    if not nodes:
        return {}
    from labctl.kernel import nft

    return {node: nft.counts(nft.rule_counters(ns)) for node, ns in nodes.items()}


def nft_deltas(before: RuleCounts, after: RuleCounts) -> RuleCounts:
    """Per node and rule, packets counted between the two readings (a rule new since then counts from 0)."""
    return {
        node: {key: value - before.get(node, {}).get(key, 0) for key, value in rows.items()}
        for node, rows in after.items()
    }


def packet_of(step: HookStep) -> str:
    if step.ip_id is not None:
        return f"id {step.ip_id}"
    if step.flow is not None:
        return f"ip6 flow {step.flow}"
    return "non-IP"


def walks_per_packet(steps: Iterable[HookStep]) -> tuple[tuple[HookStep, ...], ...]:
    """The steps, in kernel order, split into one walk per packet (in the order packets first appeared)."""
    walks: list[list[HookStep]] = []
    current: dict[str, list[HookStep]] = {}
    for step in sorted(steps, key=lambda s: s.seq):
        key = packet_of(step)
        walk = current.get(key)
        if walk is None or (step.flow is not None and any(s.name == step.name for s in walk)):
            walk = current[key] = []
            walks.append(walk)
        walk.append(step)
    return tuple(tuple(w) for w in walks)
