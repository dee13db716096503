"""Pictures of a topology: Graphviz DOT (rendered by ``dot``) and Mermaid."""

from __future__ import annotations

import os
import shutil
import subprocess

from labctl.errors import LabctlError
from labctl.topology.model import Topology


def _bridge_of(topo: Topology, node: str, ifname: str) -> str | None:
    for bridge, config in topo.nodes[node].bridges.items():
        if ifname in config.ports:
            return bridge
    return None


def _addresses(topo: Topology, node: str, ifname: str) -> str:
    cfg = topo.nodes[node].interfaces.get(ifname)
    return "\\n".join(str(a) for a in cfg.addresses) if cfg else ""


def _tc_note(topo: Topology, node: str, ifname: str) -> str:
    """`` (tc: htb, clsact, 2 filters)`` for an interface with traffic control, else ''."""
    cfg = topo.nodes[node].interfaces.get(ifname)
    tc = cfg.traffic_control if cfg else None
    if tc is None:
        return ""
    parts: list[str] = [tc.qdisc.kind] if tc.qdisc else []
    parts += [hook for hook in ("clsact", "ingress") if getattr(tc, hook)]
    if tc.filters:
        parts.append(f"{len(tc.filters)} filter{'s' if len(tc.filters) > 1 else ''}")
    return f" (tc: {', '.join(parts)})"


def _node_label(topo: Topology, name: str) -> str:
    return f"{name}\\nnftables" if topo.nodes[name].nftables is not None else name


def dot(topo: Topology) -> str:
    lines = [f'graph "{topo.name}" {{', "  graph [rankdir=LR, fontname=Helvetica];", "  node [fontname=Helvetica];"]
    for name, node in topo.nodes.items():
        shape = "box3d" if node.kind == "vm" else "box"
        lines.append(f'  subgraph "cluster_{name}" {{ label="{name} ({node.kind})";')
        lines.append(f'    "{name}" [shape={shape}, label="{_node_label(topo, name)}"];')
        for bridge in node.bridges:
            label = f"{bridge}\\n{_addresses(topo, name, bridge)}".rstrip("\\n")
            lines.append(f'    "{name}:{bridge}" [shape=ellipse, style=filled, fillcolor=lightblue, label="{label}"];')
            lines.append(f'    "{name}" -- "{name}:{bridge}";')
        lines.append("  }")
    for link in topo.links:
        a, b = link.ends
        ends = []
        for end in (a, b):
            port_of = _bridge_of(topo, end.node, end.interface)
            ends.append(f'"{end.node}:{port_of}"' if port_of else f'"{end.node}"')
        kind = "tap" if topo.is_tap_link(link) else "veth"
        label = (
            f"{a.interface}{_tc_note(topo, a.node, a.interface)} {_addresses(topo, a.node, a.interface)}"
            f" — {kind} — {b.interface}{_tc_note(topo, b.node, b.interface)} {_addresses(topo, b.node, b.interface)}"
        )
        style = "dashed" if kind == "tap" else "solid"
        lines.append(f'  {ends[0]} -- {ends[1]} [label="{label}", style={style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def mermaid(topo: Topology) -> str:
    lines = ["graph LR"]
    for name, node in topo.nodes.items():
        nft = ", nftables" if node.nftables is not None else ""
        lines.append(f'  {name}["{name} ({node.kind}{nft})"]')
        for bridge in node.bridges:
            lines.append(f"  {name}_{bridge}(({bridge}))")
            lines.append(f"  {name} --- {name}_{bridge}")
    for link in topo.links:
        a, b = link.ends
        ends = []
        for end in (a, b):
            port_of = _bridge_of(topo, end.node, end.interface)
            ends.append(f"{end.node}_{port_of}" if port_of else end.node)
        arrow = "-.-" if topo.is_tap_link(link) else "---"
        a_tc, b_tc = _tc_note(topo, a.node, a.interface), _tc_note(topo, b.node, b.interface)
        lines.append(f"  {ends[0]} {arrow}|{a.interface}{a_tc} - {b.interface}{b_tc}| {ends[1]}")
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
