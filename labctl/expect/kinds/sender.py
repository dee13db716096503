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
            ok = bool(sends) and not errors
        else:
            ok = bool(sends) and errors == [value] and all(s.errors for s in sends)
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
        ok = bool(pings) and all((r == sent) if value else r == 0 for r, sent in replies)
        return [
            Row(
                "ping replies (received/sent)",
                "all" if value else "none",
                [f"{r}/{sent}" for r, sent in replies] or "no ping",
                ok,
            )
        ]
