"""ip6tables in labs on the real kernel: converge, a check's rules undone, kill -9 of a tracer, rules and hooks.

    a (2001:db8:81::2) ── r (2001:db8:81::1 | 2001:db8:82::1, forwarding) ── b (2001:db8:82::2)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from labctl.cli.netfilter import register
from labctl.kernel import iptables, netns, tracerules
from labctl.lab import build
from labctl.topology.checks import LabFile
from labctl.verify.stage import temporary_rules
from tests.conftest import LabFactory
from tests.topologies import up_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")

ROUTED6 = """\
topology:
  nodes:
    a:
      ipv6: true
      dad: false
      interfaces:
        eth0: {addresses: ["2001:db8:81::2/64"]}
      routes:
        - {dst: default, via: "2001:db8:81::1"}
    r:
      ipv6: true
      dad: false
      sysctls: {net.ipv6.conf.all.forwarding: 1}
      interfaces:
        eth0: {addresses: ["2001:db8:81::1/64"]}
        eth1: {addresses: ["2001:db8:82::1/64"]}
      ip6tables:
        - "-A FORWARD -p udp --dport 6001"
        - "-A FORWARD -p udp --dport 6000 -j DROP"
    b:
      ipv6: true
      dad: false
      interfaces:
        eth0: {addresses: ["2001:db8:82::2/64"]}
      routes:
        - {dst: default, via: "2001:db8:82::1"}
  links:
    - endpoints: ["a:eth0", "r:eth0"]
    - endpoints: ["r:eth1", "b:eth0"]
"""


def _rows(namespace: str) -> list[tuple[str, str, int, str]]:
    return [(r.table, r.chain, r.position, r.rule) for r in iptables.list_rules(namespace, family="ip6") if r.position]


def test_second_up_changes_nothing_and_keeps_counters(tmp_path: Path, lab_name: str) -> None:
    file = tmp_path / "lab.yaml"
    body = 'topology:\n  nodes:\n    a:\n      ipv6: true\n      ip6tables: ["-A OUTPUT -p icmpv6", "-N mine"]\n'
    try:
        up_file(file, lab_name, body)
        namespace = netns.namespace_name(lab_name, "a")
        subprocess.run(["ip", "netns", "exec", namespace, "ping", "-6", "-c1", "-W1", "::1"], capture_output=True)
        counted = [r.packets for r in iptables.list_rules(namespace, family="ip6") if r.position]
        assert counted and counted[0] >= 1
        assert up_file(file, lab_name, body) == []  # a second up changes nothing ...
        assert [r.packets for r in iptables.list_rules(namespace, family="ip6") if r.position] == counted  # at all
        changed = body.replace("-p icmpv6", "-p udp")
        assert up_file(file, lab_name, changed) == ["a: ip6tables replaced"]
        assert _rows(namespace) == [("filter", "OUTPUT", 1, "-A OUTPUT -p udp")]
        assert up_file(file, lab_name, "topology:\n  nodes:\n    a: {ipv6: true}\n") == ["a: ip6tables removed"]
        assert _rows(namespace) == []
    finally:
        build.down(lab_name)


def test_a_checks_rules_are_undone_and_the_nodes_own_restored(make_lab: LabFactory, lab_name: str) -> None:
    lab = make_lab(
        ROUTED6
        + "checks:\n  - name: c\n    setup:\n      ip6tables:\n"
        + '        r: ["-I FORWARD 1 -p udp --dport 6002 -j DROP"]\n        b: ["-A INPUT -p udp"]\n'
        + '    traffic: [{udp: {node: a, to: "[2001:db8:82::2]:6002"}}]\n'
        + "    expect: {counters: {b: {Udp6.InDatagrams: 0}}}\n"
    )
    assert isinstance(lab, LabFile)
    r, b = (netns.namespace_name(lab_name, n) for n in ("r", "b"))
    own = _rows(r)
    with temporary_rules(lab, lab.checks[0]):
        assert _rows(r)[0] == ("filter", "FORWARD", 1, "-A FORWARD -p udp -m udp --dport 6002 -j DROP")
        assert len(_rows(b)) == 1
    assert _rows(r) == own and _rows(b) == []


_HOOK_HOLDER = """
import sys, time
from labctl.kernel.nftrace import HookTracer
with HookTracer(sys.argv[1], tables=(), tables6=("raw", "filter")):
    print("installed", flush=True)
    time.sleep(60)
"""


def test_kill_9_of_an_ipv6_hook_tracer_leaves_no_rule_after_the_next_command(
    make_lab: LabFactory, lab_name: str
) -> None:
    make_lab(ROUTED6)
    namespace = netns.namespace_name(lab_name, "r")
    own = _rows(namespace)
    proc = subprocess.Popen([sys.executable, "-c", _HOOK_HOLDER, namespace], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "installed"
    assert any("NFLOG" in rule for *_, rule in _rows(namespace))
    proc.kill()
    proc.wait()
    labctl = os.path.join(os.path.dirname(sys.executable), "labctl")
    result = subprocess.run([labctl, "status", lab_name], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _rows(namespace) == own  # the user's rules, numbered as before the trace
    # this lab's record went with its rules (other labs' tracers, alive or dying, are not this test's)
    assert [r for r in tracerules._records() if r.get("namespace") == namespace] == []


def _json(*args: str) -> Any:
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def main() -> None:
        """labctl (test copy)."""

    register(app)
    result = CliRunner().invoke(app, [*args, "--json"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_rules_and_hooks_show_ipv6(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(ROUTED6)
    rows = _json("rules", lab_name, "r")
    assert {(x["family"], x["chain"], x["number"]) for x in rows if x["number"]} == {
        ("ip6", "FORWARD", 1),
        ("ip6", "FORWARD", 2),
    }
    data = _json("hooks", lab_name, "a", "IPv6(dst='2001:db8:82::2')/UDP(dport=6000)", "--via", "r", "--via", "b")
    walks = {item["node"]: item["walk"] for item in data["nodes"]}
    assert walks["r"] == [
        "ip6:raw:PREROUTING",
        "ip6:mangle:PREROUTING",
        "ip6:nat:PREROUTING",
        "ip6:mangle:FORWARD",
        "ip6:filter:FORWARD",
    ]
    assert walks["b"] == []
    assert data["flow"] is not None and data["ip_id"] is None
    (verdict,) = next(n for n in data["nodes"] if n["node"] == "r")["dropped_by"]
    assert verdict["where"] == "ip6:filter:FORWARD rule 2" and verdict["packets"] == 1
    assert data["drops"] == {"NETFILTER_DROP at nf_hook_slow": 1}
    passed = _json("hooks", lab_name, "a", "IPv6(dst='2001:db8:82::2')/UDP(dport=6001)", "--via", "b")
    assert [item["walk"][:2] for item in passed["nodes"]] == [["ip6:raw:PREROUTING", "ip6:mangle:PREROUTING"]]


BRIDGED6 = """\
topology:
  nodes:
    a:
      ipv6: true
      dad: false
      interfaces:
        eth0: {addresses: ["2001:db8:83::1/64"]}
    sw:
      bridges: {br0: {ports: [p1, p2]}}
    b:
      ipv6: true
      dad: false
      interfaces:
        eth0: {addresses: ["2001:db8:83::2/64"]}
  links:
    - endpoints: ["a:eth0", "sw:p1"]
    - endpoints: ["b:eth0", "sw:p2"]
"""


def test_hooks_follow_an_ipv6_frame_across_a_bridge(make_lab: LabFactory, lab_name: str) -> None:
    """The bridge's ebtables steps are matched on IPv6 frames (-p IPv6 --ip6-proto udp ...) for an IPv6 trace."""
    make_lab(BRIDGED6)
    data = _json("hooks", lab_name, "a", "IPv6(dst='2001:db8:83::2')/UDP(dport=6003)", "--via", "sw", "--via", "b")
    walks = {item["node"]: item["walk"] for item in data["nodes"]}
    assert "bridge:filter:FORWARD" in walks["sw"] and walks["sw"][0] == "bridge:nat:PREROUTING"
    assert walks["b"][:2] == ["ip6:raw:PREROUTING", "ip6:mangle:PREROUTING"]
