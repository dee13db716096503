"""Traffic into a running lab, with the lab's knowledge filled in.

A user writes ``IP(dst='10.0.0.2')/UDP(dport=5000)`` and expects the frame to
leave the right interface with the node's MAC, the next hop's MAC and the
interface's source address -- what the node's own stack would have chosen.
The route comes from the node's kernel (``ip route get``), the next hop's MAC
from the lab's own interfaces (no ARP from the root namespace).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from labctl.errors import LabctlError, LabNotUpError
from labctl.kernel import netns
from labctl.kernel.links import NodeLinks
from labctl.topology.model import Topology
from labctl.traffic.expr import ExprError, fill_defaults, parse_packet, to_bytes


class TrafficError(LabctlError):
    """A packet expression or a destination that cannot be used in this lab."""

    exit_code = 2


@dataclass(frozen=True)
class PreparedFrame:
    namespace: str
    ifname: str
    frame: bytes
    summary: str


def node_namespace(topo: Topology, node: str) -> str:
    if node not in topo.nodes:
        raise TrafficError(f"lab {topo.name} has no node {node!r} (nodes: {', '.join(sorted(topo.nodes))})")
    name = netns.namespace_name(topo.name, node)
    if not netns.exists(name):
        raise LabNotUpError(f"lab {topo.name} is not up (no namespace for node {node}); run labctl up first")
    return name


def multicast_mac(address: str) -> str | None:
    """The Ethernet group address of an IP multicast address (RFC 1112 / RFC 2464), None for unicast."""
    ip = ipaddress.ip_address(address)
    if not ip.is_multicast:
        return None
    if ip.version == 6:
        return "33:33:" + ":".join(f"{b:02x}" for b in ip.packed[-4:])
    low = int(ip) & 0x7FFFFF
    return "01:00:5e:" + ":".join(f"{b:02x}" for b in low.to_bytes(3, "big"))


def eui64_mac(address: str) -> str | None:
    """The MAC an IPv6 link-local address was derived from (EUI-64, ``ff:fe`` in the middle), or None.

    A route ``via fe80::...`` names the router by its link-local address, which the lab file never
    lists; the kernel derives it from the MAC, so the MAC is read back from it.
    """
    ip = ipaddress.ip_address(address)
    if ip.version != 6 or not ip.is_link_local or ip.packed[11:13] != b"\xff\xfe":
        return None
    iid = ip.packed[8:]
    mac = bytes([iid[0] ^ 0x02, iid[1], iid[2], iid[5], iid[6], iid[7]])
    return ":".join(f"{b:02x}" for b in mac)


def mac_of_address(topo: Topology, address: str) -> str | None:
    """The MAC of the lab interface that owns ``address`` (None when no lab node has it).

    Multicast destinations map to their group MAC, and an EUI-64 link-local next hop to its MAC.
    """
    group = multicast_mac(address) or eui64_mac(address)
    if group is not None:
        return group
    ip = ipaddress.ip_address(address)
    for node, spec in topo.nodes.items():
        for ifname, cfg in spec.interfaces.items():
            if any(iface.ip == ip for iface in cfg.addresses):
                with NodeLinks(netns.namespace_name(topo.name, node)) as handle:
                    links = handle.links()
                return links[ifname].mac if ifname in links else None
    return None


def _route(handle: NodeLinks, dst: str) -> tuple[str | None, str | None, str | None]:
    """(out interface, gateway, preferred source) the node's kernel picks for ``dst`` (IPv4 or IPv6)."""
    try:
        return handle.route_to(dst)  # the family follows the address
    except OSError:  # unreachable, no route: the kernel's refusal, as pyroute2's NetlinkError was
        return None, None, None


def prepare_injection(topo: Topology, node: str, ifname: str | None, expr: str) -> PreparedFrame:
    """Parse ``expr`` safely and complete it from the lab; nothing is sent yet."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    namespace = node_namespace(topo, node)
    try:
        pkt = parse_packet(expr)
    except ExprError as exc:
        raise TrafficError(f"{exc}\n{exc.caret()}") from exc
    with NodeLinks(namespace) as handle:
        links = handle.links()
        # the outer network layer decides the route: IPv4 or IPv6, whichever comes first
        layer = next((x for x in pkt.layers() if x in (IP, IPv6)), None)
        dst = pkt[layer].fields.get("dst") if layer is not None else None
        gateway = src_ip = None
        if dst is not None:
            routed_if, gateway, src_ip = _route(handle, str(dst))
            ifname = ifname or routed_if
    candidates = [name for name in links if name != "lo"]
    if ifname is None:
        if len(candidates) != 1:
            raise TrafficError(f"node {node} has interfaces {', '.join(candidates)}: name one as {node}:IFACE")
        ifname = candidates[0]
    if ifname not in links:
        raise TrafficError(f"node {node} has no interface {ifname!r} (it has: {', '.join(candidates)})")
    if src_ip is None:
        cfg = topo.nodes[node].interfaces.get(ifname)
        version = 6 if layer is IPv6 else 4
        own = [a.ip for a in cfg.addresses if a.version == version] if cfg else []
        src_ip = str(own[0]) if own else None
    next_hop = gateway or (str(dst) if dst is not None else None)
    dst_mac = mac_of_address(topo, next_hop) if next_hop else None
    if Ether in pkt and pkt[Ether].fields.get("dst") is not None:
        dst_mac = None  # the user's own choice is kept by fill_defaults
    full = fill_defaults(pkt, src_mac=links[ifname].mac, dst_mac=dst_mac, src_ip=src_ip)
    try:
        frame = to_bytes(full, expr)
    except ExprError as exc:
        raise TrafficError(str(exc)) from exc
    return PreparedFrame(namespace=namespace, ifname=ifname, frame=frame, summary=full.summary())
