"""Pictures of a topology: Graphviz DOT (rendered by ``dot``/``sfdp``) and Mermaid.

Small labs are drawn by ``dot`` with one cluster per node (its bridges
inside).  Past :data:`LARGE` nodes a layered layout turns into a hairball,
so large labs are drawn force-directed by ``sfdp`` without clusters: each
bridge is a hub its ports' links radiate from, and every edge carries the
two interface names in a small font (a 300-host star stays readable).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

from labctl.errors import LabctlError
from labctl.topology.model import Topology

LARGE = 40
"""Nodes past which the force-directed layout is used."""
PICTURE_TYPES = ("svg", "png", "pdf")


def bridge_of(topo: Topology, node: str, ifname: str) -> str | None:
    """The bridge (of that node) ``ifname`` is a port of, if any."""
    for bridge, config in topo.nodes[node].bridges.items():
        if ifname in config.ports:
            return bridge
    return None


def addresses(topo: Topology, node: str, ifname: str, sep: str = "\\n") -> str:
    cfg = topo.nodes[node].interfaces.get(ifname)
    return sep.join(str(a) for a in cfg.addresses) if cfg else ""


def quote(text: str) -> str:
    """A DOT string literal: quotes and stray backslashes escaped, the ``\\n`` line breaks we put in kept."""
    return '"' + re.sub(r"\\(?!n)", r"\\\\", text).replace('"', '\\"') + '"'


def end_vertex(topo: Topology, node: str, ifname: str) -> str:
    """The vertex a link end attaches to: the bridge hub for a bridge port, else the node."""
    port_of = bridge_of(topo, node, ifname)
    return f"{node}:{port_of}" if port_of else node


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
    return _dot_large(topo) if len(topo.nodes) > LARGE else _dot_small(topo)


def _dot_small(topo: Topology) -> str:
    lines = [
        f"graph {quote(topo.name)} {{",
        "  graph [rankdir=LR, fontname=Helvetica];",
        "  node [fontname=Helvetica];",
        "  edge [fontname=Helvetica, fontsize=10];",
    ]
    for name, node in topo.nodes.items():
        shape = "box3d" if node.kind == "vm" else "box"
        lines.append(f"  subgraph {quote('cluster_' + name)} {{ label={quote(f'{name} ({node.kind})')};")
        lines.append(f"    {quote(name)} [shape={shape}, label={quote(_node_label(topo, name))}];")
        for bridge in node.bridges:
            label = f"{bridge}\\n{addresses(topo, name, bridge)}".rstrip("\\n")
            lines.append(
                f"    {quote(name + ':' + bridge)} [shape=ellipse, style=filled, fillcolor=lightblue,"
                f" label={quote(label)}];"
            )
            lines.append(f"    {quote(name)} -- {quote(name + ':' + bridge)};")
        lines.append("  }")
    for link in topo.links:
        a, b = link.ends
        kind = "tap" if topo.is_tap_link(link) else "veth"
        label = (
            f"{a.interface}{_tc_note(topo, a.node, a.interface)} {addresses(topo, a.node, a.interface)}"
            f" — {kind} — {b.interface}{_tc_note(topo, b.node, b.interface)} {addresses(topo, b.node, b.interface)}"
        )
        style = "dashed" if kind == "tap" else "solid"
        ends = (end_vertex(topo, a.node, a.interface), end_vertex(topo, b.node, b.interface))
        lines.append(f"  {quote(ends[0])} -- {quote(ends[1])} [label={quote(label)}, style={style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_large(topo: Topology) -> str:
    """Force-directed: bridges as hubs, nodes as small boxes, interface names on the edges."""
    lines = [
        f"graph {quote(topo.name)} {{",
        "  graph [layout=sfdp, overlap=prism, overlap_scaling=2, splines=false, outputorder=edgesfirst,"
        ' fontname=Helvetica, K=1.5, repulsiveforce=2, sep="+8"];',
        "  node [fontname=Helvetica, fontsize=10, shape=box, style=filled, fillcolor=white, height=0.3];",
        "  edge [fontname=Helvetica, fontsize=7, fontcolor=gray30, color=gray50];",
    ]
    for name, node in topo.nodes.items():
        shape = "box3d" if node.kind == "vm" else "box"
        label = name
        own = [addresses(topo, name, i, " ") for i in node.interfaces if i not in node.bridges]
        if len(own) == 1 and own[0]:
            label += f"\\n{own[0]}"
        lines.append(f"  {quote(name)} [shape={shape}, label={quote(label)}];")
        for bridge in node.bridges:
            hub = f"{name}:{bridge}"
            label = f"{name}:{bridge}\\n{addresses(topo, name, bridge, ' ')}".rstrip("\\n")
            size = 0.5 + 0.15 * math.sqrt(len(node.bridges[bridge].ports))  # room for its spokes
            lines.append(
                f"  {quote(hub)} [shape=doublecircle, width={size:.2f}, fillcolor=lightblue, fontsize=11,"
                f" label={quote(label)}];"
            )
            lines.append(f"  {quote(name)} -- {quote(hub)} [penwidth=2];")
    for link in topo.links:
        a, b = link.ends
        style = "dashed" if topo.is_tap_link(link) else "solid"
        ends = (end_vertex(topo, a.node, a.interface), end_vertex(topo, b.node, b.interface))
        label = f"{a.interface}–{b.interface}"
        lines.append(f"  {quote(ends[0])} -- {quote(ends[1])} [label={quote(label)}, style={style}];")
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
            port_of = bridge_of(topo, end.node, end.interface)
            ends.append(f"{end.node}_{port_of}" if port_of else end.node)
        arrow = "-.-" if topo.is_tap_link(link) else "---"
        a_tc, b_tc = _tc_note(topo, a.node, a.interface), _tc_note(topo, b.node, b.interface)
        lines.append(f"  {ends[0]} {arrow}|{a.interface}{a_tc} - {b.interface}{b_tc}| {ends[1]}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, fmt: str) -> bytes:
    """DOT text rendered to svg/png/pdf bytes by Graphviz (the graph's own ``layout`` picks the engine)."""
    if fmt not in PICTURE_TYPES:
        raise LabctlError(f"unknown picture type {fmt!r}; use {', '.join(PICTURE_TYPES)}")
    if shutil.which("dot") is None:
        raise LabctlError("rendering needs Graphviz's 'dot' (apt-get install graphviz); or write .dot/.mmd")
    result = subprocess.run(["dot", f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=300)
    if result.returncode != 0:
        raise LabctlError(f"graphviz failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def picture_type(output: str) -> str:
    return os.path.splitext(output)[1].lstrip(".").lower()


def write(topo: Topology, output: str) -> None:
    """Write .dot/.gv or .mmd text, or render .svg/.png/.pdf through Graphviz."""
    ext = picture_type(output)
    if ext in ("dot", "gv"):
        text = dot(topo)
    elif ext in ("mmd", "mermaid"):
        text = mermaid(topo)
    elif ext in PICTURE_TYPES:
        with open(output, "wb") as f:
            f.write(render(dot(topo), ext))
        return
    else:
        raise LabctlError(f"{output}: unknown picture type; use .svg, .png, .pdf, .dot or .mmd")
    with open(output, "w") as f:
        f.write(text)
