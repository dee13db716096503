"""Lab files for the usual shapes: star, linear, tree and clos, with every address assigned.

Like Mininet's ``--topo linear,3`` or containerlab's ``generate``: a user asks
for a shape and a size and gets a lab file to read, edit, ``up`` and ``run``.
This module only builds plain data (the same dicts a YAML lab file parses
into) and renders it; it knows nothing of the kernel, so its output is
compared with golden files in the tests, and ``labctl validate`` / ``up``
judge it with the same loader as a hand-written file.

Address plans, chosen so a reader can tell from an address where it lives:

- star, tree (one L2 segment of Linux bridges): hosts ``h1..hN`` in
  ``10.0.0.0/24`` (a larger prefix when more hosts need it), ``hI`` = 10.0.0.I.
- linear (L3, static routes): ``h1 - r1 - ... - rN - h2``; link K is
  ``10.0.K.0/24``; ``.1`` is the router nearer h1 (r1 on link 1), ``.2`` the
  other end.  Every router has a route to every subnet it is not on.
- clos (L3 leaf-spine): leaf L's hosts are ``10.0.L.0/24`` behind bridge br0
  (gateway ``10.0.L.1``); the link spine S - leaf L is ``10.S.L.0/24`` (spine
  ``.1``, leaf ``.2``).  Traffic between leaves L and M crosses spine
  ``(L + M) mod S + 1`` both ways, so paths are spread over the spines and
  symmetric (no reverse-path surprises).
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from labctl.errors import LabctlError
from labctl.names import lab_name_problem

MAX_NODES = 5000
"""A generated lab is brought up by one ``labctl up``; beyond this it is a typo, not a lab."""

Lab = dict[str, Any]


class GenerateError(LabctlError):
    """The shape asked for cannot be made (a size out of range, a bad name): bad input, exit 2."""

    exit_code = 2


def _need(value: int, what: str, low: int, high: int) -> None:
    if not low <= value <= high:
        raise GenerateError(f"{what} must be between {low} and {high}, got {value}")


def _lab(name: str, description: str, nodes: dict[str, Any], links: list[list[str]], checks: list[Any]) -> Lab:
    problem = lab_name_problem(name)
    if problem is not None:
        raise GenerateError(problem)
    if len(nodes) > MAX_NODES:
        raise GenerateError(f"that makes {len(nodes)} nodes; labctl generate makes at most {MAX_NODES}")
    lab: Lab = {
        "name": name,
        "description": description,
        "topology": {"nodes": nodes, "links": [{"endpoints": ends} for ends in links]},
    }
    if checks:
        lab["checks"] = checks
    return lab


def _reach_check(name: str, node: str, address: str, description: str) -> dict[str, Any]:
    """A check that the far end answers a ping: ``labctl run`` of the generated file proves the wiring."""
    return {
        "name": name,
        "description": description,
        "traffic": [{"ping": {"node": node, "to": address}}],
        "expect": {"reachable": True},
    }


def _segment(hosts: int) -> ipaddress.IPv4Network:
    """10.0.0.0/24, or the smallest larger prefix with room for ``hosts`` addresses."""
    bits = max(8, math.ceil(math.log2(hosts + 2)))
    return ipaddress.IPv4Network(f"10.0.0.0/{32 - bits}")


def _host(address: ipaddress.IPv4Address, prefix: int, gateway: str | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {"interfaces": {"eth0": {"addresses": [f"{address}/{prefix}"]}}}
    if gateway is not None:
        node["routes"] = [{"dst": "default", "via": gateway}]
    return node


def _router(interfaces: dict[str, str], routes: list[tuple[str, str]]) -> dict[str, Any]:
    node: dict[str, Any] = {
        "sysctls": {"net.ipv4.ip_forward": 1},
        "interfaces": {ifname: {"addresses": [address]} for ifname, address in interfaces.items()},
    }
    if routes:
        node["routes"] = [{"dst": dst, "via": via} for dst, via in routes]
    return node


def _switch(ports: list[str]) -> dict[str, Any]:
    return {"bridges": {"br0": {"ports": ports}}}


def star(hosts: int, name: str = "star") -> Lab:
    """Mininet's ``single,N``: one switch node ``sw`` whose bridge br0 joins hosts h1..hN."""
    _need(hosts, "--hosts", 1, MAX_NODES - 1)
    net = _segment(hosts)
    nodes: dict[str, Any] = {"sw": _switch([f"eth{i}" for i in range(1, hosts + 1)])}
    links = []
    for i in range(1, hosts + 1):
        nodes[f"h{i}"] = _host(net[i], net.prefixlen)
        links.append([f"h{i}:eth0", f"sw:eth{i}"])
    checks = []
    if hosts > 1:
        checks.append(_reach_check("h1-reaches-last-host", "h1", str(net[hosts]), f"h1 reaches h{hosts} via sw's br0"))
    return _lab(name, f"star: {hosts} hosts on one bridge (sw:br0), {net}", nodes, links, checks)


def linear(routers: int, name: str = "linear") -> Lab:
    """``h1 - r1 - ... - rN - h2``, routed hop by hop with static routes."""
    _need(routers, "--routers", 1, 253)
    last = routers + 1  # link number of rN - h2

    def subnet(k: int) -> str:
        return f"10.0.{k}.0/24"

    nodes: dict[str, Any] = {"h1": _host(ipaddress.IPv4Address("10.0.1.2"), 24, "10.0.1.1")}
    links = [["h1:eth0", "r1:eth0"]]
    for i in range(1, routers + 1):
        # r_i sits on link i (eth0, towards h1) and link i+1 (eth1, towards h2)
        left = "10.0.1.1/24" if i == 1 else f"10.0.{i}.2/24"
        right = f"10.0.{i + 1}.1/24"
        routes = [(subnet(k), f"10.0.{i}.1") for k in range(1, i)]
        routes += [(subnet(k), f"10.0.{i + 1}.2") for k in range(i + 2, last + 1)]
        nodes[f"r{i}"] = _router({"eth0": left, "eth1": right}, routes)
        links.append([f"r{i}:eth1", f"r{i + 1}:eth0" if i < routers else "h2:eth0"])
    nodes["h2"] = _host(ipaddress.IPv4Address(f"10.0.{last}.2"), 24, f"10.0.{last}.1")
    checks = [_reach_check("ends-reach-each-other", "h1", f"10.0.{last}.2", f"h1 reaches h2 across {routers} routers")]
    return _lab(name, f"linear: h1 - r1..r{routers} - h2, static routes", nodes, links, checks)


def tree(depth: int, fanout: int, name: str = "tree") -> Lab:
    """Mininet's ``tree,depth,fanout``: switches s1.. (s1 the root, numbered depth first), hosts at the leaves."""
    _need(depth, "--depth", 1, 12)
    _need(fanout, "--fanout", 1, MAX_NODES)
    switches = sum(fanout**d for d in range(depth))
    hosts = fanout**depth
    if switches + hosts > MAX_NODES:
        raise GenerateError(
            f"depth {depth}, fanout {fanout} make {switches + hosts} nodes; labctl generate makes at most {MAX_NODES}"
        )
    net = _segment(hosts)
    nodes: dict[str, Any] = {}
    links: list[list[str]] = []
    counter = {"s": 0, "h": 0}

    def add_switch(level: int, uplink: str | None) -> None:
        counter["s"] += 1
        me = f"s{counter['s']}"
        nodes[me] = {}  # placed now so nodes read in depth-first order
        if uplink is not None:
            links.append([f"{me}:eth0", uplink])
        ports = [] if uplink is None else ["eth0"]
        for port in range(1, fanout + 1):
            ports.append(f"eth{port}")
            if level + 1 < depth:
                add_switch(level + 1, f"{me}:eth{port}")
            else:
                counter["h"] += 1
                host = f"h{counter['h']}"
                nodes[host] = _host(net[counter["h"]], net.prefixlen)
                links.append([f"{host}:eth0", f"{me}:eth{port}"])
        nodes[me] = _switch(ports)

    add_switch(0, None)
    checks = []
    if hosts > 1:
        checks.append(
            _reach_check("h1-reaches-last-host", "h1", str(net[hosts]), f"h1 reaches h{hosts} across the bridges")
        )
    return _lab(name, f"tree: depth {depth}, fanout {fanout}: {switches} switches, {hosts} hosts, {net}", nodes, links,
                checks)


def clos(spines: int, leaves: int, hosts_per_leaf: int, name: str = "clos") -> Lab:
    """A leaf-spine fabric: every leaf linked to every spine, hosts on a bridge in their leaf."""
    _need(spines, "--spines", 1, 254)
    _need(leaves, "--leaves", 1, 254)
    _need(hosts_per_leaf, "--hosts-per-leaf", 1, 253)
    total = spines + leaves * (1 + hosts_per_leaf)
    if total > MAX_NODES:
        raise GenerateError(f"that makes {total} nodes; labctl generate makes at most {MAX_NODES}")

    def spine_for(a: int, b: int) -> int:
        return (a + b) % spines + 1

    nodes: dict[str, Any] = {}
    links: list[list[str]] = []
    for s in range(1, spines + 1):
        nodes[f"spine{s}"] = _router(
            {f"l{leaf}": f"10.{s}.{leaf}.1/24" for leaf in range(1, leaves + 1)},
            [(f"10.0.{leaf}.0/24", f"10.{s}.{leaf}.2") for leaf in range(1, leaves + 1)],
        )
    for leaf in range(1, leaves + 1):
        ports = [f"h{i}" for i in range(1, hosts_per_leaf + 1)]
        node = _router(
            {f"s{s}": f"10.{s}.{leaf}.2/24" for s in range(1, spines + 1)},
            [(f"10.0.{other}.0/24", f"10.{spine_for(leaf, other)}.{leaf}.1")
             for other in range(1, leaves + 1) if other != leaf],
        )
        node["bridges"] = {"br0": {"ports": ports}}
        node["interfaces"]["br0"] = {"addresses": [f"10.0.{leaf}.1/24"]}
        nodes[f"leaf{leaf}"] = node
        links += [[f"leaf{leaf}:s{s}", f"spine{s}:l{leaf}"] for s in range(1, spines + 1)]
        for i in range(1, hosts_per_leaf + 1):
            nodes[f"h{leaf}-{i}"] = _host(ipaddress.IPv4Address(f"10.0.{leaf}.{i + 1}"), 24, f"10.0.{leaf}.1")
            links.append([f"h{leaf}-{i}:eth0", f"leaf{leaf}:h{i}"])
    far = f"h{leaves}-{hosts_per_leaf}"
    checks = []
    if far != "h1-1":
        checks.append(_reach_check("first-host-reaches-last-host", "h1-1", f"10.0.{leaves}.{hosts_per_leaf + 1}",
                                   f"h1-1 reaches {far} across the fabric"))
    return _lab(
        name,
        f"clos: {spines} spines, {leaves} leaves, hosts per leaf: {hosts_per_leaf}, static routes",
        nodes,
        links,
        checks,
    )


def to_yaml(lab: Lab, command: str) -> str:
    """The lab as YAML a person reads: keys in the order written, short lists inline, the command on top."""
    import yaml

    body = yaml.safe_dump(lab, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)
    return f"# generated by: {command}\n# edit freely; labctl validate FILE checks it, labctl up FILE builds it\n{body}"
