"""What pictures of a topology say about virtual interfaces, tunnels and bridge settings (topology/kinds.py).

Kept beside graph.py so the layouts stay there: these only turn the lab
file's kinds into labels and overlay edges.
"""

from __future__ import annotations

from labctl.topology.kinds import PORT_FLAGS, PortSettings, virtual_interfaces
from labctl.topology.model import BridgeConfig, InterfaceConfig, Topology

_PORT_DEFAULTS = PortSettings()


def kind_label(name: str, cfg: InterfaceConfig) -> str:
    """``vx0 vxlan vni 42 → 10.0.0.2``: a virtual interface as a picture names it."""
    if cfg.kind == "vlan":
        vid = cfg.vlan_parent_and_id(name)[1]
        return f"{name} vlan {vid}"
    extra = {
        "macvlan": f"{cfg.mode or 'bridge'}",
        "ipvlan": f"{cfg.mode or 'l3'}",
        "vxlan": f"vni {cfg.vni} → {cfg.remote or cfg.group or 'any'}:{cfg.port or 4789}",
        "bond": f"{cfg.mode or 'balance-rr'} [{', '.join(cfg.members)}]",
        "vrf": f"table {cfg.table} [{', '.join(cfg.members)}]",
        "gre": f"{cfg.local} → {cfg.remote}",
        "ipip": f"{cfg.local} → {cfg.remote}",
    }.get(str(cfg.kind), "")
    return f"{name} {cfg.kind} {extra}".rstrip()


def bridge_settings(config: BridgeConfig) -> list[str]:
    """The bridge's options and port flags that differ from the kernel's defaults, one phrase each."""
    words = [key for key in ("vlan_filtering",) if getattr(config, key)]
    words += [key for key in ("nf_call_iptables", "nf_call_ip6tables", "nf_call_arptables") if getattr(config, key)]
    if not config.mcast_snooping:
        words.append("mcast_snooping off")
    for port, settings in config.port_settings.items():
        flags = [
            f"{flag} {'on' if getattr(settings, flag) else 'off'}"
            for flag in PORT_FLAGS
            if getattr(settings, flag) != getattr(_PORT_DEFAULTS, flag)
        ]
        if settings.pvid is not None:
            flags.append(f"pvid {settings.pvid}")
        if settings.vids:
            flags.append(f"vids {','.join(map(str, settings.vids))}")
        if flags:
            words.append(f"{port}: {' '.join(flags)}")
    words += [f"fdb {e.mac}→{e.port}{' sticky' if e.sticky else ''}" for e in config.fdb]
    return words


def tunnels(topo: Topology) -> list[tuple[tuple[str, str], tuple[str, str], str]]:
    """Tunnel ends that meet: a vxlan/gre/ipip whose remote is the local address of the same kind elsewhere.

    Drawn as one overlay edge each (``vni 42`` for a vxlan), beside the
    cables they ride on.
    """
    ends: dict[tuple[str, str, int | None], tuple[str, str]] = {}
    for name, node in topo.nodes.items():
        for ifname, cfg in virtual_interfaces(node.interfaces).items():
            if cfg.kind in ("vxlan", "gre", "ipip") and cfg.local is not None:
                ends[(str(cfg.kind), cfg.local, cfg.vni)] = (name, ifname)
    found = []
    for (kind, local, vni), (name, ifname) in ends.items():
        cfg = topo.nodes[name].interfaces[ifname]
        far = ends.get((kind, cfg.remote or "", vni))
        if far is not None and (name, ifname) < far and topo.nodes[far[0]].interfaces[far[1]].remote == local:
            found.append(((name, ifname), far, f"vni {vni}" if kind == "vxlan" else kind))
    return found


def mermaid_id(name: str) -> str:
    """A Mermaid node id from an interface name (eth0.10 -> eth0_10: a dot is not allowed in an id)."""
    return name.replace(".", "_").replace("-", "_")
