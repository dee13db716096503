"""conntrack: the flows conntrack kept after the traffic -- a count, or entries matched by tuple and state.

The short form (``conntrack: 1``) counts entries in all the lab's nodes; the
detailed form names each entry a claim is about (``{node: r1, proto: udp,
dst: 203.0.113.1, dport: 5000, reply_dst: 203.0.113.254, status: [SRC_NAT]}``)
so that "this flow was masqueraded" is checked on the flow, not on a total
that any other flow could make true.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_address
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Needs, Row, register, suggest
from labctl.expect.bounds import Count, matches
from labctl.expect.values import Address
from labctl.topology.model import Strict

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


class ConntrackMatch(Strict):
    """One conntrack entry to find on a node: every field given must match; ``count`` such entries (0: absent)."""

    node: str
    proto: Literal["tcp", "udp", "icmp", "icmpv6", "udplite", "sctp"] | None = None
    src: Address | None = None
    dst: Address | None = None
    sport: Annotated[int, Field(ge=0, le=65535)] | None = None
    dport: Annotated[int, Field(ge=0, le=65535)] | None = None
    reply_src: Address | None = None
    """The reply direction's source: after DNAT, the real server."""
    reply_dst: Address | None = None
    """The reply direction's destination: after SNAT/MASQUERADE, the router's outside address."""
    reply_sport: Annotated[int, Field(ge=0, le=65535)] | None = None
    reply_dport: Annotated[int, Field(ge=0, le=65535)] | None = None
    state: str | None = None
    """TCP state (SYN_SENT, ESTABLISHED, ...): only TCP entries have one."""
    zone: Annotated[int, Field(ge=0, le=65535)] | None = None
    status: list[str] = Field(default_factory=list)
    """Status flags the entry must have (SEEN_REPLY, ASSURED, SRC_NAT, DST_NAT, ...)."""
    count: Count = 1

    def describe(self) -> str:
        given = self.model_dump(exclude_none=True, exclude={"node", "count", "status"})
        flags = f" [{','.join(self.status)}]" if self.status else ""
        return " ".join(f"{k}={v}" for k, v in given.items()) + flags or "any entry"

    def accepts(self, record: Mapping[str, Any]) -> bool:
        for name in ("proto", "sport", "dport", "reply_sport", "reply_dport", "state", "zone"):
            wanted = getattr(self, name)
            if wanted is not None and record.get(name) != wanted:
                return False
        for name in ("src", "dst", "reply_src", "reply_dst"):
            wanted = getattr(self, name)
            if wanted is not None and (record.get(name) is None or ip_address(wanted) != ip_address(record[name])):
                return False
        return set(self.status) <= set(record.get("status", ()))


class ConntrackForm(Strict):
    """The detailed form: entries matched by tuple, protocol, state and zone; optionally the total too."""

    total: Count | None = None
    """Entries in all the lab's nodes together (what the short form ``conntrack: N`` states)."""
    entries: Annotated[list[ConntrackMatch], Field(min_length=1)]


STATUS_FLAGS = frozenset(
    {"EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT", "SRC_NAT_DONE", "DST_NAT_DONE", "DYING"}
)


@register
class Conntrack(Kind):
    key = "conntrack"
    schema = Count | ConntrackForm
    doc = (
        "Conntrack after the traffic (the stage empties it first): a count of entries in all the lab's nodes, "
        "or {entries: [{node, proto, src, dst, sport, dport, reply_*, state, zone, status, count}], total}."
    )
    order = 91

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        if not isinstance(value, ConntrackForm):
            return []
        issues: list[Issue] = []
        for i, entry in enumerate(value.entries):
            if entry.node not in lab.nodes:
                issues.append((("entries", i, "node"), f"unknown node {entry.node!r}"))
            for flag in entry.status:
                if flag not in STATUS_FLAGS:
                    message = f"no conntrack status {flag!r}{suggest(flag, STATUS_FLAGS)}"
                    issues.append((("entries", i, "status"), message))
        return issues

    def needs(self, value: Any, needs: Needs) -> None:
        needs.conntrack = True

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        if not isinstance(value, ConntrackForm):
            return [Row("conntrack entries", value, ev.conntrack, matches(value, ev.conntrack))]
        rows = []
        if value.total is not None:
            rows.append(Row("conntrack entries", value.total, ev.conntrack, matches(value.total, ev.conntrack)))
        for entry in value.entries:
            found = [r for r in ev.conntrack_entries.get(entry.node, ()) if entry.accepts(r)]
            ok = matches(entry.count, len(found))
            rows.append(
                Row(
                    f"{entry.node} conntrack entries {entry.describe()}",
                    entry.count,
                    len(found),
                    ok,
                    detail=[] if ok else [_show(r) for r in ev.conntrack_entries.get(entry.node, ())][:10],
                )
            )
        return rows


def _show(record: Mapping[str, Any]) -> str:
    """One entry the way conntrack -L prints it (shown when a match fails)."""
    return (
        f"{record.get('proto')} {record.get('state') or ''} src={record.get('src')} dst={record.get('dst')}"
        f" sport={record.get('sport')} dport={record.get('dport')} src={record.get('reply_src')}"
        f" dst={record.get('reply_dst')} sport={record.get('reply_sport')} dport={record.get('reply_dport')}"
        f" [{','.join(record.get('status', ()))}] zone={record.get('zone')}"
    )
