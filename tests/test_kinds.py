"""Virtual interface kinds and bridge settings in the schema, without a kernel: every mistake has file:line: key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.errors import KernelLacksError, LabFileError
from labctl.kernel import kconfig
from labctl.lab.labfile import load_lab
from labctl.topology.kinds import creation_order, required_options
from labctl.topology.loader import parse_topology
from labctl.verify.runner import run_lab

BASE = """\
name: kinds
topology:
  nodes:
    a:
      interfaces:
        eth0: {addresses: [10.0.0.1/24]}
        IFACES
      bridges:
        br0:
          ports: [eth1, eth2]
          BRIDGE
    b: {}
  links:
    - endpoints: ["a:eth0", "b:eth0"]
    - endpoints: ["a:eth1", "b:eth1"]
    - endpoints: ["a:eth2", "b:eth2"]
    - endpoints: ["a:eth3", "b:eth3"]
"""


def lab(ifaces: str = "", bridge: str = "stp: false") -> str:
    return BASE.replace("IFACES", ifaces or "lo: {}").replace("BRIDGE", bridge)


def problems(text: str) -> list[str]:
    with pytest.raises(LabFileError) as info:
        parse_topology(text, "lab.yaml")
    return [str(p) for p in info.value.problems]


def test_every_kind_parses_and_is_ordered_after_what_it_sits_on() -> None:
    text = lab(
        "mv0: {kind: macvlan, parent: eth0, mode: bridge}\n"
        "        vx0: {kind: vxlan, vni: 42, remote: 10.0.0.2, local: 10.0.0.1, dev: eth0}\n"
        "        bond0: {kind: bond, mode: active-backup, members: [eth3]}\n"
        "        bond0.7: {kind: vlan}\n"
        "        red: {kind: vrf, table: 10}\n"
        "        d0: {kind: dummy}\n"
        "        gre1: {kind: gre, local: 10.0.0.1, remote: 10.0.0.2}\n"
        "        ipip1: {kind: ipip, local: 10.0.0.1, remote: 10.0.0.2}\n"
        "        iv0: {kind: ipvlan, parent: eth0, mode: l2}"
    )
    topo = parse_topology(text, "lab.yaml")
    order = creation_order(topo.nodes["a"].interfaces)
    assert order.index("bond0") < order.index("bond0.7")
    assert topo.nodes["a"].interfaces["bond0.7"].vlan_parent_and_id("bond0.7") == ("bond0", 7)
    assert {"mv0", "vx0", "bond0", "red", "d0", "gre1", "ipip1", "iv0"} <= topo.interface_names("a")
    options = {option for _, _, option in required_options(topo)}
    assert options == {
        "CONFIG_MACVLAN",
        "CONFIG_VXLAN",
        "CONFIG_BONDING",
        "CONFIG_VLAN_8021Q",
        "CONFIG_NET_VRF",
        "CONFIG_DUMMY",
        "CONFIG_NET_IPGRE",
        "CONFIG_NET_IPIP",
        "CONFIG_IPVLAN",
    }


@pytest.mark.parametrize(
    ("ifaces", "expected"),
    [
        (
            "v: {kind: vlan, parent: eth0, id: 5000}",
            "lab.yaml:7: topology.nodes.a.interfaces.v.id: VLAN id 5000 is outside 1-4094",
        ),
        (
            "eth0.4095: {kind: vlan}",
            "lab.yaml:7: topology.nodes.a.interfaces.eth0.4095: VLAN id 4095 (from the name) is outside 1-4094",
        ),
        (
            "v: {kind: vlan, id: 10}",
            "lab.yaml:7: topology.nodes.a.interfaces.v: a vlan needs a parent (parent: eth0), or a name like eth0.10",
        ),
        (
            "v: {kind: vlan, parent: eth9, id: 10}",
            "lab.yaml:7: topology.nodes.a.interfaces.v.parent: node a has no interface 'eth9'",
        ),
        (
            "vx0: {kind: vxlan, vni: 42, remote: 10.0.0.2}",
            "lab.yaml:7: topology.nodes.a.interfaces.vx0: a vxlan needs an underlay (dev: eth0)",
        ),
        (
            "vx0: {kind: vxlan, vni: 4, dev: eth0, remote: 10.0.0.2, group: 239.1.1.1}",
            "lab.yaml:7: topology.nodes.a.interfaces.vx0.group: a vxlan has either a remote",
        ),
        (
            "vx0: {kind: vxlan, vni: 4, dev: eth0, group: 10.0.0.9}",
            "lab.yaml:7: topology.nodes.a.interfaces.vx0.group: 10.0.0.9 is not a multicast address",
        ),
        (
            "mv0: {kind: macvlan, parent: eth0, vni: 3}",
            "lab.yaml:7: topology.nodes.a.interfaces.mv0.vni: a macvlan has no 'vni' (it takes: mode, parent)",
        ),
        (
            "mv0: {kind: macvlan, parent: eth0, mode: bridged}",
            "lab.yaml:7: topology.nodes.a.interfaces.mv0.mode: 'bridged' is not a macvlan mode",
        ),
        (
            "mv0: {kind: macvlan, parent: eth1}",
            "lab.yaml:7: topology.nodes.a.interfaces.mv0.parent: eth1 is a bridge port",
        ),
        (
            "mv0: {kind: macvlan, parent: 'b:eth7'}",
            "lab.yaml:7: topology.nodes.a.interfaces.mv0.parent: node b has no interface 'eth7' made by a link",
        ),
        (
            "mv0: {kind: macvlan, parent: 'zz:eth0'}",
            "lab.yaml:7: topology.nodes.a.interfaces.mv0.parent: unknown node 'zz'",
        ),
        (
            "v9: {kind: vlan, parent: 'b:eth0', id: 9}",
            "lab.yaml:7: topology.nodes.a.interfaces.v9.parent: only a macvlan or ipvlan may sit on another",
        ),
        (
            "bond0: {kind: bond, members: [eth3]}\n        bond1: {kind: bond, members: [eth3]}",
            "lab.yaml:8: topology.nodes.a.interfaces.bond1.members[0]: eth3 is already a member of bond0",
        ),
        (
            "bond0: {kind: bond, members: [eth1]}",
            "lab.yaml:7: topology.nodes.a.interfaces.bond0.members[0]: eth1 is a bridge or a bridge port",
        ),
        ("red: {kind: vrf}", "lab.yaml:7: topology.nodes.a.interfaces.red: a vrf needs a routing table (table: 10)"),
        (
            "red: {kind: vrf, table: 5, members: [eth2]}",
            "lab.yaml:7: topology.nodes.a.interfaces.red.members[0]: eth2 is a bridge port",
        ),
        (
            "gre0: {kind: gre, local: 10.0.0.1, remote: 10.0.0.2}",
            "lab.yaml:7: topology.nodes.a.interfaces.gre0.kind: gre0 is the kernel's own fallback tunnel device",
        ),
        (
            "eth1: {kind: dummy}",
            "lab.yaml:7: topology.nodes.a.interfaces.eth1.kind: eth1 is already made by a link or a bridge",
        ),
        (
            "eth0.10: {kind: vlan}\n        eth0.11: {mode: bridge}",
            "lab.yaml:8: topology.nodes.a.interfaces.eth0.11.mode: 'mode' belongs to a virtual interface",
        ),
        (
            "averyveryverylong: {kind: dummy}",
            "lab.yaml:5: topology.nodes.a.interfaces: interface name 'averyveryverylong' must be 1 to 15 bytes",
        ),
        ("d0: {kind: dummy, colour: red}", "lab.yaml:7: topology.nodes.a.interfaces.d0.colour: unknown key 'colour'"),
        ("x: {kind: token-ring}", "lab.yaml:7: topology.nodes.a.interfaces.x.kind: Input should be"),
    ],
)
def test_interface_mistakes(ifaces: str, expected: str) -> None:
    found = problems(lab(ifaces))
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    ("bridge", "expected"),
    [
        (
            "port_settings: {eth1: {pvid: 10}}",
            "lab.yaml:11: topology.nodes.a.bridges.br0.port_settings.eth1: pvid, vids and untagged need the bridge",
        ),
        (
            "port_settings: {eth9: {isolated: true}}",
            "lab.yaml:11: topology.nodes.a.bridges.br0.port_settings.eth9: eth9 is not a port of br0",
        ),
        (
            "port_settings: {eth1: {isolate: true}}",
            "lab.yaml:11: topology.nodes.a.bridges.br0.port_settings.eth1.isolate: unknown key 'isolate'",
        ),
        (
            "vlan_filtering: true\n          port_settings: {eth1: {vids: [4095]}}",
            "lab.yaml:12: topology.nodes.a.bridges.br0.port_settings.eth1.vids[0]: VLAN id 4095 is outside 1-4094",
        ),
        (
            "vlan_filtering: true\n          port_settings: {eth1: {vids: [10], untagged: [20]}}",
            "lab.yaml:12: topology.nodes.a.bridges.br0.port_settings.eth1.untagged[0]: VLAN 20 is not in vids or pvid",
        ),
        (
            "fdb: [{mac: '02:00:00:00:00:01', port: eth7}]",
            "lab.yaml:11: topology.nodes.a.bridges.br0.fdb[0].port: eth7 is not a port of br0",
        ),
        (
            "fdb: [{mac: '01:00:5e:00:00:01', port: eth1}]",
            "lab.yaml:11: topology.nodes.a.bridges.br0.fdb[0].mac: 01:00:5e:00:00:01 is a multicast MAC",
        ),
        (
            "fdb: [{mac: '02:00:00:00:00:01', port: eth1}, {mac: '02:00:00:00:00:01', port: eth2}]",
            "lab.yaml:11: topology.nodes.a.bridges.br0.fdb[1].mac: 02:00:00:00:00:01 already has an entry (fdb[0])",
        ),
    ],
)
def test_bridge_mistakes(bridge: str, expected: str) -> None:
    found = problems(lab(bridge=bridge))
    assert any(p.startswith(expected) for p in found), found


def test_bridge_settings_parse() -> None:
    topo = parse_topology(
        lab(
            bridge="vlan_filtering: true\n          mcast_snooping: false\n          nf_call_iptables: true\n"
            "          port_settings: {eth1: {pvid: 10, untagged: true, vids: [20], isolated: true, flood: false}}\n"
            "          fdb: [{mac: '02:00:00:00:00:01', port: eth2, sticky: true}]"
        ),
        "lab.yaml",
    )
    config = topo.nodes["a"].bridges["br0"]
    assert config.port_settings["eth1"].vlans() == {20: (False, False), 10: (True, True)}
    assert config.fdb[0].sticky and config.fdb[0].port == "eth2"
    options = {option for _, _, option in required_options(topo)}
    assert options == {"CONFIG_BRIDGE_VLAN_FILTERING", "CONFIG_BRIDGE_NETFILTER", "CONFIG_BRIDGE_IGMP_SNOOPING"}


@pytest.mark.skipif(kconfig.options() is None, reason="this kernel publishes no config")
def test_a_kind_this_kernel_lacks_is_named_and_its_lab_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's config decides: validate/up exit 2 naming the option; run reports every check SKIP."""
    have = dict(kconfig.options() or {})
    have.pop("CONFIG_DUMMY", None)
    monkeypatch.setattr(kconfig, "options", lambda: have)
    file = tmp_path / "lacks.yaml"
    file.write_text(
        lab("d0: {kind: dummy}")
        + "checks:\n  - name: one\n    traffic: [{ping: {node: a, to: 10.0.0.1}}]\n    expect: {reachable: true}\n"
    )
    with pytest.raises(KernelLacksError) as info:
        load_lab(str(file))
    assert [str(p) for p in info.value.problems] == [
        f"{file}:7: topology.nodes.a.interfaces.d0.kind: dummy: this kernel lacks CONFIG_DUMMY"
    ]
    assert info.value.exit_code == 2 and info.value.lacking == ["CONFIG_DUMMY"]
    result = run_lab(str(file))  # nothing is built: no root needed
    assert [(c.name, c.status, c.not_provable) for c in result.checks] == [("one", "skip", ["CONFIG_DUMMY"])]
    assert result.passed


@pytest.mark.skipif(not kconfig.missing(["CONFIG_BONDING"]), reason="this kernel has bonding")
@pytest.mark.skipif(os.geteuid() != 0, reason="up needs root (it refuses before building anyway)")
def test_up_of_a_kind_this_kernel_lacks_exits_2_and_builds_nothing(tmp_path: Path) -> None:
    from labctl.kernel import netns

    name = f"tlk{os.getpid()}"
    file = tmp_path / "bond.yaml"
    file.write_text(lab("bond0: {kind: bond, members: [eth3]}").replace("name: kinds", f"name: {name}"))
    labctl = os.path.join(os.path.dirname(sys.executable), "labctl")
    done = subprocess.run([labctl, "up", str(file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{file}:7: topology.nodes.a.interfaces.bond0.kind: bond: this kernel lacks CONFIG_BONDING" in (
        done.stdout + done.stderr
    ).replace("\n", " ")
    assert "Traceback" not in done.stderr
    assert netns.list_labctl(name) == []


def test_graph_draws_kinds_and_bridge_settings() -> None:
    from labctl.topology import graph

    topo = parse_topology(
        lab(
            "eth0.10: {kind: vlan}\n        vx0: {kind: vxlan, vni: 42, remote: 10.0.0.2, dev: eth0}",
            "port_settings: {eth1: {isolated: true}}\n"
            "          fdb: [{mac: '02:00:00:00:00:01', port: eth2, sticky: true}]",
        ).replace("ports: [eth1, eth2]", "ports: [eth1, eth2, vx0]"),
        "lab.yaml",
    )
    dot = graph.dot(topo)
    assert '"a:vx0" [shape=component' in dot and "vx0 vxlan vni 42 → 10.0.0.2:4789" in dot
    assert '"a:br0" -- "a:vx0"' in dot and "eth0.10 vlan 10" in dot
    assert "eth1: isolated on" in dot and "fdb 02:00:00:00:00:01→eth2 sticky" in dot
    mermaid = graph.mermaid(topo)
    assert 'a_eth0_10[/"eth0.10 vlan 10"/]' in mermaid and "a_br0 --- a_vx0" in mermaid


def test_port_vlans_decode_repeated_vlan_infos() -> None:
    """struct bridge_vlan_info (flags, vid) repeated in IFLA_AF_SPEC, as an AF_BRIDGE dump with BRVLAN gives it."""
    import struct

    from labctl.kernel.bridgeports import decode_vlan_infos

    def info(flags: int, vid: int) -> bytes:
        return struct.pack("=HHHH", 8, 2, flags, vid)

    spec = info(0x2 | 0x4, 10) + info(0, 20) + info(0x4, 30) + struct.pack("=HHI", 8, 3, 0)
    assert decode_vlan_infos(spec) == {10: "pvid untagged", 20: "tagged", 30: "untagged"}


@pytest.mark.skipif(os.geteuid() != 0 or kconfig.options() is None, reason="needs root and a published config")
def test_the_netlink_probe_agrees_with_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a config the kernel is asked in a throw-away namespace; here both must give the same answer."""
    from labctl.kernel import kindprobe
    from labctl.topology.kinds import BRIDGE_VLAN_OPTION, KIND_OPTIONS

    options = {**KIND_OPTIONS, "bridge_vlan_filtering": BRIDGE_VLAN_OPTION}
    answers = kindprobe.probe(list(options))
    assert answers == {kind: not kconfig.missing([option]) for kind, option in options.items()}

    file = tmp_path / "probe.yaml"
    file.write_text(lab("d0: {kind: dummy}\n        mv0: {kind: macvlan, parent: eth0}"))
    expected = sorted(o for o in ("CONFIG_DUMMY", "CONFIG_MACVLAN") if kconfig.missing([o]))
    monkeypatch.setattr(kconfig, "options", lambda: None)
    if expected:
        with pytest.raises(KernelLacksError) as info:
            load_lab(str(file))
        assert info.value.lacking == expected
    else:
        load_lab(str(file))


def test_graph_joins_tunnel_ends_that_meet(tmp_path: Path) -> None:
    from labctl.topology import graph
    from labctl.topology.checks import LabFile
    from labctl.topology.loader import load_file

    topo = load_file(str(Path(__file__).resolve().parents[1] / "labs" / "links-vxlan.yaml"), LabFile)[0]
    assert graph.tunnels(topo) == [(("a", "vx0"), ("b", "vx0"), "vni 42")]
    assert '"a:vx0" -- "b:vx0" [label="vni 42", style=dotted' in graph.dot(topo)
