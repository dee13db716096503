"""The build's device steps: stale interfaces out, bridges, veth pairs and taps in, then each interface set up.

Every change of a node goes into its netlink batch (:class:`labctl.kernel.links.NodeLinks`); ``up`` commits
the batches between steps that depend on each other.  In a namespace this run created each device is born
with the ifindex :mod:`labctl.lab.ifindex` chose, so nothing is looked up; on a converge what matches is kept.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from labctl.kernel.links import LinkAttrs
from labctl.names import FALLBACK_DEVICES

if TYPE_CHECKING:
    from labctl.lab.builder import Builder


def remove_stale_interfaces(builder: Builder) -> None:
    for node, handle in builder.handles.items():
        if node in builder.fresh:
            continue
        wanted = builder.wanted_interfaces[node]
        for ifname in list(handle.index):
            if ifname not in wanted and ifname in handle.index and ifname not in FALLBACK_DEVICES:
                handle.delete(ifname)
                builder.changes.append(f"{node}: removed {ifname}")
                handle.refresh()  # deleting a veth end also removes its peer


def bridges(builder: Builder) -> None:
    for node, spec in builder.topo.nodes.items():
        for bridge, config in spec.bridges.items():
            builder.handles[node].add_bridge(
                bridge,
                builder.attrs(node, bridge),
                stp=config.stp,
                ageing_time=config.ageing_time,
                forward_delay=config.forward_delay,
                index=None if bridge in builder.handles[node].index else builder.ifindex.next(node),
            )


def links(builder: Builder) -> None:
    for link, a, b in builder.link_ends:
        if builder.is_tap(a, b):
            for end in (a, b):
                if end.interface not in builder.handles[end.node].index:
                    builder.handles[end.node].add_tap(end.interface)
            continue
        main, other = builder.near_and_far(a, b)
        h_main, h_other = builder.handles[main.node], builder.handles[other.node]
        have_main, have_other = main.interface in h_main.index, other.interface in h_other.index
        if have_main and have_other:
            continue
        if have_main:
            h_main.delete(main.interface)
        if have_other:
            h_other.delete(other.interface)
        if not (main.node in builder.fresh and other.node in builder.fresh):  # a converge: say so
            builder.changes.append(f"{main.node}: created link {main} — {other}")
        main_attrs = builder.attrs(main.node, main.interface, link)
        if (main.node, main.interface) in builder.bond_members:  # a bond takes only a member that is down
            main_attrs = dataclasses.replace(main_attrs, master=None)
        index = builder.ifindex.next(main.node)
        # the kernel honours a peer's ifindex only beside the near end's own (veth_newlink): when the near end
        # is in a namespace this run did not create, the peer's number is the kernel's, looked up by name later
        peer_index = builder.ifindex.next(other.node, unlike=index) if index is not None else None
        h_main.add_veth(
            main.interface,
            main_attrs,
            other.interface,
            builder.ns[other.node],
            builder.attrs(other.node, other.interface, link),
            index=index,
            peer_index=peer_index,
        )
        if peer_index is not None:
            h_other.index[other.interface] = peer_index


def configure(builder: Builder) -> None:
    for node, handle in builder.handles.items():
        if node not in builder.fresh:
            handle.ensure_indexes(builder.wanted_interfaces[node])  # a dump only if this run made some
        for ifname in builder.lower_first(node):
            if ifname in builder.topo.nodes[node].bridges:
                continue
            link = builder.link_at.get((node, ifname))
            attrs = builder.attrs(node, ifname, link) if ifname != "lo" else LinkAttrs()
            if node not in builder.fresh and link is not None:
                attrs = dataclasses.replace(attrs, detach=True)  # a port taken off a bridge's list
            handle.configure(ifname, attrs)
