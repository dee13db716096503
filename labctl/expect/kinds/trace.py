"""events and stages: the lab's tracepoint events, counted and as each packet's ordered path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, MachineFacts, Needs, Row, register, suggest
from labctl.expect.bounds import Count, has_upper_bound, matches
from labctl.expect.walks import WalkForm, form_steps, judge_walks, walk_counts
from labctl.kernel.tracefs.softirq import SOFTIRQ_EVENTS

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence, Packet


def _event_issues(names: list[tuple[tuple[str | int, ...], str]], facts: MachineFacts) -> list[Issue]:
    issues = []
    for path, name in names:
        base = name.partition("@")[0]
        if base in SOFTIRQ_EVENTS:  # recorded for attribution, filtered to the timer vectors: never a lab event
            issues.append((path, f"{base!r} marks which softirq a CPU ran (to tell a timer's work from the lab's); "
                           "it is no event of the lab's and is never counted"))
        elif base not in facts.tracepoints:
            issues.append((path, f"this kernel has no tracepoint {base!r}{suggest(base, facts.tracepoints)}"))
    return issues


@register
class Events(Kind):
    key = "events"
    schema = Annotated[dict[str, Count], Field(min_length=1)]
    doc = "Attributed events per key ('net:netif_rx', or 'net:netif_rx@lo' for one device)."
    order = 50

    def machine(self, value: Any, facts: MachineFacts) -> list[Issue]:
        return _event_issues([((k,), k) for k in value], facts)

    def needs(self, value: Any, needs: Needs) -> None:
        needs.events |= {k.partition("@")[0] for k in value}
        needs.whole_trace |= any(has_upper_bound(v) for v in value.values())

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        counts = ev.event_counts()
        rows = []
        for key, bound in value.items():
            if key.partition("@")[0] not in ev.traced:
                rows.append(Row(f"trace events {key}", bound, "not traced (this kernel refused the tracepoint)", False))
                continue
            rows.append(Row(f"trace events {key}", bound, counts.get(key, 0), matches(bound, counts.get(key, 0))))
        return rows


PATH_EVENTS = frozenset({"net:net_dev_queue", "net:netif_rx", "net:netif_receive_skb", "net:napi_gro_receive_entry"})
"""Where a packet enters a device's transmit and receive paths: a walk is always judged over these (plus the
tracepoints it names), so leaving a step out of the list is a false statement, not a weaker one."""


def _same(wanted: str, observed: str) -> bool:
    """'net:netif_rx' matches any device; 'net:netif_rx@eth0' only that one (observed steps carry all names)."""
    return wanted in observed.split("|")


def packet_walk(packet: Packet, keys: set[str]) -> list[str]:
    """The packet's events projected onto the tracepoints the expectation names, each as 'key|key@dev...'."""
    return ["|".join(e.names()) for e in packet.events if e.key in keys]


def shown(step: str) -> str:
    names = step.split("|")
    return names[1] if len(names) > 1 else names[0]


@register
class Stages(Kind):
    key = "stages"
    schema = WalkForm
    doc = (
        "Each packet the check's steps sent walks exactly this list over the path tracepoints (net_dev_queue, "
        "netif_rx, netif_receive_skb, napi_gro_receive_entry) and any others named "
        "({contains: [...]} for in-order with others between; {packets: [[...], ...]} per packet)."
    )
    order = 51

    def machine(self, value: Any, facts: MachineFacts) -> list[Issue]:
        return _event_issues([((), s) for s in form_steps(value)], facts)

    def needs(self, value: Any, needs: Needs) -> None:
        needs.events |= {s.partition("@")[0] for s in form_steps(value)} | PATH_EVENTS | {"net:net_dev_start_xmit"}
        needs.whole_trace = True  # net_dev_start_xmit: the packet's ethertype (only the traffic's are judged)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        keys = {s.partition("@")[0] for s in form_steps(value)} | PATH_EVENTS
        packets = [  # the packets the check's steps sent (not the replies they provoke), of their protocol
            p
            for p in ev.packets
            if p.origin == "sent"
            and (p.protocol is None or not ctx.traffic_protocols or p.protocol in ctx.traffic_protocols)
            and packet_walk(p, keys)
        ]
        walks = [packet_walk(p, keys) for p in packets]
        ok, detail = judge_walks(value, walks, _same, shown)
        observed = walk_counts(walks, shown)
        expected = value if isinstance(value, list) else value.model_dump(exclude_none=True)
        return [Row("path stages of each packet", expected, observed, ok, detail=detail)]
