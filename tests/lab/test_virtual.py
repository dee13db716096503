"""Virtual kinds and bridge settings on the real kernel: built in the node, converged object by object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labctl.kernel import netns
from labctl.kernel.links import LinkInfo, NodeLinks
from labctl.lab import build
from labctl.lab.labfile import load_lab
from labctl.lab.status import lab_status

LAB = """\
topology:
  nodes:
    a:
      interfaces:
        eth0: {addresses: [10.9.0.1/24]}
        mv0: {kind: macvlan, parent: eth0, mode: bridge, addresses: [10.9.0.5/24]}
        vx0: {kind: vxlan, vni: 42, remote: 10.9.0.2, local: 10.9.0.1, dev: eth0}
      bridges:
        br0:
          ports: [eth1, vx0]
          mcast_snooping: false
          port_settings:
            eth1: {isolated: true, flood: false}
          fdb: [{mac: "02:00:00:00:00:09", port: eth1, sticky: true}]
    b:
      interfaces:
        eth0: {addresses: [10.9.0.2/24]}
        mv1: {kind: macvlan, parent: "a:eth0", mode: private}
  links:
    - endpoints: [a:eth0, b:eth0]
    - endpoints: [a:eth1, b:eth1]
"""


def up(file: Path, lab: str, body: str) -> list[str]:
    file.write_text(f"name: {lab}\n{body}")
    topo, _ = load_lab(str(file))
    changes: list[str] = []
    build.up(topo, str(file), changes=changes)
    return changes


def kernel_view(lab: str, node: str) -> tuple[dict[str, LinkInfo], list[dict[str, Any]]]:
    with NodeLinks(netns.namespace_name(lab, node)) as handle:
        return handle.links(), handle.static_fdb()


def test_kinds_build_in_their_node_and_converge_object_by_object(tmp_path: Path, lab_name: str) -> None:
    file = tmp_path / "lab.yaml"
    body = LAB
    try:
        first = up(file, lab_name, body)
        assert "a: created mv0 (macvlan parent eth0 mode bridge)" in first
        assert "b: created mv1 (macvlan parent a:eth0 mode private)" in first
        assert "a: br0 fdb 02:00:00:00:00:09 on eth1 static sticky" in first
        links, fdb = kernel_view(lab_name, "a")
        vx0 = links["vx0"]
        assert vx0.kind == "vxlan" and vx0.master == "br0"
        assert vx0.details == {
            "vni": 42,
            "remote": "10.9.0.2",
            "local": "10.9.0.1",
            "learning": 1,
            "port": 4789,
            "dev": "eth0",
        }
        assert links["eth1"].port["isolated"] == 1 and links["eth1"].port["flood"] == 0
        assert links["br0"].details["mcast_snooping"] == 0
        assert fdb == [{"bridge": "br0", "mac": "02:00:00:00:00:09", "port": "eth1", "vlan": None, "sticky": True}]
        b_links, _ = kernel_view(lab_name, "b")
        assert b_links["mv1"].kind == "macvlan" and b_links["mv1"].details["mode"] == "private"

        assert up(file, lab_name, body) == []  # a second up changes nothing

        changed = up(file, lab_name, body.replace("vni: 42", "vni: 43"))
        assert changed[0] == "a: replaced vx0 (vxlan vni 43 local 10.9.0.1 remote 10.9.0.2 dev eth0): vni was 42"
        assert all("vx0" in line for line in changed), changed  # and back into its bridge: nothing else
        body = body.replace("vni: 42", "vni: 43")

        assert up(file, lab_name, body.replace("isolated: true, flood: false", "isolated: true")) == [
            "a: br0 port eth1 flood on"
        ]
        body = body.replace("isolated: true, flood: false", "isolated: true")
        assert up(file, lab_name, body.replace("sticky: true", "sticky: false")) == [
            "a: br0 fdb 02:00:00:00:00:09 on eth1 static"
        ]
        no_fdb = body.replace('          fdb: [{mac: "02:00:00:00:00:09", port: eth1, sticky: true}]\n', "")
        assert up(file, lab_name, no_fdb) == ["a: br0 fdb 02:00:00:00:00:09 on eth1 removed"]
        no_mv0 = no_fdb.replace(
            "        mv0: {kind: macvlan, parent: eth0, mode: bridge, addresses: [10.9.0.5/24]}\n", ""
        )
        assert up(file, lab_name, no_mv0) == ["a: removed mv0"]
        links, fdb = kernel_view(lab_name, "a")
        assert "mv0" not in links and fdb == []
        moved = no_mv0.replace("10.9.0.2/24", "10.9.0.3/24")
        assert up(file, lab_name, moved) == ["b: eth0 address 10.9.0.3/24 added", "b: eth0 address 10.9.0.2/24 removed"]

        with NodeLinks(netns.namespace_name(lab_name, "a")) as handle:
            assert handle.port_vlans() == {}  # no VLAN filtering on br0 (nor in this kernel): nothing listed
        status = lab_status(lab_name)
        by_name = {i["name"]: i for i in status["nodes"]["a"]["interfaces"]}
        assert by_name["vx0"]["details"]["vni"] == 43 and by_name["eth1"]["port"]["isolated"] == 1
    finally:
        build.down(lab_name)
