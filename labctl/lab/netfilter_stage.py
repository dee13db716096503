"""The netfilter side of a check: temporary rules, rule counters, hook traces, conntrack.

observe.py calls these around a check's traffic.  What they guarantee, and why:

* **Temporary rules** are applied on entry and, on exit, each touched node is
  put back to the topology's own rules, so the next check starts from the lab
  file, never from what an earlier check left.
* **Conntrack starts empty.**  Entries outlive a check (UDP: 30 s unreplied,
  120 s assured), and ``nat`` runs only for a flow's first packet: a flow an
  earlier check created would skip the nat table and count as an entry of
  this check.  So the stage flushes the conntrack table of every lab node on
  entry; ``expect.conntrack`` then counts entries this check's traffic made.
* **Rule numbers are the user's.**  A hook trace inserts an NFLOG rule at the
  top of every traced chain (see :mod:`labctl.kernel.nftrace`); the counters
  skip those rules and number the rest as ``iptables -L --line-numbers``
  would without the trace, so ``filter:INPUT:1`` means the same whether or not
  the check also traces hooks.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Protocol

from labctl.kernel import conntrack, ebtables, iptables, netns
from labctl.kernel.iptables import RuleCounter
from labctl.kernel.nftrace import BRIDGE_CHAINS, HookTracer
from labctl.topology.checks import Check
from labctl.topology.model import Topology

RuleCounts = dict[str, dict[str, int]]

TRACE_RULE = re.compile(r"lt[0-9a-f]{6}\|(?:ip|bridge)\|")
"""The NFLOG prefix a HookTracer's own rules carry (``lt<tag>|ip|raw|PREROUTING``)."""


class HookView(Protocol):
    """What observe.py reads from a tracer after the traffic."""

    def steps_text(self) -> list[str]: ...


def _ns(topo: Topology, node: str) -> str:
    return netns.namespace_name(topo.name, node)


def flush_conntrack(namespace: str) -> None:
    """Empty the conntrack table of ``namespace``; nothing to do where conntrack never ran.

    Everything happens with the thread inside the namespace: pyroute2 opens
    its netlink socket lazily, on the first request, so a socket created
    inside but used outside would flush the root namespace's table.
    """
    from pyroute2.conntrack import Conntrack

    with netns.entered(namespace):
        ct = Conntrack()
        try:
            ct.flush()
        finally:
            ct.close()


@contextlib.contextmanager
def temporary_rules(topo: Topology, check: Check) -> Iterator[None]:
    """Apply the check's rules on an empty conntrack table; afterwards restore the topology's rules."""
    touched_ip = list(check.setup.iptables)
    touched_eb = list(check.setup.ebtables)
    try:
        for node in topo.nodes:
            flush_conntrack(_ns(topo, node))
        for node, rules in check.setup.iptables.items():
            iptables.apply_rules(_ns(topo, node), rules)
        for node, rules in check.setup.ebtables.items():
            ebtables.apply_rules(_ns(topo, node), rules)
        yield
    finally:
        for node in touched_ip:
            iptables.flush(_ns(topo, node))
            if topo.nodes[node].iptables:
                iptables.apply_rules(_ns(topo, node), topo.nodes[node].iptables)
        for node in touched_eb:
            ebtables.flush(_ns(topo, node))
            if topo.nodes[node].ebtables:
                ebtables.apply_rules(_ns(topo, node), topo.nodes[node].ebtables)


def rule_key(table: str, chain: str, position: int, policy: str | None) -> str:
    return f"{table}:{chain}:{'policy' if policy is not None and position == 0 else position}"


def is_trace_rule(row: RuleCounter) -> bool:
    """A rule a HookTracer inserted (it disappears when the trace ends)."""
    return bool(TRACE_RULE.search(row.rule))


def user_rows(rows: list[RuleCounter]) -> list[RuleCounter]:
    """``rows`` without trace rules, renumbered per table and chain as if the trace were absent."""
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


def rule_counters(topo: Topology, check: Check) -> tuple[RuleCounts, RuleCounts]:
    """Packet counters of every rule (and policy) on the nodes the check's expectations name."""
    ip: RuleCounts = {node: counts(iptables.list_rules(_ns(topo, node))) for node in check.expect.rules}
    eb: RuleCounts = {node: counts(ebtables.list_rules(_ns(topo, node))) for node in check.expect.ebtables}
    return ip, eb


def rule_deltas(
    before: tuple[RuleCounts, RuleCounts], after: tuple[RuleCounts, RuleCounts]
) -> tuple[RuleCounts, RuleCounts]:
    """Per node and rule, packets counted between the two readings.

    A rule that did not exist before (a table the trace instantiated) counts
    from zero.  ebtables-nft policies have no counter (-1 both times): delta 0.
    """

    def diff(old: RuleCounts, new: RuleCounts) -> RuleCounts:
        return {
            node: {key: value - old.get(node, {}).get(key, 0) for key, value in rows.items()}
            for node, rows in new.items()
        }

    return diff(before[0], after[0]), diff(before[1], after[1])


def _match_of_packet(expr: str) -> str:
    """iptables match words for an injected Scapy expression (protocol and destination port)."""
    from labctl.traffic.expr import ExprError, parse_packet

    try:
        pkt = parse_packet(expr)
    except ExprError:
        return ""
    for name, proto in (("UDP", "udp"), ("TCP", "tcp")):
        if pkt.haslayer(name):
            dport = pkt[name].fields.get("dport")
            return f"-p {proto} --dport {dport}" if isinstance(dport, int) else f"-p {proto}"
    if pkt.haslayer("ICMP"):
        return "-p icmp"
    return ""


def trace_match(check: Check) -> str:
    """iptables match syntax that singles out the check's own packets for the hook trace.

    Without it the trace would also log ARP-less noise such as IPv6 or a
    neighbour's retransmissions; with it the walk shown is the check's packet.
    """
    if check.setup.hooks_match is not None:
        return check.setup.hooks_match
    for step in check.traffic:
        if step.udp is not None:
            return f"-p udp --dport {step.udp.to.rpartition(':')[2]}"
        if step.ping is not None:
            return "-p icmp"
        if step.inject is not None:
            return _match_of_packet(step.inject.packet)
    return ""


class _HookView:
    def __init__(self, tracer: HookTracer) -> None:
        self.tracer = tracer

    def steps_text(self) -> list[str]:
        return [step.name for step in self.tracer.steps()]


def hook_tracers(topo: Topology, check: Check, stack: contextlib.ExitStack) -> dict[str, HookView]:
    """One tracer per node named in ``expect.hooks``, entered on ``stack``.

    Bridge tables are traced when a ``bridge:`` step is expected.  nat chains
    only run where conntrack is on, so the tracer switches it on (for the
    trace's duration) when a nat step is expected.
    """
    tracers: dict[str, HookView] = {}
    for node, wanted in check.expect.hooks.items():
        bridge_tables = sorted(
            {step.split(":")[1] for step in wanted if step.startswith("bridge:") and step.count(":") == 2}
            & set(BRIDGE_CHAINS)
        )
        needs_nat = any(":nat:" in f":{step}" for step in wanted)
        tracer = HookTracer(_ns(topo, node), match=trace_match(check), bridge_tables=bridge_tables, conntrack=needs_nat)
        stack.enter_context(tracer)
        tracers[node] = _HookView(tracer)
    return tracers


def conntrack_count(topo: Topology, check: Check) -> int:
    """Conntrack entries in all the lab's nodes; the stage emptied them, so these are the check's."""
    del check  # every node counts: NAT happens on a router the expectations may not name
    return sum(len(conntrack.entries(_ns(topo, node))) for node in topo.nodes)
