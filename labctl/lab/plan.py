"""What a topology asks of each node and interface, worked out once before anything is built.

Pure lookups over the model (no kernel): which link an interface is an end of, which bridge, bond or vrf
it is a port of, every interface a node will hold, the attributes each is born with, which end of a veth
the request creates, the order interfaces are configured in and the tap links a VM relay serves.  A lab
has thousands of links, so the build's steps ask these questions of dictionaries, not of the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.kernel import netns
from labctl.kernel.links import PEER_ALIAS, LinkAttrs

if TYPE_CHECKING:  # the model costs 0.1 s to import; down never needs it
    from labctl.topology.model import Endpoint, Link, Topology


class Plan:
    """The topology's lookups, per (node, interface)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.lab = topo.name
        self.ns = {node: netns.namespace_name(self.lab, node) for node in topo.nodes}
        # lookups the steps make per interface, computed once (labs have thousands of links)
        self.link_at: dict[tuple[str, str], Link] = {}
        self.link_ends: list[tuple[Link, Endpoint, Endpoint]] = [(link, *link.ends) for link in topo.links]
        """Each link with its two ends, parsed once: ``Link.ends`` makes two pydantic models per call."""
        self.far_end: dict[tuple[str, str], Endpoint] = {}
        for link, a, b in self.link_ends:
            self.link_at[(a.node, a.interface)] = self.link_at[(b.node, b.interface)] = link
            self.far_end[(a.node, a.interface)], self.far_end[(b.node, b.interface)] = b, a
        self.port_of: dict[tuple[str, str], str] = {
            (node, port): bridge
            for node, spec in topo.nodes.items()
            for bridge, config in spec.bridges.items()
            for port in config.ports
        }
        self.bond_members: set[tuple[str, str]] = set()
        for node, spec in topo.nodes.items():  # bond and vrf members: their master, like a bridge port's
            for name, cfg in spec.interfaces.items():
                if cfg.kind in ("bond", "vrf"):
                    for member in cfg.members:
                        self.port_of[(node, member)] = name
                        if cfg.kind == "bond":
                            self.bond_members.add((node, member))
        self.wanted_interfaces: dict[str, set[str]] = {
            node: {"lo"} | set(spec.bridges) | {n for n, cfg in spec.interfaces.items() if cfg.kind is not None}
            for node, spec in topo.nodes.items()
        }
        for node, ifname in self.link_at:
            self.wanted_interfaces[node].add(ifname)

    def is_tap(self, a: Endpoint, b: Endpoint) -> bool:
        """:meth:`Topology.is_tap_link` of the link between ``a`` and ``b``, on ends already parsed."""
        return self.topo.nodes[a.node].kind == "vm" or self.topo.nodes[b.node].kind == "vm"

    def bridge_of(self, end: Endpoint) -> str | None:
        return self.port_of.get((end.node, end.interface))

    def attrs(self, node: str, ifname: str, link: Link | None = None) -> LinkAttrs:
        cfg = self.topo.nodes[node].interfaces.get(ifname)
        master = self.port_of.get((node, ifname)) if link is not None else None
        mtu = (cfg.mtu if cfg else None) or (link.mtu if link else None)
        alias = f"{PEER_ALIAS}{self.far_end[(node, ifname)]}" if link is not None else None
        if cfg is None:
            return LinkAttrs(mtu=mtu, master=master, alias=alias)
        return LinkAttrs(
            mac=cfg.mac, mtu=mtu, txqueuelen=cfg.txqueuelen, promisc=cfg.promisc, up=cfg.up, master=master, alias=alias
        )

    def near_and_far(self, a: Endpoint, b: Endpoint) -> tuple[Endpoint, Endpoint]:
        """Which end of a veth the request creates: a bridge port, so its master is set in the same request."""
        return (b, a) if self.bridge_of(b) and not self.bridge_of(a) else (a, b)

    def lower_first(self, node: str) -> list[str]:
        """The node's interfaces, each after the one it sits on: an 802.1Q device cannot be set up while its
        parent is down (ENETDOWN), so a vlan, macvlan or vxlan is configured after its parent or underlay."""
        spec = self.topo.nodes[node]
        wanted = self.wanted_interfaces[node]
        if all(cfg.kind is None for cfg in spec.interfaces.values()):
            return sorted(wanted)  # nothing sits on anything (most nodes): every depth is 0

        def lower(ifname: str) -> str | None:
            cfg = spec.interfaces.get(ifname)
            if cfg is None or cfg.kind is None:
                return None
            return cfg.vlan_parent_and_id(ifname)[0] if cfg.kind == "vlan" else cfg.underlay()

        def depth(ifname: str) -> int:
            seen = {ifname}
            low = lower(ifname)
            while low is not None and low in wanted and low not in seen:
                seen.add(low)
                low = lower(low)
            return len(seen) - 1

        return sorted(wanted, key=lambda name: (depth(name), name))

    def relay_pairs(self) -> dict[str, list[tuple[str, str, str, str]]]:
        """Each tap link is served by the relay of its (first) VM end."""
        pairs: dict[str, list[tuple[str, str, str, str]]] = {}
        for link in self.topo.links:
            if not self.topo.is_tap_link(link):
                continue
            a, b = link.ends
            vm_end, other = (a, b) if self.topo.nodes[a.node].kind == "vm" else (b, a)
            pairs.setdefault(vm_end.node, []).append(
                (self.ns[vm_end.node], vm_end.interface, self.ns[other.node], other.interface)
            )
        return pairs
