"""The build's netfilter step: each node's iptables, ip6tables, ebtables and nftables rules, converged to the file.

python-iptables (0.3 s to import) is loaded only when a node has rules or had tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.lab import nftables as nft_converge

if TYPE_CHECKING:
    from labctl.lab.builder import Builder


def netfilter(builder: Builder) -> None:
    """The topology's own rules, each tool converged to the file (:mod:`labctl.kernel.rulesync`).

    The file's rules are compared with the node's, not flushed and re-added: an unchanged file leaves
    the rules, their counters and the firewall alone (a second ``up`` changes nothing); a changed one is
    replaced and reported (``r1: iptables replaced``).  A namespace without tables has nothing to compare:
    that is known from /proc and one netlink dump (namespaces.py), not by python-iptables and ``nft``.
    """
    for node, spec in builder.topo.nodes.items():
        ns = builder.ns[node]
        has_iptables, has_ebtables = builder.tables.get(node, (False, False))
        if spec.iptables or has_iptables:
            from labctl.kernel import iptables

            _report(builder, node, "iptables", iptables.converge(ns, spec.iptables))
        if spec.ip6tables or builder.ip6_tables.get(node, False):
            from labctl.kernel import iptables

            _report(builder, node, "ip6tables", iptables.converge(ns, spec.ip6tables, "ip6"))
        # a node whose nftables: has no ebtables: owns its bridge tables (nft converges them below)
        if spec.ebtables or (has_ebtables and spec.nftables is None):
            from labctl.kernel import ebtables

            _report(builder, node, "ebtables", ebtables.converge(ns, spec.ebtables))
    nftables(builder)


def _report(builder: Builder, node: str, tool: str, done: str | None) -> None:
    """``r1: iptables replaced`` for ``up`` to print; a node this run created was not converged but built."""
    if done is not None and node not in builder.fresh:
        builder.traffic_changes.append(f"{node}: {tool} {done}")


def nftables(builder: Builder) -> None:
    """Each node's nft ruleset, converged after ebtables (whose tables it leaves alone)."""
    for node, spec in builder.topo.nodes.items():
        tables = builder.nft_tables.get(node, [])
        if spec.nftables is None and not tables:
            continue
        keep_ebtables = bool(spec.ebtables) or (spec.nftables is None)
        done = nft_converge.converge(builder.ns[node], spec.nftables, tables, keep_ebtables)
        if done is not None:
            builder.traffic_changes.append(f"{node}: nftables {done}")
