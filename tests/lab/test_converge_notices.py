"""A second ``up`` still notices what the lab did not make, on nodes whose file has no rules and no sysctls.

A converge reads every node's xtables tables (IPv4 and IPv6), nf_tables tables and each interface's IPv6
switch each time, whatever the lab's state says the node had: a rule or table added by hand in a node that
never had one (``ip6tables`` run through ``labctl exec``) is converged away and reported, an interface's
IPv6 switched off again, and an interface the converge recreates is off even when the namespace's default
was changed by hand.  Guards the cheaper reads (one directory open per node for the xtables files and for
the sysctls, one nf_tables dump for both ebtables' and nft's tables, all/default left alone on nodes that
need nothing).  Real kernel.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from labctl.kernel import netns, sysctl
from labctl.lab import build
from tests.topologies import up_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")

BODY = """\
topology:
  nodes:
    a:
      interfaces:
        eth0: {addresses: [10.81.0.1/24]}
    b:
      interfaces:
        eth0: {addresses: [10.81.0.2/24]}
  links:
    - endpoints: ["a:eth0", "b:eth0"]
"""


def _run(namespace: str, *argv: str) -> None:
    netns.run(namespace, list(argv), check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("ip6tables-legacy") is None, reason="needs ip6tables-legacy")
def test_hand_made_ip6tables_and_iptables_tables_are_converged_away(tmp_path: Path, lab_name: str) -> None:
    file = tmp_path / "lab.yaml"
    a, b = netns.namespace_name(lab_name, "a"), netns.namespace_name(lab_name, "b")
    try:
        assert up_file(file, lab_name, BODY) == []
        _run(a, "ip6tables-legacy", "-A", "INPUT", "-j", "DROP")  # the lab never had ip6tables
        _run(b, "iptables-legacy", "-A", "INPUT", "-j", "DROP")
        changes = up_file(file, lab_name, BODY)
        assert "a: ip6tables removed" in changes and "b: iptables removed" in changes
        for namespace, tool in ((a, "ip6tables-legacy-save"), (b, "iptables-legacy-save")):
            listing = netns.run(namespace, [tool], check=True, capture_output=True, text=True).stdout
            assert "-j DROP" not in listing
        assert up_file(file, lab_name, BODY) == []  # and then nothing is left to do
    finally:
        build.down(lab_name)


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
def test_a_hand_made_nft_table_and_an_interfaces_ipv6_switch_are_converged(tmp_path: Path, lab_name: str) -> None:
    file = tmp_path / "lab.yaml"
    a = netns.namespace_name(lab_name, "a")
    try:
        up_file(file, lab_name, BODY)
        _run(a, "nft", "add table bridge handmade")
        sysctl.write_many({"net.ipv6.conf.eth0.disable_ipv6": "0"}, a)  # what the kernel acts on
        changes = up_file(file, lab_name, BODY)
        assert any(line.startswith("a: ") and "removed" in line for line in changes), changes
        listing = netns.run(a, ["nft", "list", "tables"], check=True, capture_output=True, text=True).stdout
        assert "handmade" not in listing
        assert sysctl.read("net.ipv6.conf.eth0.disable_ipv6", a) == "1"
    finally:
        build.down(lab_name)


VIRTUAL = BODY.replace(
    "        eth0: {addresses: [10.81.0.1/24]}",
    "        eth0: {addresses: [10.81.0.1/24]}\n        mv0: {kind: macvlan, parent: eth0, mode: bridge}",
    1,
)


def test_an_interface_a_converge_recreates_gets_ipv6_off_whatever_the_default_was_set_to(
    tmp_path: Path, lab_name: str
) -> None:
    """A node a converge leaves unwritten (every interface there, IPv6 off) whose default was changed by hand:
    the interface the converge then replaces inherits that default, and is set off before ``up`` returns."""
    file = tmp_path / "lab.yaml"
    a = netns.namespace_name(lab_name, "a")
    try:
        up_file(file, lab_name, VIRTUAL)
        _run(a, "ip", "link", "del", "mv0")
        _run(a, "ip", "link", "add", "mv0", "link", "eth0", "type", "macvlan", "mode", "private")  # replaced
        sysctl.write_many({"net.ipv6.conf.default.disable_ipv6": "0"}, a)
        changes = up_file(file, lab_name, VIRTUAL)
        assert any("replaced" in line and "mv0" in line for line in changes), changes
        for key in ("net.ipv6.conf.mv0.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            assert sysctl.read(key, a) == "1", key
    finally:
        build.down(lab_name)


def test_write_here_writes_every_key_through_one_directory_and_names_a_missing_one(lab_name: str) -> None:
    name = netns.namespace_name(lab_name, "w")
    netns.create(name)
    try:
        with netns.entered(name):
            sysctl.write_here({"net.ipv4.conf.all.forwarding": "1", "net.ipv6.conf.all.forwarding": "1"})
            assert sysctl.read("net.ipv4.conf.all.forwarding") == "1"
            assert sysctl.read("net.ipv6.conf.all.forwarding") == "1"
            with pytest.raises(sysctl.SysctlError, match=r"no such sysctl: net\.ipv4\.conf\.nosuch0\.forwarding"):
                sysctl.write_here({"net.ipv4.conf.all.forwarding": "0", "net.ipv4.conf.nosuch0.forwarding": "1"})
            with pytest.raises(sysctl.SysctlError, match="refused"):
                sysctl.write_here({"net.ipv4.conf.all.forwarding": "0", "net.ipv4.ip_local_port_range": "x y"})
    finally:
        netns.remove(name)
