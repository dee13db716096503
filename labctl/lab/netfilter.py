"""netfilter of a running lab: every rule with its counters, and a packet's hook walk.

Both commands read the kernel, not the lab file: ``rules`` lists what the
namespaces hold now (rules a check or a person added included), and ``hooks``
injects one packet and records, on every node it may cross, the tables and
chains the kernel ran for it, in order (an NFLOG rule at the top of every
chain, numbered by nfnetlink_log -- see :mod:`labctl.kernel.nftrace`).

Everything happens inside the lab's namespaces.  iptables and ip6tables are
python-iptables, i.e. legacy xtables: inside a node ``iptables-legacy -nvL``
(``ip6tables-legacy -nvL``) shows the same rules, while ``iptables`` (the
nft variant) only warns that legacy tables exist.  ebtables is
``ebtables-nft`` (this kernel has no legacy ebtables).  An IPv6 packet is
traced through the ip6tables tables (steps ``ip6:filter:INPUT``) and followed
by its flow label, as an IPv4 one is by its IP ID.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from labctl.errors import KernelError, LabNotUpError, LabStateError
from labctl.evidence.model import SendEvidence
from labctl.evidence.netfilter import TRACE_RULE, user_rows
from labctl.evidence.window import WalkRequest, Window, WindowSpec
from labctl.kernel import ebtables, iptables, netns, nft, nftrace, tracefs
from labctl.kernel.inject import inject
from labctl.kernel.iptrules import RuleCounter
from labctl.kernel.nftrace import HookStep
from labctl.lab import state
from labctl.lab.hookframe import protocol_match, summary, tag_frame
from labctl.lab.live import TargetError
from labctl.lab.traffic import TrafficError, prepare_injection
from labctl.topology.model import Topology

DROP_TARGETS = ("DROP", "REJECT")
"""Targets that end a packet; a rise of their counter names the rule that did it."""

DROP_EVENTS = ("skb:kfree_skb", "net:netif_receive_skb", "net:net_dev_queue", "net:netif_rx")
"""Enough tracepoints to follow an skb onto a lab device and see where it was freed."""


# --------------------------------------------------------------------------
# the lab


def running_lab(lab: str) -> tuple[state.LabState, Topology]:
    """The lab's state and the topology it was brought up from (the one resolver: live.open_lab)."""
    from labctl.lab.live import open_lab

    live = open_lab(lab)
    nodes = {node: netns.namespace_name(live.topo.name, node) for node in live.topo.nodes}
    missing = [node for node, ns in nodes.items() if not netns.exists(ns)]
    if missing:
        raise LabStateError(f"lab {lab} is not fully up: no namespace for {', '.join(sorted(missing))}")
    current = state.load(lab) or state.LabState(name=lab, file=live.file, status="up", nodes=nodes)
    return current, live.topo


def _nodes(current: state.LabState, wanted: list[str] | None) -> dict[str, str]:
    """node -> namespace, for ``wanted`` (all nodes when None), in the lab's order."""
    if not wanted:
        return dict(current.nodes)
    unknown = [n for n in wanted if n not in current.nodes]
    if unknown:
        raise TargetError(
            f"lab {current.name} has no node {', '.join(unknown)} (nodes: {', '.join(sorted(current.nodes))})"
        )
    return {n: current.nodes[n] for n in dict.fromkeys(wanted)}


# --------------------------------------------------------------------------
# rules


@dataclass(frozen=True)
class RuleRow:
    """One rule (or built-in chain policy, ``number`` 0) of a node, with its counters.

    ``family`` is ``ip`` (iptables, legacy xtables), ``ip6`` (ip6tables, legacy xtables) or ``bridge``
    (ebtables-nft).
    ebtables policies have no counters (nf_tables base chains keep none): None.
    """

    node: str
    family: str
    table: str
    chain: str
    number: int
    rule: str
    packets: int | None
    bytes: int | None
    policy: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "family": self.family,
            "table": self.table,
            "chain": self.chain,
            "number": self.number,
            "rule": self.rule,
            "packets": self.packets,
            "bytes": self.bytes,
            "policy": self.policy,
        }


def _row(node: str, family: str, row: RuleCounter) -> RuleRow:
    packets = row.packets if row.packets >= 0 else None
    nbytes = row.bytes if row.bytes >= 0 else None
    return RuleRow(node, family, row.table, row.chain, row.position, row.rule, packets, nbytes, row.policy)


def lab_rules(lab: str, node: str | None = None) -> list[RuleRow]:
    """Every iptables and ebtables rule of the lab's nodes (or one node), as the kernel counts them.

    Listing never creates a table: only tables that exist in a namespace are read.
    """
    current = state.load(lab)
    if current is None:
        raise LabNotUpError(f"lab {lab} is not up (no state in {state.LABS_DIR}); run labctl up first")
    rows: list[RuleRow] = []
    for name, namespace in _nodes(current, [node] if node else None).items():
        if not netns.exists(namespace):
            raise LabStateError(f"lab {lab}: node {name} has no namespace ({namespace})")
        try:
            rows += _chain_order([_row(name, "ip", r) for r in iptables.list_rules(namespace)])
            rows += _chain_order([_row(name, "ip6", r) for r in iptables.list_rules(namespace, family="ip6")])
            rows += _chain_order([_row(name, "bridge", r) for r in ebtables.list_rules(namespace)])
            rows += _nft_rows(name, namespace)
        except iptables.RuleError as exc:
            raise KernelError(f"lab {lab}: cannot list the rules of {name}: {exc}") from exc
    return rows


def _nft_rows(node: str, namespace: str) -> list[RuleRow]:
    """The node's nf_tables rules (its ``nftables:``), numbered by handle; ebtables-nft's tables are listed above.

    A rule without a ``counter`` statement has no counts (–).
    """
    with netns.entered(namespace):
        if not nft.tables_here():
            return []
    rows = []
    for r in nft.rule_counters(namespace):
        if (r.family, r.table) in nft.EBTABLES_TABLES or TRACE_RULE.search(r.text):
            continue
        counted = r.packets >= 0
        rows.append(
            RuleRow(
                node,
                "nft",
                f"{r.family} {r.table}",
                r.chain,
                r.handle,
                r.text,
                r.packets if counted else None,
                r.bytes if counted else None,
            )
        )
    return rows


def _chain_order(rows: list[RuleRow]) -> list[RuleRow]:
    """Each chain's policy, then its rules (ebtables-save lists all chain headers first)."""
    first: dict[tuple[str, str], int] = {}
    for index, row in enumerate(rows):
        first.setdefault((row.table, row.chain), index)
    return sorted(rows, key=lambda r: (first[(r.table, r.chain)], r.number))


# --------------------------------------------------------------------------
# hooks


@dataclass(frozen=True)
class Verdict:
    """The rule (or policy) whose counter shows it dropped the traced packet."""

    table: str
    chain: str
    number: int
    rule: str
    family: str
    packets: int

    @property
    def where(self) -> str:
        prefix = f"{self.family}:" if self.family in ("bridge", "ip6") else ""
        if self.family == "nft":
            return f"nft {self.table} {self.chain} handle {self.number}"
        what = "policy" if self.number == 0 else f"rule {self.number}"
        return f"{prefix}{self.table}:{self.chain} {what}"

    def as_dict(self) -> dict[str, Any]:
        return {"where": self.where, "rule": self.rule, "packets": self.packets}


@dataclass
class NodeWalk:
    """The hooks one node ran for the traced packet, and the drop there if any."""

    node: str
    steps: list[HookStep]
    verdicts: list[Verdict] = field(default_factory=list)

    def step_names(self) -> list[str]:
        """``raw:PREROUTING`` for ip steps, ``bridge:nat:PREROUTING`` for bridge ones."""
        return [short_name(s) for s in self.steps]

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "walk": self.step_names(),
            "steps": [
                {
                    "step": short_name(s),
                    "family": s.family,
                    "table": s.table,
                    "chain": s.chain,
                    "in": s.ifin,
                    "out": s.ifout,
                    "physin": s.physin,
                    "physout": s.physout,
                    "src": s.src,
                    "dst": s.dst,
                    "mark": s.mark,
                }
                for s in self.steps
            ],
            "dropped_by": [v.as_dict() for v in self.verdicts],
        }


@dataclass
class HookWalk:
    """What ``labctl hooks`` shows: the packet, each node's walk, the kernel's drops."""

    lab: str
    node: str
    interface: str
    packet: str
    count: int
    ip_id: int | None
    nodes: list[NodeWalk]
    drops: dict[str, int] = field(default_factory=dict)
    """``REASON at function`` -> how many of the injected skbs the kernel freed so (not the
    replies or ICMP errors they provoke: those are other skbs)."""
    flow: int | None = None
    """The IPv6 flow label the traced packet was tagged with (None for IPv4, followed by ``ip_id``)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "node": self.node,
            "interface": self.interface,
            "packet": self.packet,
            "count": self.count,
            "ip_id": self.ip_id,
            "flow": self.flow,
            "nodes": [n.as_dict() for n in self.nodes],
            "drops": self.drops,
        }


def short_name(step: HookStep) -> str:
    return f"{step.table}:{step.chain}" if step.family == "ip" else step.name


def _hop_order(topo: Topology, start: str, nodes: list[str]) -> list[str]:
    """``nodes`` by link distance from ``start`` (the order a packet can reach them)."""
    neighbours: dict[str, set[str]] = {n: set() for n in topo.nodes}
    for link in topo.links:
        a, b = link.ends
        neighbours[a.node].add(b.node)
        neighbours[b.node].add(a.node)
    distance = {start: 0}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for there in sorted(neighbours.get(here, ())):
            if there not in distance:
                distance[there] = distance[here] + 1
                queue.append(there)
    return sorted(nodes, key=lambda n: (distance.get(n, len(topo.nodes)), n))


def _user_counts(namespace: str) -> dict[tuple[str, str, str, int], RuleCounter]:
    """(family, table, chain, number) -> rule, trace rules left out and the rest renumbered."""
    found: dict[tuple[str, str, str, int], RuleCounter] = {}
    listings = (
        ("ip", iptables.list_rules(namespace)),
        ("ip6", iptables.list_rules(namespace, family="ip6")),
        ("bridge", ebtables.list_rules(namespace)),
    )
    for family, rows in listings:
        for row in user_rows(rows):
            found[(family, row.table, row.chain, row.position)] = row
    for nft_row in _nft_rows("", namespace):  # the node's own nft rules, numbered by handle
        if nft_row.packets is not None:
            found[("nft", nft_row.table, nft_row.chain, nft_row.number)] = RuleCounter(
                nft_row.table, nft_row.chain, nft_row.number, nft_row.rule, nft_row.packets, nft_row.bytes or 0, None
            )
    return found


def _ends_packet(row: RuleCounter, family: str = "ip") -> bool:
    """A DROP policy, or a rule whose target is DROP/REJECT (iptables ``-j X``, ebtables ``-j X``, nft ``drop``)."""
    if family == "nft":
        return any(word in ("drop", "reject") for word in row.rule.split())
    if row.position == 0:
        return row.policy == "DROP"
    words = row.rule.split()
    targets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "-j"]
    return bool(targets) and targets[-1] in DROP_TARGETS


def _verdicts(
    before: dict[tuple[str, str, str, int], RuleCounter], after: dict[tuple[str, str, str, int], RuleCounter]
) -> list[Verdict]:
    """Rules ending in DROP/REJECT (and DROP policies) whose counters rose during the trace."""
    found = []
    for key, row in after.items():
        old = before.get(key)
        delta = row.packets - (old.packets if old else 0)
        if delta <= 0:
            continue
        if _ends_packet(row, key[0]):
            found.append(Verdict(row.table, row.chain, row.position, row.rule, key[0], delta))
    return found


@contextlib.contextmanager
def _hook_trace_errors(lab: str) -> Iterator[None]:
    """What the tracer's kernel side refuses becomes one clear error naming the lab."""
    try:
        yield
    except (nftrace.TraceError, tracefs.TraceError, iptables.RuleError, nft.NftError) as exc:
        raise KernelError(f"lab {lab}: cannot trace the hooks: {exc}") from exc


def trace_hooks(
    lab: str,
    node: str,
    expr: str,
    via: list[str] | None = None,
    interface: str | None = None,
    count: int = 1,
    conntrack: bool = True,
    settle: float = 0.3,
) -> HookWalk:
    """Inject ``expr`` from ``node`` and record the hook walk on every node (or ``via``).

    ``conntrack``: nat chains run only for packets conntrack tracks; with it
    the tracer's own nat rules switch conntrack on for the trace, so the walk
    shows where nat sits.  Without it the walk is exactly what the node does
    now (no nat steps where nothing else uses conntrack).
    """
    with _hook_trace_errors(lab):
        current, topo = running_lab(lab)
        if node not in current.nodes:
            raise LabNotUpError(f"lab {lab} has no node {node!r} (nodes: {', '.join(sorted(current.nodes))})")
        prepared = prepare_injection(topo, node, interface, expr)
        frame, ip_id, flow = tag_frame(prepared.frame, expr)
        match = protocol_match(frame)
        traced = _nodes(current, via)
        before = {name: _user_counts(namespace) for name, namespace in traced.items()}
        spec = WindowSpec(
            events=DROP_EVENTS,
            walks={
                name: WalkRequest(
                    {"nat", "filter"} if topo.nodes[name].bridges else set(),
                    nat=conntrack,
                    match=match,
                    nft=topo.nodes[name].nftables is not None,
                    ip=flow is None,
                    ip6=flow is not None,
                )
                for name in traced
            },
        )
        with Window(topo, spec) as window:
            try:
                sent = inject(prepared.namespace, prepared.ifname, frame, count)
            except OSError as exc:
                raise TrafficError(f"cannot inject on {node}:{prepared.ifname}: {exc}") from exc
            window.record_send(SendEvidence(node, "inject", count, sent))
            time.sleep(settle)
            evidence = window.close()
        after = {name: _user_counts(namespace) for name, namespace in traced.items()}
        drops: Counter[str] = Counter()
        for packet in evidence.packets:
            drop = packet.drop
            if drop is not None and _injected_here(packet.events, prepared.ifname):
                drops[f"{drop.reason or '?'} at {drop.function or '?'}"] += 1
        walks = {}
        for name in traced:
            steps = [s for walk in evidence.walks.get(name, ()) for s in walk if _is_traced(s, ip_id, flow)]
            walks[name] = NodeWalk(name, sorted(steps, key=lambda s: s.seq), _verdicts(before[name], after[name]))
        order = _hop_order(topo, node, list(traced))
        return HookWalk(
            lab=lab,
            node=node,
            interface=prepared.ifname,
            packet=summary(frame),
            count=count,
            ip_id=ip_id,
            nodes=[walks[n] for n in order],
            drops=dict(drops),
            flow=flow,
        )


def _is_traced(step: HookStep, ip_id: int | None, flow: int | None) -> bool:
    """The step is the traced packet's: its IP ID (IPv4) or flow label (IPv6), or a step without either."""
    if ip_id is not None:
        return step.ip_id in (ip_id, None)
    if flow is not None:
        return step.flow in (flow, None) and step.ip_id is None
    return True


def _injected_here(events: Sequence[tracefs.TraceEvent], ifname: str) -> bool:
    """The skb is the one injected: its story starts with a transmit on ``ifname``.

    Only the traced skb's own fate counts, not the replies or ICMP errors it
    provokes (other skbs); veth and forwarding keep the skb, so the injected
    skb carries its address from the injecting device to its end.  That it is
    the lab's at all is the window's attribution rule.
    """
    first = events[0]
    return first.key == "net:net_dev_queue" and ifname in first.devices
