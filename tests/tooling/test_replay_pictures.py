"""Recorded check evidence told as paths and drawn, as ``run --html`` does (no root: golden files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from labctl.evidence.model import Evidence
from labctl.lab.labfile import load_lab
from labctl.lab.trace.picture import path_dot
from labctl.lab.trace.replay import evidence_paths, walks_for
from labctl.topology.model import Topology

ROOT = Path(__file__).parents[2]
GOLDEN = ROOT / "tests" / "expect" / "golden"


def _recorded(name: str) -> tuple[Topology, Evidence]:
    lab = name.split(".")[0]
    topo = load_lab(str(ROOT / "labs" / f"{lab}.yaml"))[0]
    return topo, Evidence.from_dict(json.loads((GOLDEN / f"{name}.json").read_text())["evidence"])


def test_the_closed_port_drop_is_placed_in_the_server_with_its_hop() -> None:
    topo, evidence = _recorded("rx-path.closed-port")
    paths = evidence_paths(topo, evidence)
    dropped = [p for p in paths if p.ending.fate == "dropped"]
    assert dropped, [p.ending for p in paths]
    path = dropped[0]
    assert (path.ending.node, path.ending.reason, path.ending.function) == ("server", "NO_SOCKET", "__udp4_lib_rcv")
    assert path.role == "injected" and path.nodes[:2] == ["client", "server"]
    assert any(s.hop_from == ("client", "eth0") for s in path.segments)
    text = path_dot(topo, path)
    assert "✗ dropped: NO_SOCKET" in text and '"client" -> "server"' in text


def test_a_forwarded_packet_gets_the_walk_netfilter_recorded_on_the_router() -> None:
    topo, evidence = _recorded("netfilter-hooks.order-forwarded")
    paths = evidence_paths(topo, evidence)
    walks = walks_for(evidence, paths)
    paired = [(p, w) for p, w in zip(paths, walks, strict=True) if w]
    assert paired, "the recorded walks pair with the packets that crossed the router"
    path, walk = paired[0]
    node, steps = next(iter(walk.items()))
    assert node in path.nodes and any(step.endswith(":FORWARD") for step in steps)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_every_golden_check_draws(tmp_path: Path) -> None:
    from labctl.lab.trace.picture import path_svg

    for golden in sorted(GOLDEN.glob("*.json")):
        topo, evidence = _recorded(golden.stem)
        for path in evidence_paths(topo, evidence, limit=3):
            assert path_svg(topo, path).startswith("<svg"), golden.stem
