"""sums: conservation -- what the kernel counted in different places adds up to what was sent.

``{terms: ["server:Ip.InReceives", "drops:CPU_BACKLOG"], equal: sent}`` says
every frame sent is accounted for, exactly: received or dropped for this
reason, nothing lost elsewhere.  Terms:

* ``NODE:COUNTER`` -- a counter delta of that node (``server:Ip.InReceives``, ``client:eth1.qdisc.drops``);
* ``drops:REASON`` -- attributed drops with that reason;
* ``captured:KEY`` -- frames a capture of the check matched;
* ``delivered`` / ``sent`` -- datagrams the listeners read / what the steps tried to send (frames, datagrams,
  echo requests; a frame the device refused counts: the kernel dropped it).

``equal`` is a count (``500``, ``"<=50"``) or a term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Row, register
from labctl.expect.bounds import matches, parse_bound
from labctl.topology.model import Strict

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence

Term = Annotated[str, Field(min_length=1)]


class Sum(Strict):
    terms: Annotated[list[Term], Field(min_length=1)]
    equal: int | str


def term_issue(term: str, lab: LabView) -> str | None:
    if term in ("sent", "delivered"):
        return None
    head, sep, rest = term.partition(":")
    if not sep or not rest:
        return f"{term!r} is not NODE:COUNTER, drops:REASON, captured:KEY, sent or delivered"
    if head == "drops":
        return None
    if head == "captured":
        return None if rest in lab.captures else f"no capture {rest!r} in this check's setup"
    return None if head in lab.nodes else f"unknown node {head!r} in {term!r}"


def value_of(term: str, ev: Evidence) -> int:
    if term == "sent":
        return sum(s.attempted for s in ev.sends)
    if term == "delivered":
        return sum(s.received for s in ev.sockets)
    head, _, rest = term.partition(":")
    if head == "drops":
        return sum(1 for e in ev.drops() if e.reason == rest)
    if head == "captured":
        return ev.captures[rest].frames
    if rest not in ev.counter_names.get(head, frozenset()):
        raise KeyError(f"{head} has no counter {rest}")
    return ev.counters.get(head, {}).get(rest, 0)


def _is_count(value: int | str) -> bool:
    try:
        parse_bound(value)
    except ValueError:
        return False
    return True


@register
class Sums(Kind):
    key = "sums"
    schema = Annotated[list[Sum], Field(min_length=1)]
    doc = "Conservation: terms (NODE:COUNTER, drops:REASON, captured:KEY, delivered, sent) add up to `equal`."
    order = 95

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        issues: list[Issue] = []
        for i, item in enumerate(value):
            for j, term in enumerate(item.terms):
                problem = term_issue(term, lab)
                if problem:
                    issues.append(((i, "terms", j), problem))
            if isinstance(item.equal, int) and item.equal < 0:
                issues.append(((i, "equal"), "a sum cannot be negative"))
            elif isinstance(item.equal, str) and not _is_count(item.equal):
                problem = term_issue(item.equal, lab)
                if problem:
                    issues.append(((i, "equal"), problem))
        return issues

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for item in value:
            try:
                values = [value_of(t, ev) for t in item.terms]
                target = None if isinstance(item.equal, int) or _is_count(item.equal) else value_of(item.equal, ev)
            except KeyError as exc:  # a counter this node does not have: never "did not move"
                rows.append(Row(" + ".join(item.terms), item.equal, str(exc.args[0]), False))
                continue
            parts = dict(zip(item.terms, values, strict=True))
            total = sum(values)
            if target is None:
                ok, expected = matches(item.equal, total), item.equal
            else:
                ok, expected = total == target, f"{item.equal} = {target}"
            rows.append(Row(f"{' + '.join(item.terms)}", expected, {"sum": total, **parts}, ok))
        return rows
