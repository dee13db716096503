"""The build's first step: one namespace per node (stale ones removed), its IPv6 and DAD sysctls, and what an
existing one already holds (tables to flush, nft tables to converge).

The namespace-wide sysctls are written before any link exists, so links inherit them; on a converge the
interfaces that already exist are set one by one, since all/default may not reach them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.kernel import netns, nft, sysctl
from labctl.kernel.links import NodeLinks
from labctl.kernel.netlink import Netlink

if TYPE_CHECKING:
    from labctl.lab.builder import Builder

IPV6_OFF = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
IPV6_ON = {"net.ipv6.conf.all.disable_ipv6": "0", "net.ipv6.conf.default.disable_ipv6": "0"}
DAD_OFF = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
DAD_ON = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "1"}
"""accept_dad per node (``dad:``); 'all' stays 0 (the kernel uses the larger of all and the interface's)."""


def namespaces(builder: Builder, created: list[str]) -> None:
    for name in netns.list_labctl(builder.lab):
        if name not in builder.ns.values():
            netns.remove(name)  # a node that left the topology (and its veths' peers with it)
    for node, name in builder.ns.items():
        if not netns.exists(name):
            netns.create(name)
            created.append(name)
            builder.fresh.add(node)
        wanted = IPV6_ON if builder.topo.nodes[node].ipv6 else IPV6_OFF
        if builder.topo.nodes[node].ipv6:
            wanted = {**wanted, **(DAD_ON if builder.topo.nodes[node].dad else DAD_OFF)}
        with netns.entered(name):  # one switch for all of it: this runs once per node
            sysctl.write_here(wanted)  # before any link exists, so links inherit it
            builder.handles[node] = handle = NodeLinks(name, Netlink(), batch=True)
            if node not in builder.fresh:
                # all/default may not reach existing interfaces: a converge sets those that differ
                off = wanted["net.ipv6.conf.all.disable_ipv6"] == "1"
                differ = [name for name, disabled in handle.ipv6_disabled().items() if disabled != off]
                sysctl.write_here({f"net.ipv6.conf.{name}.disable_ipv6": "1" if off else "0" for name in differ})
                if builder.topo.nodes[node].ipv6:  # dad: applies to the interfaces that exist already too
                    dad = DAD_ON["net.ipv6.conf.default.accept_dad"] if builder.topo.nodes[node].dad else "0"
                    sysctl.write_here(
                        {f"net.ipv6.conf.{name}.accept_dad": dad for name in handle.ipv6_disabled() if name != "lo"}
                    )
                builder.tables[node] = (_has_iptables_here(), nft.bridge_tables_here())
                builder.nft_tables[node] = nft.tables_here()
                builder.ip6_tables[node] = _has_iptables_here("ip6")
        if node in builder.fresh:
            handle.index = {"lo": 1}


def _has_iptables_here(family: str = "ip") -> bool:
    """Whether the thread's namespace has any legacy xtables table of ``family`` (else there is nothing to flush)."""
    try:
        with open(f"/proc/thread-self/net/{'ip6' if family == 'ip6' else 'ip'}_tables_names") as f:
            return bool(f.read().split())
    except FileNotFoundError:
        return False
