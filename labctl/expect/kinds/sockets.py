"""delivered, queued_bytes, received_from: what the check's listeners saw."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Row, register
from labctl.expect.bounds import Count, matches
from labctl.expect.values import Address

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


def _needs_listener(key: str, lab: LabView) -> list[Issue]:
    return [] if lab.listeners else [((), f"'{key}' needs a listener in setup.listen")]


@register
class Delivered(Kind):
    key = "delivered"
    schema = Count
    doc = "Datagrams the check's UDP listeners read (all of them together; per listener and TCP: 'socket')."
    order = 10

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return _needs_listener(self.key, lab)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        got = sum(s.received for s in ev.sockets if s.proto == "udp")
        return [
            Row(
                "delivered to the listener",
                value,
                got,
                matches(value, got),
                hint="" if matches(value, got) else _socket_hint(ev),
            )
        ]


@register
class QueuedBytes(Kind):
    key = "queued_bytes"
    schema = Count
    doc = "Bytes (skb memory) waiting unread in the listeners' receive queues after the traffic."
    order = 11

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return _needs_listener(self.key, lab)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        got = sum(s.queued_bytes for s in ev.sockets)
        return [
            Row(
                "bytes queued unread in the listener",
                value,
                got,
                matches(value, got),
                hint="" if matches(value, got) else _socket_hint(ev),
            )
        ]


@register
class ReceivedFrom(Kind):
    key = "received_from"
    schema = Address
    doc = "The source address every datagram the listeners read came from (NAT)."
    order = 12

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return _needs_listener(self.key, lab)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        sources = sorted({src for s in ev.sockets for src in s.sources})
        return [Row("listener saw source", value, sources, bool(sources) and sources == [value])]


def _socket_hint(ev: Evidence) -> str:
    parts = [
        f"{s.node}:{s.port} read {s.received}, {s.queued_bytes} bytes queued, {s.drops} dropped" for s in ev.sockets
    ]
    return "; ".join(parts)
