"""IPv6 in checks on the real kernel: send errors that ERROR, IPv6 inject, DAD, ping options, the CLI.

The labs/ip6-*.yaml files themselves run in tests/lab/test_all_labs.py and, with every mutation, in
tests/mutations/.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from labctl.kernel import netns, sysctl
from labctl.kernel.links import NodeLinks
from labctl.verify.runner import run_lab
from tests.conftest import LabFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

ROUTED = """\
topology:
  nodes:
    h1:
      ipv6: true
      interfaces:
        eth0: {addresses: ["2001:db8:71::2/64"]}
      routes:
        - {dst: default, via: "2001:db8:71::1"}
    r1:
      ipv6: true
      sysctls: {net.ipv6.conf.all.forwarding: 1}
      interfaces:
        eth0: {addresses: ["2001:db8:71::1/64"]}
        eth1: {addresses: ["2001:db8:72::1/64"]}
    h2:
      ipv6: true
      dad: false
      interfaces:
        eth0: {addresses: ["2001:db8:72::2/64"]}
      routes:
        - {dst: default, via: "2001:db8:72::1"}
  links:
    - endpoints: ["h1:eth0", "r1:eth0"]
    - endpoints: ["r1:eth1", "h2:eth0"]
"""


def write(tmp_path: Path, name: str, body: str) -> str:
    file = tmp_path / f"{name}.yaml"
    file.write_text(f"name: {name}\n{body}")
    return str(file)


def test_a_step_that_cannot_send_is_an_error_not_a_pass(tmp_path: Path, lab_name: str) -> None:
    checks = """\
checks:
  - name: no-route-unexpected
    traffic: [{udp: {node: h2, to: "[2001:db8:99::1]:5000"}}]
    expect: {counters: {h2: {Udp6.NoPorts: 0}}}
  - name: no-route-stated
    traffic: [{udp: {node: h1, to: "[2001:db8:72::2]:5000"}}]
    setup: {sysctls: {h1: {net.ipv6.conf.eth0.disable_ipv6: 1}}}
    expect: {send_error: ENETUNREACH}
"""
    topology = ROUTED.replace('      routes:\n        - {dst: default, via: "2001:db8:72::1"}\n', "")
    topology = topology.replace('        eth0: {addresses: ["2001:db8:72::2/64"]}\n',
                                '        eth0: {addresses: ["2001:db8:72::2/64"]}\n      routes:\n'
                                '        - {dst: "2001:db8:72::/48", via: "2001:db8:72::1"}\n')
    result = run_lab(write(tmp_path, lab_name, topology + checks))
    by_name = {c.name: c for c in result.checks}
    unexpected = by_name["no-route-unexpected"]
    assert unexpected.status == "error" and "ENETUNREACH" in (unexpected.error or ""), unexpected
    assert by_name["no-route-stated"].passed, by_name["no-route-stated"]


def test_ipv6_inject_is_routed_with_the_labs_source_and_next_hop(tmp_path: Path, lab_name: str) -> None:
    """No source or MAC written: h1's own address, r1's MAC (a broadcast frame would not be forwarded)."""
    checks = """\
checks:
  - name: injected
    setup: {listen: [{node: h2, port: 7100, address: "::"}]}
    traffic: [{inject: {node: h1, packet: "IPv6(dst='2001:db8:72::2')/UDP(dport=7100)/'x'"}}]
    expect:
      delivered: 1
      received_from: "2001:db8:71::2"
      counters: {r1: {Ip6.OutForwDatagrams: 1}}
  - name: ping6-options
    traffic: [{ping: {node: h1, to: "2001:db8:72::2", count: 2, size: 1000, df: true, interval: 0.05}}]
    expect:
      reachable: true
      counters: {h2: {Icmp6.InEchos: 2}}
"""
    result = run_lab(write(tmp_path, lab_name, ROUTED + checks))
    assert [(c.name, c.status, c.error, [r.as_dict() for r in c.evidence if not r.ok]) for c in result.checks
            if not c.passed] == []


def test_up_waits_for_dad_unless_the_node_turns_it_off(make_lab: LabFactory, lab_name: str) -> None:
    topo = make_lab(ROUTED)
    for node, dad in (("h1", "1"), ("h2", "0")):
        namespace = netns.namespace_name(topo.name, node)
        with NodeLinks(namespace) as handle:
            handle.refresh()
            assert handle.unsettled_ipv6() == ([], [])  # up returned after DAD
        assert sysctl.read("net.ipv6.conf.eth0.accept_dad", namespace) == dad


def test_a_listener_that_cannot_bind_is_an_error(tmp_path: Path, lab_name: str) -> None:
    checks = """\
checks:
  - name: port-taken
    setup: {listen: [{node: h2, port: 7200, address: "::"}, {node: h2, port: 7200, address: "::"}]}
    traffic: [{udp: {node: h1, to: "[2001:db8:72::2]:7200"}}]
    expect: {delivered: 1}
"""
    result = run_lab(write(tmp_path, lab_name, ROUTED + checks))
    (check,) = result.checks
    assert check.status == "error" and "listen on h2 udp :: port 7200" in (check.error or ""), check


def test_a_ping_the_node_itself_refuses_is_an_error(tmp_path: Path, lab_name: str) -> None:
    """ping -M do over the local MTU: ping counts the requests as transmitted, the check must not."""
    checks = """\
checks:
  - name: too-big-locally
    traffic: [{ping: {node: h1, to: "2001:db8:72::2", size: 2000, df: true}}]
    expect: {reachable: false}
"""
    result = run_lab(write(tmp_path, lab_name, ROUTED + checks))
    (check,) = result.checks
    assert check.status == "error" and "refused by the node's own stack" in (check.error or ""), check


def test_cli_send_listen_and_inject_take_ipv6(make_lab: LabFactory) -> None:
    from tests.lab.test_traffic_cli import Labctl, run

    topo = make_lab(ROUTED)
    listener = Labctl("listen", topo.name, "h2", "udp", "[::]:7300", "-n", "2", "--json", "--timeout", "10")
    listener.ready()
    sent = run("send", topo.name, "h1", "udp", "[2001:db8:72::2]:7300", "--payload", "six")
    assert sent.exit_code == 0, sent.output
    injected = run("inject", topo.name, "h1", "IPv6(dst='2001:db8:72::2')/UDP(sport=1, dport=7300)/'inj'")
    assert injected.exit_code == 0, injected.output
    code, lines, err = listener.finish()
    datagrams = [line for line in lines if line.get("type") == "datagram"]
    assert code == 0, err
    assert [d["source"].rpartition(":")[0] for d in datagrams] == ["2001:db8:71::2", "2001:db8:71::2"]
    unbracketed = run("send", topo.name, "h1", "udp", "2001:db8:72::2:7300")
    assert unbracketed.exit_code == 2 and "is not an IPv4 address" in unbracketed.output


def test_up_does_not_wait_for_interfaces_that_never_run_dad(make_lab: LabFactory) -> None:
    """An interface kept down and a bridge without ports keep their addresses tentative: up returns anyway."""
    started = time.monotonic()
    make_lab(
        """\
topology:
  nodes:
    a:
      ipv6: true
      bridges:
        br0: {}
      interfaces:
        eth0: {addresses: ["2001:db8:5::1/64"], up: false}
        br0: {addresses: ["2001:db8:6::1/64"]}
    b:
      ipv6: true
      dad: false
      interfaces:
        eth0: {addresses: ["2001:db8:5::2/64"]}
  links:
    - endpoints: ["a:eth0", "b:eth0"]
"""
    )
    assert time.monotonic() - started < 8  # the DAD wait gives up only after 10 s
