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

from labctl.errors import LabctlError, LabStateError
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
        raise LabStateError(f"lab {topo.name} is not up (no namespace for node {node}); run labctl up first")
    return name


def mac_of_address(topo: Topology, address: str) -> str | None:
    """The MAC of the lab interface that owns ``address`` (None when no lab node has it)."""
    ip = ipaddress.ip_address(address)
    for node, spec in topo.nodes.items():
        for ifname, cfg in spec.interfaces.items():
            if any(iface.ip == ip for iface in cfg.addresses):
                with NodeLinks(netns.namespace_name(topo.name, node)) as handle:
                    links = handle.links()
                return links[ifname].mac if ifname in links else None
    return None


def _route(handle: NodeLinks, dst: str) -> tuple[str | None, str | None, str | None]:
    """(out interface, gateway, preferred source) the node's kernel picks for ``dst``."""
    try:
        return handle.route_to(dst)
    except OSError:  # unreachable, no route: the kernel's refusal, as pyroute2's NetlinkError was
        return None, None, None


def prepare_injection(topo: Topology, node: str, ifname: str | None, expr: str) -> PreparedFrame:
    """Parse ``expr`` safely and complete it from the lab; nothing is sent yet."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    namespace = node_namespace(topo, node)
    try:
        pkt = parse_packet(expr)
    except ExprError as exc:
        raise TrafficError(f"{exc}\n{exc.caret()}") from exc
    with NodeLinks(namespace) as handle:
        links = handle.links()
        dst = pkt[IP].fields.get("dst") if IP in pkt else None
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
        src_ip = str(cfg.addresses[0].ip) if cfg and cfg.addresses else None
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
