"""Pictures of a topology: Graphviz DOT (rendered by ``dot``) and Mermaid."""

from __future__ import annotations

import os
import shutil
import subprocess

from labctl.errors import LabctlError
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


def _bridge_of(topo: Topology, node: str, ifname: str) -> str | None:
    for bridge, config in topo.nodes[node].bridges.items():
        if ifname in config.ports:
            return bridge
    return None


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


def _mid(name: str) -> str:
    """A Mermaid node id from an interface name (eth0.10 -> eth0_10: a dot is not allowed in an id)."""
    return name.replace(".", "_").replace("-", "_")


def _addresses(topo: Topology, node: str, ifname: str) -> str:
    cfg = topo.nodes[node].interfaces.get(ifname)
    return "\\n".join(str(a) for a in cfg.addresses) if cfg else ""


def dot(topo: Topology) -> str:
    lines = [f'graph "{topo.name}" {{', "  graph [rankdir=LR, fontname=Helvetica];", "  node [fontname=Helvetica];"]
    for name, node in topo.nodes.items():
        shape = "box3d" if node.kind == "vm" else "box"
        lines.append(f'  subgraph "cluster_{name}" {{ label="{name} ({node.kind})";')
        lines.append(f'    "{name}" [shape={shape}, label="{name}"];')
        for bridge, config in node.bridges.items():
            label = "\\n".join([bridge, *bridge_settings(config), _addresses(topo, name, bridge)]).rstrip("\\n")
            lines.append(f'    "{name}:{bridge}" [shape=ellipse, style=filled, fillcolor=lightblue, label="{label}"];')
            lines.append(f'    "{name}" -- "{name}:{bridge}";')
        for ifname, cfg in virtual_interfaces(node.interfaces).items():
            label = "\\n".join([kind_label(ifname, cfg), _addresses(topo, name, ifname)]).rstrip("\\n")
            style = "shape=component, style=filled, fillcolor=lightyellow"
            lines.append(f'    "{name}:{ifname}" [{style}, label="{label}"];')
            below = cfg.vlan_parent_and_id(ifname)[0] if cfg.kind == "vlan" else cfg.underlay()
            master = _bridge_of(topo, name, ifname)
            above = f"{name}:{master}" if master else name
            lines.append(f'    "{above}" -- "{name}:{ifname}";')
            if below is not None and below in node.interfaces and node.interfaces[below].kind is not None:
                lines.append(f'    "{name}:{below}" -- "{name}:{ifname}" [style=dotted];')
        lines.append("  }")
    for link in topo.links:
        a, b = link.ends
        ends = []
        for end in (a, b):
            port_of = _bridge_of(topo, end.node, end.interface)
            ends.append(f'"{end.node}:{port_of}"' if port_of else f'"{end.node}"')
        kind = "tap" if topo.is_tap_link(link) else "veth"
        label = (
            f"{a.interface} {_addresses(topo, a.node, a.interface)}"
            f" — {kind} — {b.interface} {_addresses(topo, b.node, b.interface)}"
        )
        style = "dashed" if kind == "tap" else "solid"
        lines.append(f'  {ends[0]} -- {ends[1]} [label="{label}", style={style}];')
    for (node_a, if_a), (node_b, if_b), label in tunnels(topo):
        lines.append(f'  "{node_a}:{if_a}" -- "{node_b}:{if_b}" [label="{label}", style=dotted, color=darkorange];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def mermaid(topo: Topology) -> str:
    lines = ["graph LR"]
    for name, node in topo.nodes.items():
        lines.append(f'  {name}["{name} ({node.kind})"]')
        for bridge, config in node.bridges.items():
            settings = "".join(f"<br/>{w}" for w in bridge_settings(config))
            lines.append(f'  {name}_{bridge}(("{bridge}{settings}"))')
            lines.append(f"  {name} --- {name}_{bridge}")
        for ifname, cfg in virtual_interfaces(node.interfaces).items():
            lines.append(f'  {name}_{_mid(ifname)}[/"{kind_label(ifname, cfg)}"/]')
            master = _bridge_of(topo, name, ifname)
            above = f"{name}_{master}" if master else name
            lines.append(f"  {above} --- {name}_{_mid(ifname)}")
    for link in topo.links:
        a, b = link.ends
        ends = []
        for end in (a, b):
            port_of = _bridge_of(topo, end.node, end.interface)
            ends.append(f"{end.node}_{port_of}" if port_of else end.node)
        arrow = "-.-" if topo.is_tap_link(link) else "---"
        lines.append(f"  {ends[0]} {arrow}|{a.interface} - {b.interface}| {ends[1]}")
    for (node_a, if_a), (node_b, if_b), label in tunnels(topo):
        lines.append(f"  {node_a}_{_mid(if_a)} -.-|{label}| {node_b}_{_mid(if_b)}")
    return "\n".join(lines) + "\n"


def write(topo: Topology, output: str) -> None:
    """Write .dot/.gv or .mmd text, or render .svg/.png/.pdf through Graphviz's ``dot``."""
    ext = os.path.splitext(output)[1].lstrip(".").lower()
    if ext in ("dot", "gv"):
        text = dot(topo)
    elif ext in ("mmd", "mermaid"):
        text = mermaid(topo)
    elif ext in ("svg", "png", "pdf"):
        if shutil.which("dot") is None:
            raise LabctlError("rendering needs Graphviz's 'dot' (apt-get install graphviz); or write .dot/.mmd")
        result = subprocess.run(["dot", f"-T{ext}", "-o", output], input=dot(topo), text=True, capture_output=True)
        if result.returncode != 0:
            raise LabctlError(f"dot failed: {result.stderr.strip()}")
        return
    else:
        raise LabctlError(f"{output}: unknown picture type; use .svg, .png, .pdf, .dot or .mmd")
    with open(output, "w") as f:
        f.write(text)
