"""captured, captured_direction, captured_sources, tap_after_qdisc: what AF_PACKET captures matched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Row, register
from labctl.expect.bounds import Count, matches

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


def _known(keys: list[str], lab: LabView) -> list[Issue]:
    return [((k,), f"no capture {k!r} in this check's setup") for k in keys if k not in lab.captures]


@register
class Captured(Kind):
    key = "captured"
    schema = Annotated[dict[str, Count], Field(min_length=1)]
    doc = "Per capture ('node' or 'node:iface'), frames that matched its filter (and none lost)."
    order = 40

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return _known(list(value), lab)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for key, bound in value.items():
            got = ev.captures[key]
            lost = f" ({got.dropped} lost by the capture)" if got.dropped else ""
            rows.append(
                Row(f"captured on {key}{lost}", bound, got.frames, matches(bound, got.frames) and got.dropped == 0)
            )
        return rows


@register
class CapturedDirection(Kind):
    key = "captured_direction"
    schema = Annotated[dict[str, Literal["in", "out"]], Field(min_length=1)]
    doc = "Per capture, the one direction every captured frame had."
    order = 41

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return _known(list(value), lab)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for key, direction in value.items():
            dirs = dict(ev.captures[key].directions)
            rows.append(Row(f"capture direction on {key}", direction, dirs, bool(dirs) and set(dirs) == {direction}))
        return rows


@register
class CapturedSources(Kind):
    key = "captured_sources"
    schema = Annotated[dict[str, Annotated[list[str], Field(min_length=1)]], Field(min_length=1)]
    doc = "Per capture, the source MACs of the captured frames, in order (E2: the rewritten MAC)."
    order = 42

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return _known(list(value), lab)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for key, wanted in value.items():
            got = list(ev.captures[key].sources)
            want = [m.lower() for m in wanted]
            rows.append(Row(f"source MACs captured on {key}", want, got, got == want))
        return rows


@register
class TapAfterQdisc(Kind):
    key = "tap_after_qdisc"
    schema = str
    doc = "'node:iface' with a capture: frames captured going out + that interface's qdisc drops == frames sent."
    order = 43

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return _known([value], lab) if ":" in value else [((), f"{value!r} is not 'node:iface'")]

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        node, _, ifname = value.partition(":")
        out = ev.captures[value].directions.get("out", 0)
        qdisc_drops = ev.counters.get(node, {}).get(f"{ifname}.qdisc.drops", 0)
        sent = sum(s.attempted for s in ev.sends)  # a frame the qdisc drops is refused, not unsent
        return [
            Row(
                f"AF_PACKET on {value} sees only what the qdisc let through",
                f"captured out + qdisc drops = {sent} sent, qdisc drops > 0",
                {"captured_out": out, "qdisc_drops": qdisc_drops},
                out + qdisc_drops == sent and qdisc_drops > 0,
            )
        ]
