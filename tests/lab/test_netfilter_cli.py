"""``labctl rules`` and ``labctl hooks`` on a small routed lab with a DROP and a MASQUERADE rule.

    a (10.9.1.1) ── r (10.9.1.254 | 10.9.2.254, forwarding) ── b (10.9.2.1)

The commands are registered on a private Typer app (``register(app)``), so
they are tested whether or not labctl's own app has wired them in yet.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from labctl.cli.netfilter import register
from tests.conftest import LabFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")

ROUTED = """\
topology:
  nodes:
    a:
      interfaces:
        eth0: {addresses: [10.9.1.1/24]}
      routes:
        - {dst: default, via: 10.9.1.254}
    r:
      sysctls: {net.ipv4.ip_forward: 1}
      interfaces:
        eth0: {addresses: [10.9.1.254/24]}
        eth1: {addresses: [10.9.2.254/24]}
      iptables:
        - "-A FORWARD -p udp --dport 6000 -j DROP"
        - "-t nat -A POSTROUTING -o eth1 -j MASQUERADE"
    b:
      interfaces:
        eth0: {addresses: [10.9.2.1/24]}
  links:
    - endpoints: ["a:eth0", "r:eth0"]
    - endpoints: ["r:eth1", "b:eth0"]
"""

FORWARDED = [
    "raw:PREROUTING",
    "mangle:PREROUTING",
    "nat:PREROUTING",
    "mangle:FORWARD",
    "filter:FORWARD",
    "security:FORWARD",
    "mangle:POSTROUTING",
    "nat:POSTROUTING",
]


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def main() -> None:
        """labctl (test copy)."""

    register(app)
    return app


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(_app(), list(args), env={"COLUMNS": "250"})


def _json(*args: str) -> Any:
    result = _invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _walks(data: dict[str, Any]) -> dict[str, list[str]]:
    return {item["node"]: item["walk"] for item in data["nodes"]}


def test_rules_lists_every_rule_with_counters(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(ROUTED)
    rows = _json("rules", lab_name)
    by_key = {(r["node"], r["table"], r["chain"], r["number"]): r for r in rows}
    drop = by_key[("r", "filter", "FORWARD", 1)]
    assert drop["rule"].endswith("-j DROP") and drop["packets"] == 0 and drop["family"] == "ip"
    assert by_key[("r", "filter", "FORWARD", 0)]["policy"] == "ACCEPT"
    assert "MASQUERADE" in by_key[("r", "nat", "POSTROUTING", 1)]["rule"]
    assert not [r for r in rows if r["node"] in ("a", "b")]  # listing creates no table

    assert _json("rules", lab_name, "b") == []
    table = _invoke("rules", lab_name, "r")
    assert table.exit_code == 0
    assert "MASQUERADE" in table.stdout and "--dport 6000 -j DROP" in table.stdout


def test_rules_help_names_the_legacy_backend() -> None:
    result = _invoke("rules", "--help")
    assert result.exit_code == 0
    assert "iptables-legacy" in result.stdout


def test_hooks_walks_a_forwarded_packet_through_nat(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(ROUTED)
    data = _json("hooks", lab_name, "a", "IP(dst='10.9.2.1')/UDP(dport=5000)")
    walks = _walks(data)
    assert list(walks) == ["a", "r", "b"]  # by distance from the sender
    assert walks["a"] == []  # injected below IP: no OUTPUT hook
    assert walks["r"] == FORWARDED
    assert walks["b"][:2] == ["raw:PREROUTING", "mangle:PREROUTING"] and "filter:INPUT" in walks["b"]
    b_steps = next(n for n in data["nodes"] if n["node"] == "b")["steps"]
    assert {s["src"] for s in b_steps} == {"10.9.2.254"}  # masqueraded on r
    assert data["drops"] == {"NO_SOCKET at __udp4_lib_rcv": 1}
    # a second trace is a new flow (random source port), so nat is consulted again
    assert _walks(_json("hooks", lab_name, "a", "IP(dst='10.9.2.1')/UDP(dport=5000)"))["r"] == FORWARDED


def test_hooks_names_the_dropping_rule(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(ROUTED)
    data = _json("hooks", lab_name, "a", "IP(dst='10.9.2.1')/UDP(dport=6000)", "--via", "r", "--via", "b")
    walks = _walks(data)
    assert list(walks) == ["r", "b"]
    assert walks["r"][-1] == "filter:FORWARD" and "mangle:POSTROUTING" not in walks["r"]
    assert walks["b"] == []
    (verdict,) = next(n for n in data["nodes"] if n["node"] == "r")["dropped_by"]
    assert verdict["where"] == "filter:FORWARD rule 1" and verdict["packets"] == 1
    assert data["drops"] == {"NETFILTER_DROP at nf_hook_slow": 1}

    rows = _json("rules", lab_name, "r")
    assert not [r for r in rows if "NFLOG" in r["rule"]]  # the trace's rules are gone again
    (drop,) = [r for r in rows if r["chain"] == "FORWARD" and r["number"] == 1]
    assert drop["packets"] == 1

    text = _invoke("hooks", lab_name, "a", "IP(dst='10.9.2.1')/UDP(dport=6000)", "--via", "r")
    assert text.exit_code == 0
    assert "r: 10.9.1.1 → 10.9.2.1 raw:PREROUTING → mangle:PREROUTING" in text.stdout
    assert "dropped by filter:FORWARD rule 1" in text.stdout


def test_hooks_errors(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(ROUTED)
    unknown = _invoke("hooks", lab_name, "a", "IP(dst='10.9.2.1')/UDP(dport=5000)", "--via", "zz")
    assert unknown.exit_code == 2 and "has no node zz" in unknown.output  # bad input
    not_up = _invoke("hooks", f"{lab_name}down", "a", "IP(dst='10.9.2.1')/UDP()")
    assert not_up.exit_code == 2 and "is not up" in not_up.output
