"""Loading a lab file: the topology model plus the checks that need this machine.

The topology package validates shape and cross references without knowing
the kernel; the few rules that depend on the running machine (which sysctls
are host-wide, how many CPUs an RPS mask may name) are checked here, still
before anything is built, and still reported with file, line and key.
"""

from __future__ import annotations

import os
from typing import Any

from labctl.errors import LabFileError, Problem
from labctl.kernel import sysctl
from labctl.topology.checks import LabFile
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
    node_sysctls: list[tuple[tuple[str | int, ...], dict[str, Any]]] = [
        (("topology", "nodes", n, "sysctls"), spec.sysctls) for n, spec in topo.nodes.items()
    ]
    for i, check in enumerate(topo.checks if isinstance(topo, LabFile) else []):
        node_sysctls += [(("checks", i, "setup", "sysctls", n), values) for n, values in check.setup.sysctls.items()]
    for base, values in node_sysctls:
        for key in values:
            if not key.startswith("net."):
                problems.append(
                    source.problem(
                        (*base, key),
                        f"{key} is not a network sysctl: outside net.* sysctls are not per namespace,"
                        " so a node cannot have its own",
                    )
                )
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
    from labctl.kernel import ebtables, iptables  # python-iptables costs 0.16 s to import

    problems = []
    places: list[tuple[tuple[str | int, ...], str, list[str]]] = []
    for name, spec in topo.nodes.items():
        places.append((("topology", "nodes", name, "iptables"), "iptables", spec.iptables))
        places.append((("topology", "nodes", name, "ebtables"), "ebtables", spec.ebtables))
    for i, check in enumerate(topo.checks if isinstance(topo, LabFile) else []):
        for target, rules in check.setup.iptables.items():
            places.append((("checks", i, "setup", "iptables", target), "iptables", rules))
        for target, rules in check.setup.ebtables.items():
            places.append((("checks", i, "setup", "ebtables", target), "ebtables", rules))
    for path, kind, rules in places:
        parse = iptables.parse_rule if kind == "iptables" else ebtables.parse_rule
        for index, rule in enumerate(rules):
            try:
                parse(rule)
            except iptables.RuleError as exc:
                problems.append(source.problem((*path, index), str(exc)))
    return problems


def expectation_problems(lab: LabFile, source: SourceMap) -> list[Problem]:
    """Names the checks expect (drop reasons, tracepoints, counters, hook steps) exist in this kernel."""
    if not lab.checks:
        return []
    from labctl.expect.validate import machine_issues
    from labctl.lab.facts import machine_facts

    interfaces = {n: frozenset(lab.interface_names(n)) for n in lab.nodes}
    return [source.problem(path, message) for path, message in machine_issues(lab.checks, interfaces, machine_facts())]


def load_lab(file: str) -> tuple[LabFile, SourceMap]:
    """Load and validate a lab file (topology and checks) completely, before anything is built.

    Raises LabFileError listing every problem with file, line and key.
    """
    lab, source = load_file(file, LabFile)
    problems = machine_problems(lab, source) + rule_problems(lab, source) + expectation_problems(lab, source)
    if problems:
        raise LabFileError(problems)
    return lab, source
