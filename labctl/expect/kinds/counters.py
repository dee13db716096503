"""counters, softnet_dropped, softnet: deltas of the kernel's own counters across the window."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, MachineFacts, Row, register, suggest
from labctl.expect.bounds import Count, matches

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence

NodeCounters = Annotated[dict[str, Annotated[dict[str, Count], Field(min_length=1)]], Field(min_length=1)]


def counter_issue(node_ifaces: frozenset[str], key: str, facts: MachineFacts) -> str | None:
    """Why ``key`` is no counter of a node with these interfaces (None when it is one).

    Forms: ``Proto.Name`` (snmp, netstat, snmp6), ``IFACE.stat`` (link stats64),
    ``IFACE.qdisc.stat`` (the interface's qdiscs, summed).
    """
    if key in facts.snmp_counters:
        return None
    head, _, rest = key.partition(".")
    if head in node_ifaces:
        stat = rest.removeprefix("qdisc.")
        known = facts.qdisc_counters if rest.startswith("qdisc.") else facts.link_counters
        if stat in known:
            return None
        return f"{key}: interface {head} has no counter {stat!r}{suggest(stat, known)}"
    names = facts.snmp_counters | {f"{i}.{s}" for i in node_ifaces for s in facts.link_counters}
    return f"no counter {key!r} in this kernel{suggest(key, names)}"


@register
class Counters(Kind):
    key = "counters"
    schema = NodeCounters
    doc = "Per node, deltas of /proc/net/snmp|netstat|snmp6 (Udp.NoPorts), links (eth0.rx_packets), qdiscs."
    order = 30

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return [((node,), f"unknown node {node!r}") for node in value if node not in lab.nodes]

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for node, wanted in value.items():
            for key, bound in wanted.items():
                what = f"{node} counter {key} (delta)"
                if key not in ev.counter_names.get(node, frozenset()):
                    rows.append(Row(what, bound, "no such counter", False))
                    continue
                got = ev.counters.get(node, {}).get(key, 0)
                rows.append(Row(what, bound, got, matches(bound, got)))
        return rows


@register
class SoftnetDropped(Kind):
    key = "softnet_dropped"
    host_wide = True
    schema = Count
    doc = "softnet_stat 'dropped' (input_pkt_queue full), summed over every CPU."
    order = 31

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        got = sum(cols.get("dropped", 0) for cols in ev.softnet.values())
        return [
            Row(
                "softnet_stat dropped (delta, all CPUs)",
                value,
                got,
                matches(value, got),
                hint="" if matches(value, got) else "net.core.netdev_max_backlog bounds each CPU's backlog",
            )
        ]


@register
class Softnet(Kind):
    key = "softnet"
    host_wide = True
    schema = Annotated[dict[str, Annotated[dict[str, Count], Field(min_length=1)]], Field(min_length=1)]
    doc = "Per CPU ('0', '1', ...), deltas of softnet_stat columns: processed, dropped, received_rps, ..."
    order = 32

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return [((cpu,), f"{cpu!r} is not a CPU number") for cpu in value if not str(cpu).isdigit()]

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for cpu, columns in value.items():
            for column, bound in columns.items():
                got = ev.softnet.get(str(cpu), {}).get(column, 0)
                rows.append(Row(f"softnet_stat cpu{cpu} {column} (delta)", bound, got, matches(bound, got)))
        return rows
