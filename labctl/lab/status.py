"""What a lab looks like on the kernel right now (not what the file asked for).

One shape for every caller: a lab is a dict of its nodes, each node its
interfaces (with the ``peer`` at the other end of the cable), bridges and
routes.  Reading a node costs one namespace switch, one netlink socket and
four dumps, so a thousand-node lab is read in a fraction of a second.
"""

from __future__ import annotations

from typing import Any

from labctl.kernel import netns
from labctl.kernel.links import PEER_ALIAS, LinkInfo, Netlink, NodeLinks
from labctl.lab import relay, state
from labctl.names import lab_name_problem


def running_labs() -> list[str]:
    """Labs with state or with namespaces left (a crashed lab still shows up)."""
    names = set(state.known_labs())
    for ns in netns.list_labctl():
        parts = netns.split_namespace_name(ns)
        if parts and lab_name_problem(parts[0]) is None:
            names.add(parts[0])
    return sorted(names)


def lab_status(lab: str, nodes: list[str] | None = None) -> dict[str, Any]:
    """The lab as the kernel has it; ``nodes`` limits it to those nodes (same shape, fewer entries)."""
    from labctl.errors import LabNotUpError  # the one "not up" error (exit 2)

    namespaces = netns.list_labctl(lab)
    saved = state.load(lab)
    if not namespaces and saved is None:
        raise LabNotUpError(f"lab {lab} is not up (labs up: {', '.join(running_labs()) or 'none'})")
    if nodes is not None:
        wanted = {netns.namespace_name(lab, node) for node in nodes}
        unknown = sorted(set(nodes) - {netns.split_namespace_name(ns)[1] for ns in namespaces})  # type: ignore[index]
        if unknown:
            raise LabNotUpError(f"lab {lab} has no node {', '.join(unknown)} up")
        namespaces = [ns for ns in namespaces if ns in wanted]
    relays = relay.find(lab)
    found: dict[str, tuple[str, dict[str, LinkInfo], list[dict[str, Any]]]] = {}
    fdb: dict[str, list[dict[str, Any]]] = {}
    traffic: dict[str, tuple[dict[int, Any], list[str]]] = {}
    with netns.walking(namespaces) as entering:
        for ns in entering:  # the thread is inside ns: its sockets are opened without another switch
            node = netns.split_namespace_name(ns)[1]  # type: ignore[index]
            with NodeLinks(ns, Netlink()) as handle:
                found[node] = (ns, handle.links(), handle.routes())
                if any(info.kind == "bridge" for info in found[node][1].values()):
                    fdb[node] = handle.static_fdb()
                    if any(i.kind == "bridge" and i.details.get("vlan_filtering") for i in found[node][1].values()):
                        for port, vlans in handle.port_vlans().items():
                            if port in found[node][1]:
                                found[node][1][port].port["vlans"] = vlans
                traffic[node] = _traffic_control(handle)
    result: dict[str, Any] = {}
    for node, (ns, links, routes) in found.items():
        result[node] = {
            "namespace": ns,
            # vars, not dataclasses.asdict: its deep copies cost 1.3 s at 1000 nodes
            "interfaces": [
                {**vars(info), "peer": _peer(info, found), "tc": traffic[node][0].get(info.index)}
                for info in links.values()
            ],
            "nftables": traffic[node][1],
            "bridges": {
                name: sorted(i.name for i in links.values() if i.master == name)
                for name, info in links.items()
                if info.kind == "bridge"
            },
            # a bridge's options and its ports' flags are in each interface's "details" and "port"
            "fdb": fdb.get(node, []),
            "routes": routes,
        }
    expected = set(saved.nodes) if saved else set(result)
    if nodes is not None:
        expected &= set(nodes)
    return {
        "lab": lab,
        "file": saved.file if saved else None,
        "state": (saved.status if saved else "orphaned") if expected <= set(result) else "incomplete",
        "missing_nodes": sorted(expected - set(result)),
        "nodes": result,
        "relays": {vm: {"pid": pid, "alive": pid in relays} for vm, pid in (saved.relays if saved else {}).items()},
    }


def _traffic_control(handle: NodeLinks) -> tuple[dict[int, Any], list[str]]:
    """The node's tc per ifindex and its nf_tables tables ("inet filter"): two dumps, called inside the namespace."""
    from labctl.kernel import nft
    from labctl.kernel.counters import qdisc_kinds
    from labctl.lab import tc

    tables = [f"{family} {name}" for family, name in nft.tables_here()]  # the caller is inside the namespace
    if all(kind in tc._DEFAULT_QDISCS for _, kind in qdisc_kinds(handle)):  # what status_here leaves out
        return {}, tables  # nothing set: no pyroute2 socket (1 ms a node, a second at 1000 nodes)
    return tc.status_here(handle.ipr), tables


def _peer(info: LinkInfo, found: dict[str, tuple[str, dict[str, LinkInfo], list[dict[str, Any]]]]) -> str | None:
    """``node:interface`` at the other end of this link end, or None (not a link, or not verified).

    The name comes from the ifalias ``up`` wrote; the kernel confirms it
    where it can: a veth's IFLA_LINK must be the index of that far end, and
    the far end's must be ours.  A far node outside ``found`` (status of one
    node) is taken from the alias alone.
    """
    if not info.alias or not info.alias.startswith(PEER_ALIAS):
        return None
    peer = info.alias[len(PEER_ALIAS) :]
    node, _, ifname = peer.partition(":")
    if node not in found:
        return peer
    far = found[node][1].get(ifname)
    if far is None:
        return None
    if info.link_index is not None and (far.index != info.link_index or far.link_index != info.index):
        return None
    return peer
