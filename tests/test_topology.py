"""The topology model and loader, without a kernel: every bad input names file, line and key."""

from __future__ import annotations

import pytest

from labctl.errors import LabFileError
from labctl.topology.loader import parse_topology

GOOD = """\
name: demo
topology:
  nodes:
    host:
      bridges:
        br0: {ports: [veth1]}
      interfaces:
        br0: {addresses: [192.168.9.1/24]}
    c1:
      interfaces:
        eth0: {addresses: [192.168.9.2/24], mac: "02:00:00:00:00:01", mtu: 1400}
      routes:
        - {dst: default, via: 192.168.9.1}
  links:
    - endpoints: ["c1:eth0", "host:veth1"]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(LabFileError) as info:
        parse_topology(text, "lab.yaml")
    return [str(p) for p in info.value.problems]


def test_good_topology_parses() -> None:
    topo = parse_topology(GOOD, "lab.yaml")
    assert set(topo.nodes) == {"host", "c1"}
    assert topo.link_interfaces("host") == {"veth1": (0, topo.links[0].ends[0])}
    assert topo.interface_names("c1") == {"eth0", "lo"}


def test_unknown_key_names_line_and_key() -> None:
    text = GOOD.replace("mtu: 1400}", "mtu: 1400, colour: red}")
    assert problems(text) == ["lab.yaml:11: topology.nodes.c1.interfaces.eth0.colour: unknown key 'colour'"]


def test_bad_cidr() -> None:
    found = problems(GOOD.replace("192.168.9.2/24", "192.168.9.300/24"))
    assert len(found) == 1 and found[0].startswith("lab.yaml:11: topology.nodes.c1.interfaces.eth0.addresses[0]")


def test_duplicate_address() -> None:
    found = problems(GOOD.replace("192.168.9.2/24", "192.168.9.1/24"))
    assert found == [
        "lab.yaml:11: topology.nodes.c1.interfaces.eth0.addresses[0]: address 192.168.9.1 is already used by host:br0"
    ]


def test_link_to_unknown_node() -> None:
    found = problems(GOOD.replace('"c1:eth0", "host:veth1"', '"c9:eth0", "host:veth1"'))
    assert found == ["lab.yaml:15: topology.links[0].endpoints[0]: unknown node 'c9' (nodes: c1, host)"]


def test_interface_name_too_long() -> None:
    found = problems(GOOD.replace('"host:veth1"', '"host:averyveryverylongname"'))
    assert any("15 bytes" in p and p.startswith("lab.yaml:15: topology.links[0].endpoints[1]") for p in found)


def test_bridge_port_not_in_node() -> None:
    found = problems(GOOD.replace("ports: [veth1]", "ports: [veth1, veth7]"))
    assert found == [
        "lab.yaml:6: topology.nodes.host.bridges.br0.ports[1]: 'veth7' is not an interface of node host made by a link"
    ]


def test_gateway_outside_subnets() -> None:
    found = problems(GOOD.replace("via: 192.168.9.1", "via: 10.9.9.9"))
    assert len(found) == 1 and "topology.nodes.c1.routes[0].via: gateway 10.9.9.9" in found[0]


def test_yaml_syntax_error_has_line() -> None:
    found = problems(GOOD.replace("    c1:\n", "    c1:\n  - x\n"))
    assert found[0].startswith("lab.yaml:") and "not valid YAML" in found[0]


def test_duplicate_key() -> None:
    found = problems(GOOD.replace("    c1:\n", "    host:\n      ipv6: true\n    c1:\n", 1))
    assert any("duplicate key" in p for p in found)


def test_interfaces_must_exist() -> None:
    found = problems(GOOD.replace("        br0: {addresses", "        eth5: {mtu: 1400}\n        br0: {addresses"))
    assert found == [
        "lab.yaml:8: topology.nodes.host.interfaces.eth5: node host has no interface 'eth5'"
        " (it has: br0, lo, veth1); interfaces come from links and bridges"
    ]


def test_missing_topology() -> None:
    assert problems("name: x\n") == ["lab.yaml:1: topology: required key is missing"]


def test_bad_mac() -> None:
    found = problems(GOOD.replace("02:00:00:00:00:01", "03:00:00:00:00:01"))
    assert found == [
        "lab.yaml:11: topology.nodes.c1.interfaces.eth0.mac: 03:00:00:00:00:01 is a multicast MAC;"
        " an interface needs a unicast one"
    ]
