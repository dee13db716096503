"""Labs on the real kernel: build, converge, roll back, tear down, leave the host as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labctl.errors import KernelError, LabFileError
from labctl.kernel import netns, sysctl
from labctl.kernel.links import NodeLinks
from labctl.lab import build, relay, state
from labctl.lab.clean import clean_all
from labctl.lab.labfile import load_lab
from tests.conftest import LabFactory
from tests.hostcheck import host_snapshot
from tests.lab.test_verify import TWO_NODES
from tests.topologies import VMS

CONTAINERS = """\
topology:
  nodes:
    host:
      bridges:
        br0: {ports: [veth1, veth2]}
      interfaces:
        br0: {addresses: [192.168.9.1/24]}
    c1:
      interfaces:
        eth0: {addresses: [192.168.9.2/24], mac: "02:00:00:00:09:02", mtu: 1400}
      routes:
        - {dst: default, via: 192.168.9.1}
    c2:
      interfaces:
        eth0: {addresses: [192.168.9.3/24]}
  links:
    - endpoints: ["c1:eth0", "host:veth1"]
    - endpoints: ["c2:eth0", "host:veth2"]
"""


def ping(lab: str, node: str, address: str) -> bool:
    result = netns.run(netns.namespace_name(lab, node), ["ping", "-c1", "-W1", address], capture_output=True)
    return result.returncode == 0


def links_of(lab: str, node: str) -> dict[str, object]:
    with NodeLinks(netns.namespace_name(lab, node)) as handle:
        return {name: info for name, info in handle.links().items()}


def rx_packets(lab: str, node: str, ifname: str) -> int:
    info = links_of(lab, node)[ifname]
    return int(info.stats["rx_packets"])  # type: ignore[attr-defined]


def test_containers_on_a_bridge(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(CONTAINERS)
    host = links_of(lab_name, "host")
    assert host["veth1"].master == "br0" and host["veth2"].master == "br0"  # type: ignore[attr-defined]
    c1 = links_of(lab_name, "c1")["eth0"]
    assert c1.mac == "02:00:00:00:09:02" and c1.mtu == 1400 and c1.addresses == ["192.168.9.2/24"]  # type: ignore[attr-defined]
    before = rx_packets(lab_name, "c2", "eth0")
    assert ping(lab_name, "c1", "192.168.9.3")
    assert ping(lab_name, "c1", "192.168.9.1")
    assert rx_packets(lab_name, "c2", "eth0") > before  # the echo really crossed the bridge
    # IPv6 is off on lab links unless asked for
    assert sysctl.read("net.ipv6.conf.eth0.disable_ipv6", netns.namespace_name(lab_name, "c1")) == "1"


def test_nothing_in_the_root_namespace_and_host_unchanged(tmp_path: Path, lab_name: str) -> None:
    before = host_snapshot()
    file = tmp_path / "lab.yaml"
    file.write_text(f"name: {lab_name}\nsysctls:\n  net.core.netdev_max_backlog: 8\n{CONTAINERS}")
    topo, _ = load_lab(str(file))
    build.up(topo, str(file))
    try:
        assert sysctl.read("net.core.netdev_max_backlog") == "8"
        during = host_snapshot()
        assert during["links"] == before["links"] and during["routes"] == before["routes"]
    finally:
        build.down(lab_name)
    assert host_snapshot() == before


def test_up_twice_is_a_no_op(make_lab: LabFactory, lab_name: str) -> None:
    topo = make_lab(CONTAINERS)
    first = {node: links_of(lab_name, node) for node in topo.nodes}
    file = state.load(lab_name).file  # type: ignore[union-attr]
    build.up(topo, file)
    second = {node: links_of(lab_name, node) for node in topo.nodes}
    for node in topo.nodes:
        assert {n: (i.index, i.mac, i.addresses) for n, i in first[node].items()} == {  # type: ignore[attr-defined]
            n: (i.index, i.mac, i.addresses)
            for n, i in second[node].items()  # type: ignore[attr-defined]
        }


def test_converge_applies_changes(make_lab: LabFactory, lab_name: str, tmp_path: Path) -> None:
    make_lab(CONTAINERS)
    changed = (
        CONTAINERS.replace("192.168.9.3/24", "192.168.9.30/24")
        .replace('    - endpoints: ["c2:eth0", "host:veth2"]\n', "")
        .replace("ports: [veth1, veth2]", "ports: [veth1]")
    )
    changed = changed.replace("    c2:\n      interfaces:\n        eth0: {addresses: [192.168.9.30/24]}\n", "")
    file = tmp_path / f"{lab_name}.yaml"  # the lab's own file, edited
    file.write_text(f"name: {lab_name}\n{changed}")
    topo, _ = load_lab(str(file))
    build.up(topo, str(file))
    assert netns.list_labctl(lab_name) == sorted(netns.namespace_name(lab_name, n) for n in ("host", "c1"))
    assert "veth2" not in links_of(lab_name, "host")
    assert ping(lab_name, "c1", "192.168.9.1")


def test_converge_adds_a_node_beside_an_existing_one(make_lab: LabFactory, lab_name: str, tmp_path: Path) -> None:
    """The new link's near end is in a namespace the run did not create: the kernel then picks the far end's
    ifindex too (veth_newlink honours a peer's only beside the near end's), and the build must not assume it."""
    make_lab(TWO_NODES)
    grown = (
        TWO_NODES.replace(
            "        eth0: {addresses: [10.0.7.1/24]}\n",
            "        eth0: {addresses: [10.0.7.1/24]}\n        eth1: {addresses: [10.0.8.1/24]}\n",
        )
        .replace("  links:\n", "    extra:\n      interfaces:\n        eth0: {addresses: [10.0.8.2/24]}\n  links:\n")
        .replace('"server:eth0"]\n', '"server:eth0"]\n    - endpoints: ["client:eth1", "extra:eth0"]\n')
    )
    file = tmp_path / f"{lab_name}.yaml"  # the lab's own file, edited
    file.write_text(f"name: {lab_name}\n{grown}")
    topo, _ = load_lab(str(file))
    build.up(topo, str(file))
    assert ping(lab_name, "extra", "10.0.8.1")


def test_failure_rolls_back_everything(tmp_path: Path, lab_name: str) -> None:
    before = host_snapshot()
    # what only the kernel can refuse, late in the build (sysctls are already checked by load_lab)
    bad = CONTAINERS.replace(
        "eth0: {addresses: [192.168.9.3/24]}", "eth0: {addresses: [192.168.9.3/24], features: {no-such: true}}"
    )
    file = tmp_path / "bad.yaml"
    file.write_text(f"name: {lab_name}\nsysctls:\n  net.core.netdev_max_backlog: 9\n{bad}")
    topo, _ = load_lab(str(file))
    with pytest.raises(KernelError, match=r"eth0 in labctl-.*c2 has no ethtool feature no-such"):
        build.up(topo, str(file))
    assert netns.list_labctl(lab_name) == []
    assert state.load(lab_name) is None
    assert host_snapshot() == before  # netdev_max_backlog is back too


def test_vms_through_taps_and_relays(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(VMS)
    relays = relay.find(lab_name)
    assert sorted(vm for _, vm in relays.values()) == ["vm1", "vm2"]
    host = links_of(lab_name, "host")
    assert host["tap1"].kind == "tun" and host["tap1"].master == "br0" and host["tap1"].carrier  # type: ignore[attr-defined]
    before = rx_packets(lab_name, "vm2", "eth0")
    assert ping(lab_name, "vm1", "192.168.3.103")
    assert ping(lab_name, "vm1", "192.168.3.101")
    assert rx_packets(lab_name, "vm2", "eth0") > before
    build.down(lab_name)
    assert relay.find(lab_name) == {}


def test_two_labs_at_once(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(CONTAINERS)
    other = lab_name + "b"
    make_lab(CONTAINERS, name=other)
    assert ping(lab_name, "c1", "192.168.9.3") and ping(other, "c1", "192.168.9.3")
    build.down(other)
    assert ping(lab_name, "c1", "192.168.9.3")


def test_kill_9_during_up_then_down_removes_all(tmp_path: Path, lab_name: str) -> None:
    before = host_snapshot()
    nodes = "\n".join(
        f"    h{i}:\n      interfaces:\n        eth0: {{addresses: [10.1.{i // 200}.{i % 200 + 1}/16]}}"
        for i in range(300)
    )
    links = "\n".join(f'    - endpoints: ["h{i}:eth0", "sw:p{i}"]' for i in range(300))
    ports = ", ".join(f"p{i}" for i in range(300))
    file = tmp_path / "big.yaml"
    file.write_text(
        f"name: {lab_name}\nsysctls:\n  net.core.netdev_max_backlog: 77\n"
        f"topology:\n  nodes:\n    sw:\n      bridges:\n        br0: {{ports: [{ports}]}}\n{nodes}\n  links:\n{links}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "labctl.cli", "up", str(file)])
    deadline = time.monotonic() + 20
    while len(netns.list_labctl(lab_name)) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert netns.list_labctl(lab_name), "the kill came too late to test anything"
    build.down(lab_name)
    assert netns.list_labctl(lab_name) == []
    assert host_snapshot() == before


def test_clean_removes_leftovers_without_state(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(VMS)
    state.forget(lab_name)  # as if the state file were lost
    done = clean_all(lab_name)  # only this test's lab: a user's running labs are not ours to remove
    assert netns.namespace_name(lab_name, "vm1") in done.namespaces
    assert netns.list_labctl(lab_name) == [] and relay.find(lab_name) == {}


def test_rps_gro_promisc_txqueuelen(make_lab: LabFactory, lab_name: str) -> None:
    body = CONTAINERS.replace(
        "eth0: {addresses: [192.168.9.3/24]}",
        'eth0: {addresses: [192.168.9.3/24], rps_cpus: "1", gro: true, promisc: true, txqueuelen: 50}',
    )
    make_lab(body)
    c2 = netns.namespace_name(lab_name, "c2")
    info = links_of(lab_name, "c2")["eth0"]
    assert info.promisc and info.txqueuelen == 50  # type: ignore[attr-defined]
    features = netns.run(c2, ["ethtool", "-k", "eth0"], capture_output=True, text=True).stdout
    assert "generic-receive-offload: on" in features
    rps = subprocess.run(
        ["ip", "netns", "exec", c2, "cat", "/sys/class/net/eth0/queues/rx-0/rps_cpus"],
        capture_output=True,
        text=True,
    ).stdout
    assert int(rps.strip().replace(",", ""), 16) == 1
    assert os.path.exists("/run/netns/" + c2)


def test_clean_leaves_a_lab_alone_while_another_command_holds_it(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(CONTAINERS)
    with state.locked(lab_name):
        done = clean_all(lab_name)
    assert done.busy == [lab_name] and done.namespaces == []
    assert len(netns.list_labctl(lab_name)) == 3


def test_converge_switches_ipv6_on_existing_interfaces(make_lab: LabFactory, lab_name: str, tmp_path: Path) -> None:
    make_lab(CONTAINERS)
    file = tmp_path / f"{lab_name}.yaml"
    with_ipv6 = CONTAINERS.replace("    c2:\n", "    c2:\n      ipv6: true\n")
    file.write_text(f"name: {lab_name}\n{with_ipv6}")
    topo, _ = load_lab(str(file))
    build.up(topo, str(file))
    assert sysctl.read("net.ipv6.conf.eth0.disable_ipv6", netns.namespace_name(lab_name, "c2")) == "0"


def test_up_of_another_file_with_the_same_lab_name_is_refused(
    make_lab: LabFactory, lab_name: str, tmp_path: Path
) -> None:
    make_lab(CONTAINERS)
    before = {node: links_of(lab_name, node) for node in ("host", "c1", "c2")}
    other = tmp_path / "someone-else.yaml"
    other.write_text(f"name: {lab_name}\n{CONTAINERS.replace('192.168.9.3/24', '192.168.9.33/24')}")
    topo, _ = load_lab(str(other))
    with pytest.raises(LabFileError, match=r"already up from .*: bring it down first") as refused:
        build.up(topo, str(other))
    assert refused.value.exit_code == 2
    assert state.load(lab_name).file == str(tmp_path / f"{lab_name}.yaml")  # type: ignore[union-attr]
    after = {node: links_of(lab_name, node) for node in ("host", "c1", "c2")}
    assert {n: {i: v.addresses for i, v in links.items()} for n, links in after.items()} == {  # type: ignore[attr-defined]
        n: {i: v.addresses for i, v in links.items()}  # type: ignore[attr-defined]
        for n, links in before.items()
    }
    result = subprocess.run(
        [sys.executable, "-m", "labctl.cli", "up", str(other)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "already up from" in result.stderr


def test_veth_ends_never_share_an_ifindex(make_lab: LabFactory, lab_name: str) -> None:
    """The kernel's linkwatch treats a device whose ifindex equals its iflink (a veth's: the peer's ifindex)
    as not urgent and sets it operational up to a second late; each end of a lab's veth gets its own number
    (two nodes alike, as here, would otherwise get the same)."""
    make_lab(TWO_NODES)
    ends = []
    for node in ("client", "server"):
        namespace = netns.namespace_name(lab_name, node)
        shown = netns.run(namespace, ["ip", "-j", "link", "show", "eth0"], capture_output=True)
        ends.append(json.loads(shown.stdout)[0])
    assert ends[0]["ifindex"] == ends[1]["link_index"] and ends[1]["ifindex"] == ends[0]["link_index"]
    assert ends[0]["ifindex"] != ends[1]["ifindex"]
