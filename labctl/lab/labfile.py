"""Loading a lab file: the topology model plus the checks that need this machine.

The topology package validates shape and cross references without knowing
the kernel; the few rules that depend on the running machine (which sysctls
are host-wide, how many CPUs an RPS mask may name) are checked here, still
before anything is built, and still reported with file, line and key.
"""

from __future__ import annotations

import os
from typing import Any

from labctl.errors import KernelLacksError, KeyPath, LabFileError, Problem
from labctl.kernel import kconfig, sysctl, version
from labctl.topology.kinds import BRIDGE_VLAN_OPTION, KIND_OPTIONS, required_options
from labctl.topology.loader import SourceMap, load_file
from labctl.topology.model import LabFile, Topology


def machine_problems(topo: Topology, source: SourceMap) -> list[Problem]:
    problems = _host_sysctl_problems(topo, source) + _node_sysctl_problems(topo, source)
    cpus = os.cpu_count() or 1
    for name, node in topo.nodes.items():
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


def _host_sysctl_problems(topo: Topology, source: SourceMap) -> list[Problem]:
    problems = []
    for key, value in topo.sysctls.items():
        path = ("sysctls", key)
        if (bad := sysctl.key_problem(key)) is not None:
            problems.append(source.problem(path, bad))
        elif not sysctl.is_global(key):
            problems.append(
                source.problem(
                    path,
                    f"{key} is not a host-wide sysctl; per-namespace sysctls go under a node's 'sysctls'"
                    f" (host-wide ones labctl knows: {', '.join(sorted(sysctl.GLOBAL_KEYS))})",
                )
            )
        elif not os.path.exists(sysctl.proc_path(key)):
            problems.append(source.problem(path, f"this kernel has no sysctl {key}"))
        elif (bad := sysctl.value_problem(key, value, sysctl.read_host(key))) is not None:
            problems.append(source.problem(path, bad))
    return problems


def _node_sysctl_problems(topo: Topology, source: SourceMap) -> list[Problem]:
    """Per-node sysctls (the topology's and the checks'): real, this node's own, and of the right shape.

    Whether a key exists and is writable inside a node is asked of a fresh
    unnamed namespace (see sysctl.probe_fresh_namespace); per-interface keys
    are asked of ``lo``, since the node's interfaces do not exist yet.
    """
    places: list[tuple[KeyPath, str, dict[str, Any]]] = [
        (("topology", "nodes", n, "sysctls"), n, spec.sysctls) for n, spec in topo.nodes.items()
    ]
    for i, check in enumerate(topo.checks if isinstance(topo, LabFile) else []):
        places += [(("checks", i, "setup", "sysctls", n), n, values) for n, values in check.setup.sysctls.items()]
    problems: list[Problem] = []
    to_probe: dict[tuple[KeyPath, str], str] = {}
    for base, node, values in places:
        for key in values:
            path = (*base, key)
            message = _node_key_problem(topo, node, key)
            if message is not None:
                problems.append(source.problem(path, message))
                continue
            per_interface = sysctl.interface_of(key)
            to_probe[(path, key)] = per_interface[1] if per_interface else key
    probed = sysctl.probe_fresh_namespace(sorted(set(to_probe.values())))
    for (path, key), probe_key in to_probe.items():
        seen = probed.get(probe_key) if probed is not None else None
        if seen is None:  # no probe (not root): the host's /proc/sys is the best evidence
            seen = "writable" if os.path.exists(sysctl.proc_path(probe_key)) else "missing"
        if seen == "missing" and key.startswith("net.bridge.") and not os.path.isdir("/proc/sys/net/bridge"):
            seen = "writable"  # br_netfilter, loaded by up for these keys, brings them
        if seen == "missing":
            where = (
                "only the host's namespace has it (it is host-wide)"
                if os.path.exists(sysctl.proc_path(probe_key))
                else "this kernel has no such sysctl"
            )
            problems.append(source.problem(path, f"{key} does not exist in a node's namespace: {where}"))
        elif seen == "read-only":
            problems.append(source.problem(path, f"{key} is read-only in a node's namespace: the host owns it"))
        else:
            value = _value_at(topo, path)
            if (bad := sysctl.value_problem(key, value, sysctl.read_host(probe_key))) is not None:
                problems.append(source.problem(path, bad))
    return problems


def _node_key_problem(topo: Topology, node: str, key: str) -> str | None:
    """What is wrong with ``key`` as a sysctl of ``node`` without asking the kernel, or None."""
    if (bad := sysctl.key_problem(key)) is not None:
        return bad
    if not key.startswith("net."):
        return (
            f"{key} is not a network sysctl: outside net.* sysctls are not per namespace,"
            " so a node cannot have its own"
        )
    if sysctl.is_global(key):
        return (
            f"{key} is host-wide, not per namespace; set it in the lab's top-level 'sysctls'"
            " so it is recorded and restored"
        )
    if key in sysctl.NOT_PER_NODE:
        return f"{key} cannot be a node's sysctl: {sysctl.NOT_PER_NODE[key]}"
    per_interface = sysctl.interface_of(key)
    if per_interface is not None and node in topo.nodes:
        ifname = per_interface[0]
        own = topo.interface_names(node)
        if ifname not in own | {"all", "default"}:
            return f"node {node} has no interface {ifname!r} (it has: {', '.join(sorted(own))})"
    return None


def _value_at(topo: Topology, path: KeyPath) -> Any:
    """The sysctl value at ``path`` (a node's or a check's setup) in the parsed lab."""
    if path[0] == "topology":
        return topo.nodes[str(path[2])].sysctls[str(path[4])]
    assert isinstance(topo, LabFile)
    return topo.checks[int(path[1])].setup.sysctls[str(path[4])][str(path[5])]


def rule_problems(topo: Topology, source: SourceMap) -> list[Problem]:
    """Rules are parsed (not yet applied) before anything is built; checks' rules too."""
    problems: list[Problem] = []
    places: list[tuple[tuple[str | int, ...], str, list[str]]] = []
    for name, spec in topo.nodes.items():
        places.append((("topology", "nodes", name, "iptables"), "iptables", spec.iptables))
        places.append((("topology", "nodes", name, "ip6tables"), "ip6tables", spec.ip6tables))
        places.append((("topology", "nodes", name, "ebtables"), "ebtables", spec.ebtables))
    for i, check in enumerate(topo.checks if isinstance(topo, LabFile) else []):
        if kconfig.missing(check.requires) or version.outside(check.kernel):
            continue  # never run on this kernel (reported not provable here): its rules need what it requires
        for target, rules in check.setup.iptables.items():
            places.append((("checks", i, "setup", "iptables", target), "iptables", rules))
        for target, rules in check.setup.ip6tables.items():
            places.append((("checks", i, "setup", "ip6tables", target), "ip6tables", rules))
        for target, rules in check.setup.ebtables.items():
            places.append((("checks", i, "setup", "ebtables", target), "ebtables", rules))
    if not any(rules for _, _, rules in places):
        return problems
    from labctl.kernel import ebtables, iptparse, iptrules  # pure parsers: python-iptables is not imported

    parsed: list[tuple[KeyPath, iptrules.ParsedRule]] = []
    for path, kind, rules in places:
        for index, rule in enumerate(rules):
            try:
                if kind == "ebtables":
                    result: Any = ebtables.parse_rule(rule)
                else:
                    result = iptparse.parse_rule(rule, "ip6" if kind == "ip6tables" else "ip")
            except iptrules.RuleError as exc:
                problems.append(source.problem((*path, index), str(exc)))
                continue
            if isinstance(result, iptrules.ParsedRule):
                parsed.append(((*path, index), result))
    chains: dict[tuple[str, str], set[str]] = {}  # (node, family) -> chains its rules create (-N): no extension
    for at, parsed_rule in parsed:
        if parsed_rule.command == "new-chain":
            chains.setdefault((_rule_node(at), parsed_rule.family), set()).add(parsed_rule.chain)
    for at, parsed_rule in parsed:
        if parsed_rule.family == "ip6" and _ip6_lacking(parsed_rule.table):
            if at[0] == "checks":  # a node's rules: the lab is not provable here (traffic_kernel_problems)
                problems.append(source.problem(at, _ip6_lacking_message(parsed_rule.table)))
            continue  # no ip6tables here: its extensions cannot be listed either
        problem = _missing_extension(parsed_rule, chains.get((_rule_node(at), parsed_rule.family), set()))
        if problem is not None:
            problems.append(source.problem(at, problem))
    return problems


def nft_problems(topo: Topology, source: SourceMap) -> list[Problem]:
    """Every nft ruleset (the nodes' and the checks' setup) is loaded by libnftables in a scratch namespace.

    A family this kernel lacks is named by its option first; otherwise nft's
    own message is reported at the lab file's line nft names.  As a user who
    cannot make a namespace nothing can be asked of the kernel: the rulesets
    are then checked by ``up``, which runs as root, before anything is built.
    """
    places: list[tuple[KeyPath, str, str | None]] = []
    for name, spec in topo.nodes.items():
        if spec.nftables is not None:
            places.append((("topology", "nodes", name, "nftables"), spec.nftables, None))
    for i, check in enumerate(topo.checks if isinstance(topo, LabFile) else []):
        if kconfig.missing(check.requires) or version.outside(check.kernel):
            continue
        for node, text in check.setup.nftables.items():
            base = topo.nodes[node].nftables if node in topo.nodes else None
            places.append((("checks", i, "setup", "nftables", node), text, base))
    if not places:
        return []
    from labctl.kernel import nft
    from labctl.topology import nft as nft_model

    problems: list[Problem] = []
    for path, text, base in places:
        if kconfig.missing(nft_model.requirements(text)):
            continue  # reported by traffic_kernel_problems, as what this kernel lacks
        if path[0] == "checks" and path[-1] not in topo.nodes:
            continue  # the check's own reference check names the unknown node
        if not nft.can_check():
            continue
        error = nft.check(text, base)
        if error is None:
            continue
        problems.append(_nft_problem(source, path, text, error))
    return problems


def _nft_problem(source: SourceMap, path: KeyPath, text: str, error: Any) -> Problem:
    """nft's message at the file line it names: a list item's own path, or the line inside a block."""
    from labctl.topology import nft as nft_model

    message = f"nft: {error}"
    line = error.line
    items = 0
    while (*path, items) in source.lines:  # written as a list: each command is one line of the joined text
        items += 1
    if items and line is not None:
        return source.problem((*path, min(line, items) - 1), message)
    at = nft_model.file_line(line or 1, source.line_of(path), text)
    return Problem(path=path, message=message, file=source.file, line=at)


def traffic_requirements(topo: Topology) -> list[tuple[KeyPath, str, str]]:
    """(key path, what, kernel option) for every qdisc, classifier, action and nft family the topology uses."""
    from labctl.topology import nft as nft_model
    from labctl.topology import tc as tc_model

    needed: list[tuple[KeyPath, str, str]] = []
    for name, spec in topo.nodes.items():
        for ifname, cfg in spec.interfaces.items():
            if cfg.tc is not None:
                base: KeyPath = ("topology", "nodes", name, "interfaces", ifname, "tc")
                needed += [((*base, *path), what, option) for path, what, option in tc_model.requirements(cfg.tc)]
        if spec.nftables is not None:
            for option in nft_model.requirements(spec.nftables):
                needed.append((("topology", "nodes", name, "nftables"), "nftables", option))
        if spec.ip6tables:
            for option in _ip6_requirements(spec.ip6tables):
                needed.append((("topology", "nodes", name, "ip6tables"), "ip6tables", option))
    return needed


def _ip6_lacking(table: str) -> list[str]:
    """What ip6tables rules in ``table`` need that this kernel is built without (nothing when it cannot tell)."""
    from labctl.kernel import xtables

    return kconfig.missing(xtables.ip6_requirements([table])) if kconfig.options() is not None else []


def _ip6_lacking_message(table: str) -> str:
    lacking = _ip6_lacking(table)
    return (
        f"ip6tables table {table}: this kernel lacks {', '.join(lacking)}; a check that needs it says so "
        f"(requires: [{', '.join(lacking)}]) and is then not provable here"
    )


def ip6_expect_problems(lab: LabFile, source: SourceMap) -> list[Problem]:
    """A check's ``ip6tables:`` counters and ``ip6:`` walk steps need ip6tables and the table, as its
    ``setup.ip6tables`` rules do: on a kernel without them a check that does not say so in ``requires:`` is
    refused here, by file line, instead of failing when it runs."""
    from labctl.kernel import xtables

    if kconfig.options() is None or not kconfig.missing(xtables.ip6_requirements(xtables.IP6_TABLE_OPTIONS)):
        return []  # cannot tell, or every ip6tables table is here (this machine): nothing to refuse
    from labctl.expect.kinds.netfilter import full_name
    from labctl.expect.walks import form_steps

    problems: list[Problem] = []
    for i, check in enumerate(lab.checks):
        if kconfig.missing(check.requires) or version.outside(check.kernel):
            continue  # never run on this kernel: reported not provable here
        counts, walks = (getattr(check.expect, key) or {} for key in ("ip6tables", "hooks"))  # generated model
        places: list[tuple[KeyPath, str]] = [
            (("checks", i, "expect", "ip6tables", node, key), key.split(":")[0])
            for node, wanted in counts.items()
            for key in wanted
        ]
        for node, form in walks.items():
            tables = [full_name(s).split(":")[1] for s in form_steps(form) if full_name(s).startswith("ip6:")]
            places += [(("checks", i, "expect", "hooks", node), table) for table in dict.fromkeys(tables)]
        problems += [source.problem(path, _ip6_lacking_message(table)) for path, table in places
                     if _ip6_lacking(table)]
    return problems


def _ip6_requirements(rules: list[str]) -> list[str]:
    """ip6tables itself and the option of each table the rules name (``-t nat`` -> CONFIG_IP6_NF_NAT)."""
    from labctl.kernel import xtables

    tables = []
    for rule in rules:
        words = rule.split()
        flags = [i for i, word in enumerate(words[:-1]) if word in ("-t", "--table")]
        tables.append(words[flags[0] + 1] if flags else "filter")
    return xtables.ip6_requirements(tables)


def traffic_kernel_problems(topo: Topology, source: SourceMap) -> tuple[list[Problem], list[str]]:
    """What the topology's tc and nftables need that this kernel is built without, named by option."""
    needed = traffic_requirements(topo)
    if not needed or kconfig.options() is None:  # the kernel's config is read only when something is needed
        return [], []
    problems: list[Problem] = []
    lacking: list[str] = []
    for path, what, option in needed:
        if kconfig.missing([option]):
            problems.append(source.problem(path, f"{what}: this kernel lacks {option}"))
            if option not in lacking:
                lacking.append(option)
    return problems, lacking


def tc_reference_problems(topo: Topology, source: SourceMap) -> list[Problem]:
    """A mirred action sends to an interface of the same node; a bpf filter's expression compiles (libpcap)."""
    problems = []
    for name, spec in topo.nodes.items():
        own = topo.interface_names(name)
        for ifname, cfg in spec.interfaces.items():
            for index, flt in enumerate(cfg.tc.filters if cfg.tc else []):
                path: KeyPath = ("topology", "nodes", name, "interfaces", ifname, "tc", "filters", index)
                if flt.action is not None and not isinstance(flt.action, str) and flt.action.mirred.to not in own:
                    problems.append(
                        source.problem(
                            (*path, "action"), f"node {name} has no interface {flt.action.mirred.to!r} to mirror to"
                        )
                    )
                if flt.kind == "bpf" and isinstance(flt.match, str):
                    from labctl.kernel.bpf import CaptureError, compile_filter

                    try:
                        compile_filter(flt.match)
                    except CaptureError as exc:
                        problems.append(source.problem((*path, "match"), str(exc)))
    return problems
def _rule_node(path: KeyPath) -> str:
    """The node a rule at ``path`` is applied in (a node's rules, or a check's setup for that node)."""
    return str(path[2] if path[0] == "topology" else path[4])


def _missing_extension(rule: Any, chains: set[str]) -> str | None:
    """An iptables / ip6tables match or target of ``rule`` this kernel lacks, said with the rule and "did you mean"."""
    from labctl.kernel import xtables

    for match in rule.matches:
        offer = xtables.offer("match", rule.family)
        if not offer.has(match.name):
            lacks = _lacks("match", match.name, offer.suggestion(match.name), rule.family)
            return rule.error(lacks, match.token).args[0]
    target = rule.target
    if target is None or target.name in xtables.STANDARD_TARGETS or target.name in chains:
        return None
    offer = xtables.offer("target", rule.family)
    if offer.has(target.name):
        return None
    where = f"{', '.join(sorted(chains))}" if chains else "none"
    reason = _lacks("target", target.name, offer.suggestion(target.name), rule.family)
    return rule.error(f"{reason}, and no chain of that name is created (-N) on this node (chains: {where})",
                      target.token).args[0]


def _lacks(kind: str, name: str, suggestion: str | None, family: str = "ip") -> str:
    hint = f" (did you mean {suggestion}?)" if suggestion else ""
    tool = "ip6tables" if family == "ip6" else "iptables"
    return f"this kernel has no {tool} {kind} {name!r}{hint}"


def expectation_problems(lab: LabFile, source: SourceMap) -> list[Problem]:
    """Names the checks expect (drop reasons, tracepoints, counters, hook steps) exist in this kernel."""
    if not lab.checks:
        return []
    from labctl.expect.validate import machine_issues
    from labctl.lab.facts import machine_facts

    interfaces = {n: frozenset(lab.interface_names(n)) for n in lab.nodes}
    # a check this kernel will not run (it lacks what the check requires, or is outside its kernel range) is
    # not held to this kernel's names: they may exist only where it runs (broute's table, a module's counter)
    skipped = {i for i, c in enumerate(lab.checks) if kconfig.missing(c.requires) or version.outside(c.kernel)}
    return [
        source.problem(path, message)
        for path, message in machine_issues(lab.checks, interfaces, machine_facts())
        if path[1] not in skipped
    ]


def feature_problems(lab: LabFile, source: SourceMap) -> list[Problem]:
    """ethtool features a check sets exist in this kernel (with "did you mean"); whether a device lets them
    change is only known when the check runs (an ERROR naming it)."""
    wanted = [
        (("checks", i, "setup", "features", ref, name), name)
        for i, check in enumerate(lab.checks)
        for ref, features in check.setup.features.items()
        for name in features
    ]
    if not wanted:
        return []
    from labctl.expect.base import suggest
    from labctl.kernel.offloads import feature_names
    from labctl.topology.steps import feature_name

    known = feature_names()
    return [
        source.problem(path, f"this kernel has no ethtool feature {feature_name(name)!r}{suggest(name, known)}")
        for path, name in wanted
        if known and feature_name(name) not in known
    ]
def _lacking(needed: list[tuple[KeyPath, str, str]]) -> set[str]:
    """Which of the needed options this kernel lacks: from its config, else asked of rtnetlink.

    Without a published config (no /proc/config.gz, no /boot/config-*) the
    kinds are probed in a throw-away namespace (kernel/kindprobe.py); an
    option that neither can tell about is not second-guessed: the build then
    reports the kernel's own refusal, still naming the object.
    """
    options = {option for _, _, option in needed}
    if kconfig.options() is not None:
        return set(kconfig.missing(sorted(options)))
    from labctl.kernel import kindprobe

    probe_of = {option: kind for kind, option in KIND_OPTIONS.items()}
    probe_of[BRIDGE_VLAN_OPTION] = "bridge_vlan_filtering"
    asked = sorted({probe_of[o] for o in options if o in probe_of})
    answers = kindprobe.probe(asked) or {}
    return {option for option in options if answers.get(probe_of.get(option, ""), True) is False}


def kernel_problems(topo: Topology, source: SourceMap) -> tuple[list[Problem], list[str]]:
    """Kinds and bridge features the topology uses that this kernel is built without, and their options."""
    needed = required_options(topo)
    missing = _lacking(needed) if needed else set()
    problems = [
        source.problem(path, f"{what}: this kernel lacks {option}")
        for path, what, option in needed
        if option in missing
    ]
    return problems, sorted(missing)


def load_lab(file: str) -> tuple[LabFile, SourceMap]:
    """Load and validate a lab file (topology and checks) completely, before anything is built.

    Raises LabFileError listing every problem with file, line and key; when
    the only problems are kinds or features this kernel lacks, the error is a
    KernelLacksError naming the options (``run`` reports the lab as SKIP).
    """
    lab, source = load_file(file, LabFile)
    kind_problems, kind_lacking = kernel_problems(lab, source)
    traffic_problems, traffic_lacking = traffic_kernel_problems(lab, source)
    lacking_problems = kind_problems + traffic_problems
    lacking = sorted(set(kind_lacking) | set(traffic_lacking))
    problems = (
        machine_problems(lab, source)
        + rule_problems(lab, source)
        + tc_reference_problems(lab, source)
        + nft_problems(lab, source)
        + expectation_problems(lab, source)
        + ip6_expect_problems(lab, source)
        + feature_problems(lab, source)
    )
    if problems:
        raise LabFileError(lacking_problems + problems)
    if lacking_problems:
        raise KernelLacksError(lacking_problems, lacking=lacking)
    return lab, source
