"""A second ``up`` leaves a node's iptables and ebtables rules alone (counters keep counting); a changed rule
is replaced and reported; a rule the kernel refuses leaves the old rules whole and is named.  Real kernel.

    a (10.79.0.1, iptables) ── sw (bridge br0, ebtables) ── b (10.79.0.2)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from labctl.errors import KernelError
from labctl.kernel import ebtables, iptables, netns
from labctl.lab import build
from tests.topologies import up_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")

IPT = ['"-A OUTPUT -p icmp"', '"-t nat -A POSTROUTING -o eth0 -j MASQUERADE"']
EBT = ['"-A FORWARD -p IPv4"', '"-N mine"', '"-A mine -j RETURN"']


def _body(ipt: list[str], ebt: list[str]) -> str:
    return f"""\
topology:
  nodes:
    a:
      interfaces:
        eth0: {{addresses: [10.79.0.1/24]}}
      iptables: [{", ".join(ipt)}]
    sw:
      bridges:
        br0: {{ports: [p1, p2]}}
      ebtables: [{", ".join(ebt)}]
    b:
      interfaces:
        eth0: {{addresses: [10.79.0.2/24]}}
  links:
    - endpoints: ["a:eth0", "sw:p1"]
    - endpoints: ["sw:p2", "b:eth0"]
"""


def _ipt(namespace: str) -> list[tuple[str, str, int]]:
    """(table, rule, packets) of the node's rules (policies left out)."""
    return [(r.table, r.rule, r.packets) for r in iptables.list_rules(namespace) if r.position]


def _ebt(namespace: str) -> list[tuple[str, str, int]]:
    return [(r.chain, r.rule, r.packets) for r in ebtables.list_rules(namespace) if r.position]


def test_second_up_keeps_counters_then_a_changed_rule_is_replaced(tmp_path: Path, lab_name: str) -> None:
    file = tmp_path / "lab.yaml"
    a, sw = netns.namespace_name(lab_name, "a"), netns.namespace_name(lab_name, "sw")
    try:
        assert up_file(file, lab_name, _body(IPT, EBT)) == []  # a first build reports no converge
        ping = ["ip", "netns", "exec", a, "ping", "-c2", "-i0.2", "-W1", "10.79.0.2"]
        assert subprocess.run(ping, capture_output=True).returncode == 0
        counted_ip, counted_eb = _ipt(a), _ebt(sw)
        assert ("filter", "-A OUTPUT -p icmp", 2) in counted_ip  # both echo requests
        assert counted_eb[0][2] >= 4  # requests and replies crossed the bridge
        assert up_file(file, lab_name, _body(IPT, EBT)) == []  # a second up changes nothing ...
        assert (_ipt(a), _ebt(sw)) == (counted_ip, counted_eb)  # ... not even a counter

        changed_ip = ['"-A OUTPUT -p udp"', IPT[1]]
        assert up_file(file, lab_name, _body(changed_ip, EBT)) == ["a: iptables replaced"]
        assert [(t, r) for t, r, _ in _ipt(a)] == [
            ("nat", "-A POSTROUTING -o eth0 -j MASQUERADE"),
            ("filter", "-A OUTPUT -p udp"),
        ]
        assert _ebt(sw) == counted_eb  # the other tool's rules were not touched
        changed_eb = ['"-A FORWARD -p ARP"']
        assert up_file(file, lab_name, _body(changed_ip, changed_eb)) == ["sw: ebtables replaced"]
        assert [(c, r) for c, r, _ in _ebt(sw)] == [("FORWARD", "-A FORWARD -p ARP -j CONTINUE")]
        assert up_file(file, lab_name, _body([], [])) == ["a: iptables removed", "sw: ebtables removed"]
        assert (_ipt(a), _ebt(sw)) == ([], [])
        assert up_file(file, lab_name, _body(IPT[:1], EBT[:1])) == ["a: iptables loaded", "sw: ebtables loaded"]
    finally:
        build.down(lab_name)


@pytest.mark.parametrize(
    ("ipt", "ebt", "named"),
    [
        # MASQUERADE belongs to the nat table: the kernel's checkentry refuses it in filter
        ([IPT[0], '"-A INPUT -j MASQUERADE"'], EBT, "-A INPUT -j MASQUERADE"),
        (IPT, [EBT[0], '"-A FORWARD --no-such-option 1"'], "-A FORWARD --no-such-option 1"),
    ],
    ids=["iptables", "ebtables"],
)
def test_a_refused_rule_leaves_the_old_rules_and_is_named(
    tmp_path: Path, lab_name: str, ipt: list[str], ebt: list[str], named: str
) -> None:
    file = tmp_path / "lab.yaml"
    a, sw = netns.namespace_name(lab_name, "a"), netns.namespace_name(lab_name, "sw")
    try:
        up_file(file, lab_name, _body(IPT, EBT))
        ping = ["ip", "netns", "exec", a, "ping", "-c1", "-W1", "10.79.0.2"]
        assert subprocess.run(ping, capture_output=True).returncode == 0
        before = (_ipt(a), _ebt(sw))
        with pytest.raises(KernelError) as refused:
            up_file(file, lab_name, _body(ipt, ebt))
        assert named in str(refused.value), str(refused.value)
        assert (_ipt(a), _ebt(sw)) == before  # whole, counters and all
    finally:
        build.down(lab_name)
