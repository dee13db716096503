"""labctl.topology.generate: golden files, and every shape loads with the loader ``up`` uses.

Regenerate the golden files after an intended change with
``LABCTL_UPDATE_GOLDEN=1 pytest tests/tooling/test_generate.py`` and read the diff.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from labctl.lab.labfile import load_lab
from labctl.topology import generate
from labctl.topology.generate import GenerateError

GOLDEN = Path(__file__).parent / "golden"

CASES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "star-3": (lambda: generate.star(3, name="star-3"), "labctl generate star --hosts 3"),
    "linear-3": (lambda: generate.linear(3, name="linear-3"), "labctl generate linear --routers 3"),
    "tree-2-2": (lambda: generate.tree(2, 2, name="tree-2-2"), "labctl generate tree --depth 2 --fanout 2"),
    "clos-2-2-2": (
        lambda: generate.clos(2, 2, 2, name="clos-2-2-2"),
        "labctl generate clos --spines 2 --leaves 2 --hosts-per-leaf 2",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_golden_file(case: str) -> None:
    make, command = CASES[case]
    text = generate.to_yaml(make(), command)
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("LABCTL_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"regenerate with LABCTL_UPDATE_GOLDEN=1 if {golden.name} should change"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_file_loads_like_up_loads_it(case: str) -> None:
    lab, _ = load_lab(str(GOLDEN / f"{case}.yaml"))
    assert lab.name == case
    assert lab.checks and lab.checks[0].traffic[0].ping is not None


def _load(tmp_path: Path, lab: dict[str, Any]) -> Any:
    file = tmp_path / f"{lab['name']}.yaml"
    file.write_text(generate.to_yaml(lab, "test"))
    return load_lab(str(file))[0]


@pytest.mark.parametrize(
    "lab",
    [
        generate.star(1),
        generate.star(300),  # past a /24: the segment grows to /23
        generate.linear(1),
        generate.linear(12),
        generate.tree(1, 4),
        generate.tree(3, 3),
        generate.clos(1, 1, 1),
        generate.clos(4, 8, 3),
    ],
    ids=lambda lab: lab["description"].split(":")[0] + "-" + str(len(lab["topology"]["nodes"])),
)
def test_other_sizes_load(tmp_path: Path, lab: dict[str, Any]) -> None:
    topo = _load(tmp_path, lab)
    assert len(topo.nodes) == len(lab["topology"]["nodes"])


def test_star_segment_grows_with_hosts() -> None:
    lab = generate.star(300)
    last = lab["topology"]["nodes"]["h300"]["interfaces"]["eth0"]["addresses"][0]
    assert ipaddress.ip_interface(last).network == ipaddress.ip_network("10.0.0.0/23")


def test_linear_routers_know_every_subnet() -> None:
    """Each router reaches every link's subnet: connected or by a static route, never both."""
    routers = 5
    nodes = generate.linear(routers)["topology"]["nodes"]
    subnets = {f"10.0.{k}.0/24" for k in range(1, routers + 2)}
    for i in range(1, routers + 1):
        node = nodes[f"r{i}"]
        connected = {str(ipaddress.ip_interface(c["addresses"][0]).network) for c in node["interfaces"].values()}
        routed = {r["dst"] for r in node.get("routes", [])}
        assert connected | routed == subnets and not connected & routed


def test_clos_paths_between_two_leaves_use_one_spine_both_ways() -> None:
    nodes = generate.clos(3, 4, 1)["topology"]["nodes"]

    def spine_of(leaf: int, other: int) -> str:
        (route,) = [r for r in nodes[f"leaf{leaf}"]["routes"] if r["dst"] == f"10.0.{other}.0/24"]
        return str(route["via"]).split(".")[1]

    for a in range(1, 5):
        for b in range(1, 5):
            if a != b:
                assert spine_of(a, b) == spine_of(b, a)
    assert {spine_of(1, b) for b in (2, 3, 4)} == {"1", "2", "3"}  # spread over the spines


def test_tree_is_numbered_depth_first_like_mininet() -> None:
    lab = generate.tree(3, 2)
    links = [tuple(link["endpoints"]) for link in lab["topology"]["links"]]
    assert ("s2:eth0", "s1:eth1") in links and ("s3:eth0", "s2:eth1") in links and ("s5:eth0", "s1:eth2") in links
    assert ("h1:eth0", "s3:eth1") in links and ("h8:eth0", "s7:eth2") in links


def test_yaml_is_plain_and_round_trips() -> None:
    lab = generate.clos(2, 2, 1)
    assert yaml.safe_load(generate.to_yaml(lab, "x")) == lab


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: generate.star(0), "--hosts must be between 1 and"),
        (lambda: generate.linear(0), "--routers must be between 1 and 253"),
        (lambda: generate.linear(254), "--routers must be between 1 and 253"),
        (lambda: generate.tree(0, 2), "--depth must be between 1 and"),
        (lambda: generate.tree(13, 2), "--depth must be between 1 and"),
        (lambda: generate.tree(8, 4), "make 87381 nodes"),
        (lambda: generate.clos(0, 1, 1), "--spines must be between 1 and 254"),
        (lambda: generate.clos(1, 255, 1), "--leaves must be between 1 and 254"),
        (lambda: generate.clos(1, 1, 254), "--hosts-per-leaf must be between 1 and 253"),
        (lambda: generate.clos(10, 200, 30), "at most 5000"),
        (lambda: generate.star(2, name="no/slash"), "is not a lab name"),
    ],
)
def test_bad_sizes_are_bad_input(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(GenerateError, match=message) as info:
        make()
    assert info.value.exit_code == 2
