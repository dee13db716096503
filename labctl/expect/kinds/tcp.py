"""tcp: how the check's TCP connections ended, as the connecting program saw them."""

from __future__ import annotations

import errno as errno_codes
from typing import TYPE_CHECKING, Any

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Row, register
from labctl.expect.bounds import Count, matches
from labctl.topology.model import Strict

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence

OUTCOMES = ("connected", "refused", "timed_out")
HINTS = {
    "connected": "a SYN dropped (netfilter, no route back) times out; an RST (no listener) is refused",
    "refused": "an RST answers a SYN to a port nobody listens on (TcpExt/Tcp.OutRsts, NO_SOCKET at tcp_v4_rcv)",
    "timed_out": "an unanswered SYN times out: dropped in OUTPUT, FORWARD, or on the way back",
}


class TcpExpect(Strict):
    """Counts of connection outcomes over every ``tcp`` step of the check, and the errno the failed ones got."""

    connected: Count | None = None
    refused: Count | None = None
    """An RST answered the SYN (ECONNREFUSED)."""
    timed_out: Count | None = None
    """Nothing answered before the step's timeout (ETIMEDOUT)."""
    errno: str | None = None
    """The one errno every connection that did not connect got (ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH), or 'none'."""
    sent_bytes: Count | None = None
    """Bytes the clients sent over the connections that connected."""
    states: dict[str, Count] | None = None
    """Connections per TCP state of the client's socket when the step was done with it (a connected one:
    once its bytes were sent, before it closed -- ESTABLISHED; a refused or timed-out one: CLOSE)."""


@register
class Tcp(Kind):
    key = "tcp"
    schema = TcpExpect
    doc = "How the check's TCP connections ended: connected, refused (RST), timed out; the errno; bytes sent."
    order = 72

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        from labctl.kernel.tcp import TCP_STATES  # the socket code behind it: only for a check that asks

        issues: list[Issue] = []
        if "tcp" not in lab.step_kinds:
            issues.append(((), "'tcp' needs a tcp traffic step"))
        if value.errno is not None and value.errno != "none" and not hasattr(errno_codes, value.errno):
            issues.append((("errno",), f"{value.errno!r} is not an errno name (ECONNREFUSED, ETIMEDOUT, ...)"))
        for state in value.states or {}:
            if state not in TCP_STATES[1:]:
                issues.append((("states", state), f"{state!r} is not a TCP state ({', '.join(TCP_STATES[1:])})"))
        if all(getattr(value, k) is None for k in TcpExpect.model_fields):
            issues.append(((), "states nothing: give connected, refused, timed_out, errno, sent_bytes or states"))
        return issues

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        conns = ev.connections
        rows = []
        for outcome in OUTCOMES:
            wanted = getattr(value, outcome)
            if wanted is None:
                continue
            got = sum(1 for c in conns if c.outcome == outcome)
            ok = bool(conns) and matches(wanted, got)
            rows.append(Row(f"tcp connections {outcome}", wanted, got, ok, hint="" if ok else _hint(outcome, ev)))
        if value.errno is not None:
            errors = sorted({c.errno for c in conns if c.outcome != "connected" and c.errno})
            if value.errno == "none":
                ok = bool(conns) and all(c.outcome == "connected" for c in conns)
            else:
                ok = bool(conns) and errors == [value.errno] and all(c.outcome != "connected" for c in conns)
            rows.append(Row("tcp connect errno", value.errno, errors or "none", ok))
        if value.sent_bytes is not None:
            got = sum(c.sent_bytes for c in conns if c.outcome == "connected")
            rows.append(Row("tcp bytes sent by the clients", value.sent_bytes, got,
                            bool(conns) and matches(value.sent_bytes, got)))
        for state, wanted in (value.states or {}).items():
            got = sum(1 for c in conns if c.state == state)
            rows.append(Row(f"tcp connections in state {state}", wanted, got, bool(conns) and matches(wanted, got),
                            hint=", ".join(f"{c.outcome}: {c.state}" for c in conns)))
        return rows


def _hint(outcome: str, ev: Evidence) -> str:
    seen = ", ".join(f"{c.outcome}" + (f" ({c.errno})" if c.errno else "") for c in ev.connections) or "no connection"
    return f"{HINTS[outcome]}; seen: {seen}"
