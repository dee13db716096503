"""dropped and drops: where and why the kernel freed the lab's skbs (skb:kfree_skb)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, MachineFacts, Needs, Row, register, suggest
from labctl.expect.bounds import Count, has_upper_bound, matches
from labctl.topology.model import Strict

if TYPE_CHECKING:
    from labctl.evidence.model import Event, Evidence

HINTS = {
    "NO_SOCKET": "no socket is bound to the destination port (a listener on another port or address?)",
    "SOCKET_RCVBUFF": "the socket's receive buffer (SO_RCVBUF / net.core.rmem_default) is full",
    "SOCKET_FILTER": "the socket's BPF filter (SO_ATTACH_FILTER) returned 0",
    "NETFILTER_DROP": "a netfilter rule or chain policy dropped it (labctl rules LAB shows which counter rose)",
    "OTHERHOST": "the destination MAC is not this interface's (eth_type_trans marked it PACKET_OTHERHOST)",
    "IP_INADDRERRORS": "not a local address and net.ipv4.ip_forward is 0 (ip_error)",
    "CPU_BACKLOG": "the CPU's input_pkt_queue was full: raise net.core.netdev_max_backlog",
    "QDISC_DROP": "the interface's qdisc was full (tc -s qdisc)",
    "NEIGH_FAILED": "the next hop never answered ARP (neighbour FAILED after its probes)",
}


class DropExpect(Strict):
    reason: str
    at: str | None = None
    """Function named by the drop's location (e.g. __udp4_lib_rcv); 'a|b' for either (an inlined caller)."""
    count: Count = 1


def _reason_issues(reasons: list[tuple[tuple[str | int, ...], str]], facts: MachineFacts) -> list[Issue]:
    return [
        (path, f"this kernel has no drop reason {reason!r}{suggest(reason, facts.drop_reasons)}")
        for path, reason in reasons
        if reason not in facts.drop_reasons
    ]


def _matches(event: Event, reason: str, at: str | None) -> bool:
    return event.reason == reason and (at is None or event.function in at.split("|"))


def drop_summary(ev: Evidence) -> list[str]:
    counts = Counter(f"{e.reason} at {e.function}" for e in ev.drops())
    return [f"{n}× {what}" for what, n in sorted(counts.items())]


@register
class Dropped(Kind):
    key = "dropped"
    schema = DropExpect
    doc = "Attributed drops with this reason (and location): exactly `count` of them (default 1)."
    order = 20

    def machine(self, value: Any, facts: MachineFacts) -> list[Issue]:
        return _reason_issues([(("reason",), value.reason)], facts)

    def needs(self, value: Any, needs: Needs) -> None:
        needs.events.add("skb:kfree_skb")
        needs.whole_trace |= has_upper_bound(value.count)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        hit = [e for e in ev.drops() if _matches(e, value.reason, value.at)]
        ok = matches(value.count, len(hit))
        where = f" at {value.at}" if value.at else ""
        hint = "" if ok else HINTS.get(value.reason, "")
        return [
            Row(
                f"dropped: {value.reason}{where}",
                value.count,
                {"matching": len(hit), "drops": drop_summary(ev) or "no drop"},
                ok,
                hint=hint,
            )
        ]


@register
class Drops(Kind):
    key = "drops"
    schema = Annotated[dict[str, Count], Field(min_length=1)]
    doc = "Attributed drops per reason name, e.g. {NO_SOCKET: 1, NETFILTER_DROP: 0}."
    order = 21

    def machine(self, value: Any, facts: MachineFacts) -> list[Issue]:
        return _reason_issues([((reason,), reason) for reason in value], facts)

    def needs(self, value: Any, needs: Needs) -> None:
        needs.events.add("skb:kfree_skb")
        needs.whole_trace |= any(has_upper_bound(v) for v in value.values())

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        by_reason = Counter(e.reason for e in ev.drops())
        return [
            Row(
                f"drops with reason {reason}",
                bound,
                by_reason.get(reason, 0),
                matches(bound, by_reason.get(reason, 0)),
                hint="" if matches(bound, by_reason.get(reason, 0)) else HINTS.get(reason, ""),
            )
            for reason, bound in value.items()
        ]
