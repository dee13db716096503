"""Loading a lab file: the topology model plus the checks that need this machine.

The topology package validates shape and cross references without knowing
the kernel; the few rules that depend on the running machine (which sysctls
are host-wide, how many CPUs an RPS mask may name) are checked here, still
before anything is built, and still reported with file, line and key.
"""

from __future__ import annotations

import os

from labctl.errors import LabFileError, Problem
from labctl.kernel import ebtables, iptables, sysctl
from labctl.topology.loader import SourceMap, load_file
from labctl.topology.model import Topology


def machine_problems(topo: Topology, source: SourceMap) -> list[Problem]:
    problems = []
    for key in topo.sysctls:
        if not sysctl.is_global(key):
            problems.append(
                source.problem(
                    ("sysctls", key),
                    f"{key} is not a host-wide sysctl; per-namespace sysctls go under a node's 'sysctls'"
                    f" (host-wide ones labctl knows: {', '.join(sorted(sysctl.GLOBAL_KEYS))})",
                )
            )
        elif not os.path.exists(sysctl.proc_path(key)):
            problems.append(source.problem(("sysctls", key), f"this kernel has no sysctl {key}"))
    cpus = os.cpu_count() or 1
    for name, node in topo.nodes.items():
        for key in node.sysctls:
            if sysctl.is_global(key):
                problems.append(
                    source.problem(
                        ("topology", "nodes", name, "sysctls", key),
                        f"{key} is host-wide, not per namespace; set it in the lab's top-level 'sysctls'"
                        " so it is recorded and restored",
                    )
                )
        for ifname, cfg in node.interfaces.items():
            if cfg.rps_cpus is not None:
                mask = int(cfg.rps_cpus.replace(",", ""), 16)
                if mask >> cpus:
                    problems.append(
                        source.problem(
                            ("topology", "nodes", name, "interfaces", ifname, "rps_cpus"),
                            f"mask {cfg.rps_cpus} names CPUs this machine does not have (it has {cpus})",
                        )
                    )
    return problems


def rule_problems(topo: Topology, source: SourceMap) -> list[Problem]:
    """Rules are parsed (not yet applied) before anything is built; checks' rules too."""
    problems = []
    places: list[tuple[tuple[str | int, ...], str, list[str]]] = []
    for name, node in topo.nodes.items():
        places.append((("topology", "nodes", name, "iptables"), "iptables", node.iptables))
        places.append((("topology", "nodes", name, "ebtables"), "ebtables", node.ebtables))
    for i, check in enumerate(getattr(topo, "checks", [])):
        for node, rules in check.setup.iptables.items():
            places.append((("checks", i, "setup", "iptables", node), "iptables", rules))
        for node, rules in check.setup.ebtables.items():
            places.append((("checks", i, "setup", "ebtables", node), "ebtables", rules))
    for path, kind, rules in places:
        parse = iptables.parse_rule if kind == "iptables" else ebtables.parse_rule
        for index, rule in enumerate(rules):
            try:
                parse(rule)
            except iptables.RuleError as exc:
                problems.append(source.problem((*path, index), str(exc)))
    return problems


def load_lab(file: str) -> tuple[Topology, SourceMap]:
    """Load and validate a lab file completely; raises LabFileError listing every problem."""
    topo, source = load_file(file, Topology)
    problems = machine_problems(topo, source) + rule_problems(topo, source)
    if problems:
        raise LabFileError(problems)
    return topo, source
