"""socket: each listener on its own (node:port) -- what it read, what waits, what it dropped, its TCP state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Row, register
from labctl.expect.bounds import Count, matches
from labctl.topology.model import Strict

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence, SocketEvidence

TCP_ONLY = ("state", "accept_queue")


class SocketExpect(Strict):
    received: Count | None = None
    """udp: datagrams read; tcp: connections accepted."""
    bytes: Count | None = None
    """Payload bytes read (udp: of the datagrams; tcp: over every accepted connection)."""
    queued_bytes: Count | None = None
    """skb memory waiting unread in the socket's receive queue (SO_MEMINFO)."""
    drops: Count | None = None
    """The socket's own drop count (sk_drops: a full queue, a filter; a listener: SYNs it refused)."""
    state: str | None = None
    """tcp: LISTEN, ESTABLISHED, ... as ss prints it."""
    accept_queue: Count | None = None
    """tcp: completed handshakes waiting to be accepted (ss -lnt's Recv-Q)."""


_FIELDS = {
    "received": ("received", "read (udp: datagrams, tcp: connections accepted)"),
    "bytes": ("received_bytes", "bytes read"),
    "queued_bytes": ("queued_bytes", "bytes queued unread"),
    "drops": ("drops", "socket drops"),
    "accept_queue": ("accept_queue", "accept queue"),
}


@register
class Socket(Kind):
    key = "socket"
    schema = dict[str, SocketExpect]
    doc = "Per listener ('node:port'): received, bytes, queued_bytes, drops; tcp: state and accept_queue."
    order = 13

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        from labctl.kernel.tcp import TCP_STATES  # the socket code behind it: only for a check that asks

        issues: list[Issue] = []
        for ref, wanted in value.items():
            proto = lab.sockets.get(ref)
            if proto is None:
                known = ", ".join(sorted(lab.sockets)) or "none"
                issues.append(((ref,), f"no listener {ref!r} in setup.listen (listeners: {known})"))
                continue
            for key in TCP_ONLY:
                if getattr(wanted, key) is not None and proto != "tcp":
                    issues.append(((ref, key), f"'{key}' is for a tcp listener ({ref} is {proto})"))
            if wanted.state is not None and wanted.state not in TCP_STATES[1:]:
                issues.append(((ref, "state"), f"{wanted.state!r} is not a TCP state ({', '.join(TCP_STATES[1:])})"))
            if all(getattr(wanted, k) is None for k in SocketExpect.model_fields):
                issues.append(((ref,), "states nothing about the socket"))
        return issues

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        by_key = {s.key: s for s in ev.sockets}
        for ref, wanted in value.items():
            sock = by_key.get(ref)
            for key, (attr, words) in _FIELDS.items():
                expected = getattr(wanted, key)
                if expected is None:
                    continue
                got = getattr(sock, attr) if sock is not None else None
                ok = got is not None and matches(expected, got)
                rows.append(Row(f"socket {ref} {words}", expected, got, ok, hint="" if ok else _hint(sock)))
            if wanted.state is not None:
                got_state = sock.state if sock is not None else None
                rows.append(Row(f"socket {ref} state", wanted.state, got_state, got_state == wanted.state))
        return rows


def _hint(sock: SocketEvidence | None) -> str:
    if sock is None:
        return "the listener was not recorded"
    return (
        f"{sock.key}/{sock.proto}: read {sock.received} ({sock.received_bytes} bytes), "
        f"{sock.queued_bytes} bytes queued, {sock.drops} dropped"
        + (f", {sock.state}, accept queue {sock.accept_queue}" if sock.proto == "tcp" else "")
    )
