"""nft: packet-counter deltas of a node's nf_tables rules, by the rule's comment or its handle."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Row, register
from labctl.expect.bounds import Count, matches

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence

_HANDLE_KEY = re.compile(r"^(ip|ip6|inet|arp|bridge|netdev) \S+ \S+ handle \d+$")
NftCounts = Annotated[
    dict[str, Annotated[dict[Annotated[str, Field(min_length=1, max_length=128)], Count], Field(min_length=1)]],
    Field(min_length=1),
]


@register
class Nft(Kind):
    key = "nft"
    schema = NftCounts
    doc = (
        "Per node, packet-counter deltas of nft rules with a 'counter': by the rule's comment "
        "('udp-5000') or by 'family table chain handle N' (nft -a list ruleset)."
    )
    order = 62

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return [((node,), f"unknown node {node!r}") for node in value if node not in lab.nodes]

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for node, wanted in value.items():
            seen = ev.nft.get(node, {})
            for key, bound in wanted.items():
                delta = seen.get(key)
                observed: Any = delta if delta is not None else "no such rule with a counter"
                what = "rule" if _HANDLE_KEY.match(key) else "rule commented"
                rows.append(
                    Row(
                        f"{node} nft {what} {key!r} packets (delta)",
                        bound,
                        observed,
                        delta is not None and matches(bound, delta),
                    )
                )
        return rows
