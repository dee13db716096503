"""send_error and reachable: what the sending program itself was told."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labctl.expect.base import JudgeContext, Kind, Row, register

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


@register
class SendError(Kind):
    key = "send_error"
    schema = str
    doc = "errno name every send of the check got (EPERM, ENETUNREACH), or 'none' for clean sends."
    order = 70

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        sends = [s for s in ev.sends if s.kind == "udp"]
        errors = sorted({e for s in sends for e in s.errors})
        if value == "none":
            ok = bool(sends) and not errors and all(s.sent == s.attempted for s in sends)
        else:  # every datagram refused, with this errno and no other
            ok = bool(sends) and errors == [value] and all(s.sent == 0 for s in sends)
        return [Row("sender's errno", value, errors or "none", ok)]


@register
class Reachable(Kind):
    key = "reachable"
    schema = bool
    doc = "Every echo request of the check's pings was answered (true), or none was (false)."
    order = 71

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        pings = [s for s in ev.sends if s.kind == "ping"]
        replies = [(s.replies or 0, s.sent) for s in pings]
        if value:  # every echo request went out and was answered
            ok = bool(pings) and all(s.sent == s.attempted > 0 and (s.replies or 0) == s.sent for s in pings)
        else:
            ok = bool(pings) and all(s.sent > 0 and not s.replies for s in pings)
        return [
            Row(
                "ping replies (received/sent)",
                "all" if value else "none",
                [f"{r}/{sent}" for r, sent in replies] or "no ping",
                ok,
            )
        ]
