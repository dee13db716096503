"""Path pictures and graph layouts, from hand-made paths (no root, no lab built)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from labctl.lab.trace.model import Ending, PacketPath, Segment, Stage
from labctl.lab.trace.picture import path_dot, path_svg, write_pictures
from labctl.topology import generate, graph
from labctl.topology.model import Topology

needs_graphviz = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")


def _topo(lab: generate.Lab) -> Topology:
    return Topology.model_validate({k: v for k, v in lab.items() if k != "checks"})


def _forwarded_and_dropped() -> PacketPath:
    """h1 → r1 (forwarded) → h2, dropped NO_SOCKET in h2's UDP: the linear lab's closed port."""
    return PacketPath(
        index=0,
        skb=0xFFFF0001,
        role="injected",
        kind="IPv4 UDP",
        segments=[
            Segment("h1", None, None, [Stage("dev_queue_xmit", "h1", "eth0")]),
            Segment(
                "r1",
                "eth0",
                ("h1", "eth0"),
                [
                    Stage("netif_rx", "r1", "eth0"),
                    Stage("PREROUTING", "r1", "eth0", "inferred"),
                    Stage("routing", "r1", "eth0", "counted", "forward → eth1"),
                    Stage("FORWARD", "r1", "eth0", "counted", "filter FORWARD #1 +1"),
                    Stage("dev_queue_xmit", "r1", "eth1"),
                ],
            ),
            Segment("h2", "eth0", ("r1", "eth1"), [Stage("netif_rx", "h2", "eth0"), Stage("UDP", "h2", "eth0")]),
        ],
        ending=Ending(
            "dropped",
            "h2",
            "eth0",
            "UDP",
            "NO_SOCKET",
            "__udp4_lib_rcv+0x4bc/0xd00",
            "__udp4_lib_rcv",
            counters={"Udp.NoPorts": 1},
        ),
    )


def test_path_dot_numbers_the_hops_and_says_where_and_why_it_stopped() -> None:
    topo = _topo(generate.linear(2, name="pic"))
    text = path_dot(topo, _forwarded_and_dropped(), walks={"r1": ["ip:raw:PREROUTING", "ip:filter:FORWARD"]})
    assert '"h1" -> "r1"' in text and "1: eth0 → eth0" in text
    assert '"r1" -> "h2"' not in text  # r1 is linked to r2 in this lab, not to h2: no made-up edge
    assert "✗ dropped: NO_SOCKET" in text and "__udp4_lib_rcv+0x4bc/0xd00" in text and "in h2 UDP" in text
    assert "FORWARD (filter FORWARD #1 +1)" in text  # a netfilter chain it passed, with its rule
    assert "ip:filter:FORWARD" in text  # the exact walk, when the evidence has one
    assert '"r2" [shape=box, label="r2", color=gray55' in text  # nodes off the path are drawn grey


@needs_graphviz
def test_path_pictures_render_as_svg_and_png(tmp_path: Path) -> None:
    topo = _topo(generate.linear(1, name="pic"))
    path = _forwarded_and_dropped()
    svg = path_svg(topo, path, title="closed port")
    assert svg.startswith("<svg") and "NO_SOCKET" in svg and "closed port" in svg
    written = write_pictures(topo, [path, path], str(tmp_path / "path.png"))
    assert written == [str(tmp_path / "path.png"), str(tmp_path / "path-2.png")]
    assert all(Path(name).read_bytes().startswith(b"\x89PNG") for name in written)


@needs_graphviz
def test_a_path_in_a_300_node_lab_draws_only_its_neighbourhood() -> None:
    topo = _topo(generate.star(300, name="big"))
    path = PacketPath(
        0,
        1,
        "injected",
        [
            Segment("h1", None, None, [Stage("dev_queue_xmit", "h1", "eth0")]),
            Segment("sw", "eth1", ("h1", "eth0"), [Stage("bridge", "sw", "eth1", "inferred", "br0: forward → eth2")]),
            Segment("h2", "eth0", ("sw", "eth2"), [Stage("netif_rx", "h2", "eth0")]),
        ],
        Ending("consumed", "h2", "eth0", "ICMP", function="icmp_rcv", detail="handled by ICMP"),
    )
    text = path_dot(topo, path)
    assert "+298 nodes off the path" in text
    start = time.monotonic()
    assert "<svg" in path_svg(topo, path)
    assert time.monotonic() - start < 10


@needs_graphviz
def test_graph_of_300_nodes_uses_a_layout_that_scales(tmp_path: Path) -> None:
    topo = _topo(generate.star(300, name="big"))
    text = graph.dot(topo)
    assert "layout=sfdp" in text and "shape=doublecircle" in text  # the bridge is the hub
    assert 'label="eth0–eth300"' in text  # interface names on their edges
    out = tmp_path / "star.svg"
    start = time.monotonic()
    graph.write(topo, str(out))
    assert time.monotonic() - start < 30
    assert out.read_text().count('class="node"') == 302  # 301 nodes + the br0 hub
    clos = tmp_path / "clos.svg"
    graph.write(_topo(generate.clos(4, 8, 6, name="clos")), str(clos))
    assert clos.read_text().count('class="node"') == 4 + 8 + 8 + 48  # spines, leaves, leaf bridges, hosts
    small = graph.dot(_topo(generate.linear(1, name="small")))
    assert "layout=sfdp" not in small and "cluster_h1" in small
