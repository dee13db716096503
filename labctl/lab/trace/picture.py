"""A packet's path drawn over the topology: the hops it took, the stages and netfilter
chains it passed in each node, and where it stopped and why.

One picture per packet (``labctl trace -o``, ``labctl run --html``).  The
topology is drawn as ``labctl graph`` draws it (bridges as hubs); the path
is overlaid: hop edges are numbered arrows in the packet's colour, each node
the packet visited lists its stages in the notes' words (bold: traced on
this skb, plain: counted, grey italics: inferred; netfilter hooks in orange),
and a note hangs off the node where the story ended -- the drop reason and
its location, or what consumed the packet.  Large labs show only the nodes
on the path and their neighbours, so a 300-node lab still gives a small,
readable picture.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence

from labctl.lab.trace.model import Ending, PacketPath, Stage
from labctl.topology import graph
from labctl.topology.model import Topology

HOOK_STAGES = frozenset({"PREROUTING", "LOCAL_IN", "FORWARD", "LOCAL_OUT", "POSTROUTING"})
HIDDEN = frozenset({"driver xmit", "tx done"})
"""Transmit stages the hop arrow already says (shown when they carry a detail: rc, qdisc)."""
DETAILED = frozenset({"backlog", "AF_PACKET tap", "socket", "napi_gro_receive", "bridge", "tx done"})
HOOK_COLOUR = "#c0580a"
PATH_COLOUR = "#1f5fbf"
DROP_COLOUR = "#c62828"
DONE_COLOUR = "#2e7d32"
SMALL = 40
"""Labs up to this many nodes are drawn whole; larger ones only around the path."""
STAGES_PER_LINE = 3


def _html(text: str) -> str:
    return html.escape(text, quote=True)


def stage_words(stage: Stage) -> str:
    """A stage as the picture names it (``routing: forward → eth1``, ``out eth1``, ``backlog (cpu0)``)."""
    if stage.name == "routing":
        return f"routing: {stage.detail}" if stage.detail else "routing"
    if stage.name == "dev_queue_xmit":
        return f"out {stage.device}" if stage.device else "dev_queue_xmit"
    if stage.detail and (stage.name in DETAILED or (stage.name in HOOK_STAGES and stage.evidence == "counted")):
        return f"{stage.name} ({stage.detail})"
    return stage.name


def _stage_markup(stage: Stage) -> str:
    text = _html(stage_words(stage))
    if stage.name in HOOK_STAGES:
        text = f'<FONT COLOR="{HOOK_COLOUR}">{text}</FONT>'
    if stage.evidence == "traced":
        return f"<B>{text}</B>"
    if stage.evidence == "inferred":
        return f'<I><FONT COLOR="gray45">{text}</FONT></I>'
    return text


def _visible(stages: Iterable[Stage]) -> list[Stage]:
    return [s for s in stages if s.node is not None and not (s.name in HIDDEN and not s.detail)]


def ending_words(ending: Ending) -> list[str]:
    """The note at the end of the path: what happened, where, and why."""
    if ending.fate == "dropped":
        lines = [f"✗ dropped: {ending.reason or '?'}", f"at {ending.location or ending.function or '?'}"]
        if ending.stage or ending.node:
            lines.append(f"in {ending.node or '?'} {ending.stage or ''}".rstrip())
    else:
        mark = {"delivered": "✓", "consumed": "✓", "queued": "■"}.get(ending.fate, "…")
        lines = [f"{mark} {ending.fate}" + (f" in {ending.node}" if ending.node else "")]
        if ending.detail or ending.function:
            lines.append(ending.detail or ending.function or "")
    counters = ", ".join(f"{k} {v:+d}" for k, v in ending.counters.items())
    if counters:
        lines.append(counters)
    return lines


def _wrap(words: list[str], width: int = 60) -> list[str]:
    lines: list[str] = []
    for word in words:
        while len(word) > width:
            lines.append(word[:width])
            word = "  " + word[width:]
        lines.append(word)
    return lines


class _Scene:
    """Which topology vertices and links the picture shows."""

    def __init__(self, topo: Topology, visited: set[str]) -> None:
        self.topo = topo
        nodes = set(topo.nodes)
        if len(nodes) > SMALL:
            near = set(visited)
            for link in topo.links:
                a, b = link.ends
                if a.node in visited or b.node in visited:
                    near |= {a.node, b.node}
            nodes = near if len(near) <= 3 * SMALL else set(visited)
        self.nodes = nodes
        self.hidden = len(topo.nodes) - len(nodes)


def path_dot(
    topo: Topology,
    path: PacketPath,
    *,
    title: str = "",
    walks: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """DOT of one packet's path over the topology.

    ``walks``: per node, the exact netfilter walk (``ip:filter:INPUT`` ...)
    recorded for this packet (a check's NFLOG evidence), drawn in the node
    beside its stages.
    """
    walks = walks or {}
    per_node: dict[str, list[Stage]] = {}
    for stage in _visible(path.stages):
        per_node.setdefault(stage.node or "", []).append(stage)
    visited = {s.node for s in path.segments if s.node is not None} | set(walks)
    if path.ending.node:
        visited.add(path.ending.node)
    scene = _Scene(topo, visited)
    label = title or f"packet {path.index + 1}" + (f" ({path.kind})" if path.kind else "")
    lines = [
        f"digraph {graph.quote('path')} {{",
        f"  graph [rankdir=LR, fontname=Helvetica, labelloc=t, label={graph.quote(label)}, nodesep=0.3];",
        "  node [fontname=Helvetica, fontsize=10];",
        "  edge [fontname=Helvetica, fontsize=9, arrowhead=none, color=gray55];",
    ]
    for name in topo.nodes:
        if name not in scene.nodes:
            continue
        node = topo.nodes[name]
        lines.append(_node_line(name, node.kind, per_node.get(name, []), walks.get(name, ()), name in visited))
        for bridge in node.bridges:
            hub = f"{name}:{bridge}"
            lines.append(
                f"  {graph.quote(hub)} [shape=ellipse, style=filled, fillcolor=lightblue, label={graph.quote(bridge)}];"
            )
            lines.append(f"  {graph.quote(name)} -> {graph.quote(hub)} [penwidth=2];")
    hops = _hops(path)
    for link in topo.links:
        a, b = link.ends
        if a.node not in scene.nodes or b.node not in scene.nodes:
            continue
        ends = {(a.node, a.interface), (b.node, b.interface)}
        taken = [(n, hop) for n, hop in enumerate(hops, 1) if set(hop) == ends]
        style = "dashed" if topo.is_tap_link(link) else "solid"
        if not taken:
            va, vb = graph.end_vertex(topo, a.node, a.interface), graph.end_vertex(topo, b.node, b.interface)
            lines.append(
                f"  {graph.quote(va)} -> {graph.quote(vb)} [style={style},"
                f" label={graph.quote(f'{a.interface} – {b.interface}')}];"
            )
            continue
        for number, ((fn, fi), (tn, ti)) in taken:
            vf, vt = graph.end_vertex(topo, fn, fi), graph.end_vertex(topo, tn, ti)
            lines.append(
                f"  {graph.quote(vf)} -> {graph.quote(vt)} [style={style}, color={graph.quote(PATH_COLOUR)},"
                f" penwidth=3, arrowhead=normal, fontcolor={graph.quote(PATH_COLOUR)},"
                f" label={graph.quote(f'{number}: {fi} → {ti}')}];"
            )
    lines += _ending_lines(path.ending, scene)
    if scene.hidden:
        note = graph.quote(f"+{scene.hidden} nodes off the path")
        lines.append(f"  hidden [shape=plaintext, fontcolor=gray40, label={note}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _hops(path: PacketPath) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    return [
        (segment.hop_from, (segment.node, segment.device))
        for segment in path.segments
        if segment.hop_from is not None and segment.node is not None and segment.device is not None
    ]


def _node_line(name: str, kind: str, stages: list[Stage], walk: Sequence[str], visited: bool) -> str:
    shape = "box3d" if kind == "vm" else "box"
    if not visited:
        return f"  {graph.quote(name)} [shape={shape}, label={graph.quote(name)}, color=gray55, fontcolor=gray35];"
    rows = [f'<TR><TD ALIGN="LEFT"><B>{_html(name)}</B> <FONT COLOR="gray40">({_html(kind)})</FONT></TD></TR>']
    for start in range(0, len(stages), STAGES_PER_LINE):
        chunk = " → ".join(_stage_markup(s) for s in stages[start : start + STAGES_PER_LINE])
        lead = "→ " if start else ""
        rows.append(f'<TR><TD ALIGN="LEFT">{lead}{chunk}</TD></TR>')
    if walk:
        rows.append(f'<TR><TD ALIGN="LEFT"><FONT COLOR="{HOOK_COLOUR}"><B>netfilter:</B></FONT></TD></TR>')
        for start in range(0, len(walk), STAGES_PER_LINE):
            chunk = " → ".join(_html(step) for step in walk[start : start + STAGES_PER_LINE])
            rows.append(f'<TR><TD ALIGN="LEFT"><FONT COLOR="{HOOK_COLOUR}">{chunk}</FONT></TD></TR>')
    table = '<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="1">' + "".join(rows) + "</TABLE>"
    return (
        f"  {graph.quote(name)} [shape={shape}, style=filled, fillcolor={graph.quote('#eef4ff')},"
        f" color={graph.quote(PATH_COLOUR)}, penwidth=2, label=<{table}>];"
    )


def _ending_lines(ending: Ending, scene: _Scene) -> list[str]:
    if ending.node is None or ending.node not in scene.nodes:
        return []
    colour = {"dropped": DROP_COLOUR, "delivered": DONE_COLOUR, "consumed": DONE_COLOUR}.get(ending.fate, "gray35")
    fill = graph.quote("#fff4f4" if ending.fate == "dropped" else "#f2fbf2")
    node = graph.quote(ending.node)
    rows = "".join(
        f'<TR><TD ALIGN="LEFT">{"<B>" + _html(line) + "</B>" if i == 0 else _html(line)}</TD></TR>'
        for i, line in enumerate(_wrap(ending_words(ending)))
    )
    table = f'<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="1">{rows}</TABLE>'
    return [
        f"  ending [shape=note, style=filled, fillcolor={fill},"
        f" color={graph.quote(colour)}, fontcolor={graph.quote(colour)}, penwidth=2, label=<{table}>];",
        f"  {node} -> ending [color={graph.quote(colour)}, style=dashed, penwidth=2, arrowhead=normal];",
    ]


def path_svg(topo: Topology, path: PacketPath, **kwargs: object) -> str:
    """The picture as SVG text (inline-able in a page: the XML prologue is left out)."""
    svg = graph.render(path_dot(topo, path, **kwargs), "svg").decode()  # type: ignore[arg-type]
    return svg[svg.index("<svg") :] if "<svg" in svg else svg


def write_pictures(topo: Topology, paths: Sequence[PacketPath], output: str, titles: Sequence[str] = ()) -> list[str]:
    """One file per path: ``output`` for the first, ``NAME-2.EXT``... for the others; the names written."""
    import os

    ext = graph.picture_type(output)
    stem, dot_ext = os.path.splitext(output)
    written = []
    for position, path in enumerate(paths):
        name = output if position == 0 else f"{stem}-{position + 1}{dot_ext}"
        title = titles[position] if position < len(titles) else ""
        text = path_dot(topo, path, title=title)
        data = text.encode() if ext in ("dot", "gv") else graph.render(text, ext)
        with open(name, "wb") as f:
            f.write(data)
        written.append(name)
    return written
