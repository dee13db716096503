"""The build's first step: one namespace per node (stale ones removed), its IPv6 and DAD sysctls, and what an
existing one already holds (tables to flush, nft tables to converge).

The namespace-wide sysctls are written before any link exists, so links inherit them; on a converge the
interfaces that already exist are set one by one, since all/default may not reach them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.kernel import netns, nft, sysctl, xtnames
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
            builder.handles[node] = handle = NodeLinks(name, Netlink(), batch=True)
            if node in builder.fresh:
                sysctl.write_here(wanted)  # before any link exists, so links inherit it
            else:
                _converge_ipv6(builder, node, handle, wanted)
                # both families on every converge, whatever the state says: a table the lab never made
                # (ip6tables run in a node by hand) must still be noticed and converged away
                ip, ip6 = xtnames.families_with_tables_here()
                tables = nft.tables_here()  # one dump: ebtables-nft's tables are its bridge-family ones
                builder.tables[node] = (ip, any(family == "bridge" for family, _ in tables))
                builder.nft_tables[node] = tables
                builder.ip6_tables[node] = ip6
        if node in builder.fresh:
            handle.index = {"lo": 1}


def _converge_ipv6(builder: Builder, node: str, handle: NodeLinks, wanted: dict[str, str]) -> None:
    """An existing namespace's IPv6 switches: each interface's ``disable_ipv6`` (what the kernel acts on) to the file.

    all/default may not reach existing interfaces (writing a value a switch already has changes nothing),
    so the interfaces that differ are set one by one.  The namespace-wide all/default themselves only
    decide what a *new* interface inherits; writing them costs a lookup of /proc/sys/net/ipv6, which with
    a thousand namespaces on the host is ~0.2-0.3 ms (see :func:`labctl.kernel.sysctl.write_here`) -- most
    of a converging node's cost.  So an IPv6-off node that already holds every interface it should, each
    with IPv6 off, is left unwritten and recorded; :func:`ipv6_after_converge` writes all/default (and
    fixes the interfaces) of any such node where this run created an interface after all.
    """
    spec = builder.topo.nodes[node]
    off = wanted["net.ipv6.conf.all.disable_ipv6"] == "1"
    disabled = handle.ipv6_disabled()  # one dump; it also refreshes the handle's indexes
    differ = [ifname for ifname, value in disabled.items() if value != off]
    if spec.ipv6 or differ or not builder.wanted_interfaces[node] <= handle.index.keys():
        sysctl.write_here(wanted)
    else:
        builder.ipv6_unwritten[node] = dict(handle.index)
    sysctl.write_here({f"net.ipv6.conf.{ifname}.disable_ipv6": "1" if off else "0" for ifname in differ})
    if spec.ipv6:  # dad: applies to the interfaces that exist already too
        dad = DAD_ON["net.ipv6.conf.default.accept_dad"] if spec.dad else "0"
        sysctl.write_here({f"net.ipv6.conf.{ifname}.accept_dad": dad for ifname in disabled if ifname != "lo"})


def ipv6_after_converge(builder: Builder, read: set[str]) -> None:
    """The nodes :func:`_converge_ipv6` left unwritten where this run created an interface after all.

    Any interface made since (a veth end recreated because its far end was gone, a virtual interface
    replaced) shows as a name whose ifindex is new -- the kernel never reuses one while the namespace
    lives.  Those nodes get all/default written and each interface's switch converged before ``up``
    returns: the lab's interfaces end every ``up`` with IPv6 as the file says, whatever was changed by
    hand.  What is not repaired: a ``default`` changed by hand in a node where this run creates nothing --
    it decides only what an interface made *later* inherits (by hand, or a program a check runs), and
    reading it back in every node would cost the lookup the skip saves.  ``read``: nodes whose name ->
    index cache the settle has just refreshed (its last link dump).
    """
    for node, before in builder.ipv6_unwritten.items():
        handle = builder.handles[node]
        if (handle.index if node in read else handle.refresh()) == before:
            continue
        with netns.entered(builder.ns[node]):
            sysctl.write_here(IPV6_OFF)
            differ = [ifname for ifname, value in handle.ipv6_disabled().items() if not value]
            sysctl.write_here({f"net.ipv6.conf.{ifname}.disable_ipv6": "1" for ifname in differ})
