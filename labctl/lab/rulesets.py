"""The build's netfilter step: each node's iptables, ebtables and nftables rules, converged to the file.

python-iptables (0.3 s to import) is loaded only when a node has rules or had tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.lab import nftables as nft_converge

if TYPE_CHECKING:
    from labctl.lab.builder import Builder


def netfilter(builder: Builder) -> None:
    """The topology's own rules; a converge starts them from scratch (counters reset).

    A namespace without tables has nothing to flush: checked by reading
    /proc and one netlink dump, not by python-iptables and ``nft``.
    """
    for node, spec in builder.topo.nodes.items():
        ns = builder.ns[node]
        has_iptables, has_ebtables = builder.tables.get(node, (False, False))
        if not (spec.iptables or spec.ebtables or has_iptables or has_ebtables):
            continue
        from labctl.kernel import ebtables, iptables

        if has_iptables:
            iptables.flush(ns)
        if has_ebtables:
            ebtables.flush(ns)
        if spec.iptables:
            iptables.apply_rules(ns, spec.iptables)
        if spec.ebtables:
            ebtables.apply_rules(ns, spec.ebtables)
    nftables(builder)


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
