"""Connection tracking entries of a lab node, read over ctnetlink in its namespace.

The conntrack table is per network namespace.  pyroute2's ``Conntrack``
socket is created -- and the dump run -- with the thread inside the node's
namespace, so the kernel answers for that namespace only.  Conntrack exists
in a namespace only once something there needs it (a nat table, a
``-m conntrack``/``state`` rule, an nft ``ct`` expression); before that the
list is simply empty.

NAT evidence (notes §4, N2): for a masqueraded flow the *reply* tuple's
destination is the router's outside address, not the original source --
:attr:`ConntrackEntry.snat` / :attr:`ConntrackEntry.dnat` say so directly.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from labctl.kernel import netns

_PROTOCOLS = {
    socket.IPPROTO_TCP: "tcp",
    socket.IPPROTO_UDP: "udp",
    socket.IPPROTO_ICMP: "icmp",
    socket.IPPROTO_ICMPV6: "icmpv6",
    136: "udplite",
    132: "sctp",
}

# enum ip_conntrack_status bits that matter for reading a lab
_STATUS_BITS = {
    1 << 0: "EXPECTED",
    1 << 1: "SEEN_REPLY",
    1 << 2: "ASSURED",
    1 << 3: "CONFIRMED",
    1 << 4: "SRC_NAT",
    1 << 5: "DST_NAT",
    1 << 7: "SRC_NAT_DONE",
    1 << 8: "DST_NAT_DONE",
    1 << 9: "DYING",
}


@dataclass(frozen=True)
class Tuple:
    """One direction of a connection as conntrack keys it."""

    src: str | None
    dst: str | None
    sport: int | None
    dport: int | None


@dataclass(frozen=True)
class ConntrackEntry:
    """One conntrack entry: both tuples, status flags, TCP state and mark."""

    proto: str
    orig: Tuple
    reply: Tuple
    status: tuple[str, ...]
    state: str | None
    mark: int
    timeout: int | None
    zone: int | None

    @property
    def snat(self) -> bool:
        """Source NAT applied: replies come back to another address than the sender's."""
        return "SRC_NAT" in self.status

    @property
    def dnat(self) -> bool:
        """Destination NAT applied: the flow really goes to another address."""
        return "DST_NAT" in self.status


def as_record(entry: ConntrackEntry) -> dict[str, Any]:
    """A flat, JSON-ready view of an entry (what the evidence keeps and ``conntrack`` expectations match)."""
    return {
        "proto": entry.proto,
        "src": entry.orig.src,
        "dst": entry.orig.dst,
        "sport": entry.orig.sport,
        "dport": entry.orig.dport,
        "reply_src": entry.reply.src,
        "reply_dst": entry.reply.dst,
        "reply_sport": entry.reply.sport,
        "reply_dport": entry.reply.dport,
        "state": entry.state,
        "zone": entry.zone or 0,
        "status": list(entry.status),
        "mark": entry.mark,
    }


def entries(namespace: str) -> list[ConntrackEntry]:
    """Every conntrack entry of ``namespace`` (empty when conntrack is not in use there)."""
    with netns.entered(namespace):
        from pyroute2.conntrack import Conntrack  # imported by the labs that read conntrack only

        ct = Conntrack()
        try:
            return [_entry(raw) for raw in ct.dump_entries()]
        finally:
            ct.close()


def _entry(raw: Any) -> ConntrackEntry:
    orig, reply = raw.tuple_orig, raw.tuple_reply
    proto = _PROTOCOLS.get(orig.proto, str(orig.proto))
    state = raw.protoinfo.state_name() if raw.protoinfo is not None else None
    return ConntrackEntry(
        proto=proto,
        orig=_tuple(orig),
        reply=_tuple(reply),
        status=tuple(name for bit, name in _STATUS_BITS.items() if (raw.status or 0) & bit),
        state=state,
        mark=int(raw.mark or 0),
        timeout=raw.timeout,
        zone=raw.zone,
    )


def _tuple(raw: Any) -> Tuple:
    return Tuple(raw.saddr, raw.daddr, raw.sport, raw.dport)


def find(namespace: str, proto: str, dst: str | None = None, dport: int | None = None) -> list[ConntrackEntry]:
    """Entries of ``proto`` whose original direction goes to ``dst``/``dport``."""
    return [
        e
        for e in entries(namespace)
        if e.proto == proto and (dst is None or e.orig.dst == dst) and (dport is None or e.orig.dport == dport)
    ]
