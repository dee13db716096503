"""The Evidence value: everything one observation window showed, attributed to one lab.

It is plain, immutable data -- no sockets, no namespaces, no kernel calls --
so expectations are judged on it without root, it is written to JSON for
reports, and a recorded Evidence (a golden file) replays a verdict exactly.
Every field holds what the kernel showed for *this* lab only: the window's
attribution rule (:mod:`labctl.evidence.attribution`) has already removed
what other namespaces did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from labctl.kernel.frames import Frame
from labctl.kernel.nftrace import HookStep
from labctl.kernel.tracefs import TraceEvent

FROZEN_EMPTY: Mapping[str, Any] = MappingProxyType({})


Event = TraceEvent
"""Attributed events are the kernel layer's own TraceEvent values (slotted, not frozen, for parsing speed:
events of one repeated line share their ``fields``, so nothing outside the parser may change an event)."""


def event_as_dict(event: TraceEvent) -> dict[str, Any]:
    return {
        "timestamp": event.timestamp,
        "cpu": event.cpu,
        "pid": event.pid,
        "comm": event.comm,
        "event": event.key,
        "fields": dict(event.fields),
        "flags": event.flags,
    }


def event_from_dict(data: Mapping[str, Any]) -> TraceEvent:
    system, _, name = str(data["event"]).partition(":")
    return TraceEvent(
        timestamp=float(data["timestamp"]),
        cpu=int(data["cpu"]),
        pid=int(data["pid"]),
        comm=str(data["comm"]),
        system=system,
        name=name,
        fields=dict(data["fields"]),
        flags=str(data.get("flags", "")),
    )


DROP_EVENT = "skb:kfree_skb"
FREE_EVENTS = frozenset({"skb:kfree_skb", "skb:consume_skb"})


@dataclass(frozen=True, slots=True)
class Packet:
    """One skb of the lab, from its first sighting in the window to its end.

    ``origin`` says why it is the lab's: ``sent`` (a lab task sent it: its first
    event ran in the task's own call -- a socket send, an AF_PACKET inject),
    ``relayed`` (a VM relay wrote it on a tap: a VM's frame), ``task`` (it first appeared in softirq work of a lab
    task: a reply, an ICMP error, a packet generated on the way), or
    ``confirmed`` (a deviceless drop in timer context that the lab's own
    netlink notifications vouch for, e.g. NEIGH_FAILED).
    """

    skb: int
    events: tuple[Event, ...]
    origin: str = "sent"

    @property
    def fate(self) -> str | None:
        last = self.events[-1].key if self.events else None
        return {"skb:kfree_skb": "dropped", "skb:consume_skb": "consumed"}.get(last or "")

    @property
    def drop(self) -> Event | None:
        return self.events[-1] if self.events and self.events[-1].key == DROP_EVENT else None

    @property
    def protocol(self) -> int | None:
        """The ethertype the first event that carries one reports (net_dev_start_xmit, *_entry, kfree_skb)."""
        for event in self.events:
            if event.protocol is not None:
                return event.protocol
        return None

    @property
    def devices(self) -> list[str]:
        seen: list[str] = []
        for event in self.events:
            seen += [d for d in event.devices if d not in seen]
        return seen

    def as_dict(self) -> dict[str, Any]:
        return {"skb": hex(self.skb), "origin": self.origin, "events": [event_as_dict(e) for e in self.events]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Packet:
        return cls(
            int(str(data["skb"]), 16), tuple(event_from_dict(e) for e in data["events"]), data.get("origin", "task")
        )


@dataclass(frozen=True, slots=True)
class CaptureEvidence:
    """What one AF_PACKET capture matched: frames per direction, and frames the kernel lost."""

    frames: int
    dropped: int
    directions: Mapping[str, int] = field(default_factory=lambda: FROZEN_EMPTY)
    sources: tuple[str, ...] = ()
    """Source MAC of every frame, in order (E2's rewritten MAC)."""
    captured: tuple[Frame, ...] = field(default=(), compare=False, repr=False)
    """The frames themselves, for a report's pcap files (not part of the JSON form or of a golden file)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "dropped": self.dropped,
            "directions": dict(self.directions),
            "sources": list(self.sources),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaptureEvidence:
        return cls(
            int(data["frames"]),
            int(data["dropped"]),
            MappingProxyType(dict(data.get("directions", {}))),
            tuple(data.get("sources", ())),
        )


@dataclass(frozen=True, slots=True)
class SocketEvidence:
    """One listener of the check: what it read, what waits unread in its queue, what it dropped."""

    node: str
    port: int
    received: int
    received_bytes: int
    queued_bytes: int
    drops: int
    sources: tuple[str, ...] = ()
    proto: str = "udp"
    state: str | None = None
    """tcp: the socket's TCP state after the traffic (LISTEN)."""
    accept_queue: int | None = None
    """tcp: handshakes completed and waiting to be accepted (``received`` counts the accepted ones)."""

    @property
    def key(self) -> str:
        return f"{self.node}:{self.port}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "port": self.port,
            "received": self.received,
            "received_bytes": self.received_bytes,
            "queued_bytes": self.queued_bytes,
            "drops": self.drops,
            "sources": list(self.sources),
            "proto": self.proto,
            "state": self.state,
            "accept_queue": self.accept_queue,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SocketEvidence:
        return cls(
            str(data["node"]),
            int(data["port"]),
            int(data["received"]),
            int(data["received_bytes"]),
            int(data["queued_bytes"]),
            int(data["drops"]),
            tuple(data.get("sources", ())),
            str(data.get("proto", "udp")),
            data.get("state"),
            data.get("accept_queue"),
        )


@dataclass(frozen=True, slots=True)
class ConnectionEvidence:
    """One TCP connection a ``tcp`` step attempted: how it ended (connected, refused, timed_out, error),
    the errno when it did not connect, the bytes the client sent and its socket's state once they were sent."""

    node: str
    to: str
    outcome: str
    errno: str | None = None
    sent_bytes: int = 0
    state: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "to": self.to,
            "outcome": self.outcome,
            "errno": self.errno,
            "sent_bytes": self.sent_bytes,
            "state": self.state,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConnectionEvidence:
        return cls(
            str(data["node"]),
            str(data["to"]),
            str(data["outcome"]),
            data.get("errno"),
            int(data.get("sent_bytes", 0)),
            str(data.get("state", "")),
        )


@dataclass(frozen=True, slots=True)
class ExecEvidence:
    """One program an ``exec`` step ran in a node: its exit status and (bounded) output, or why it did not run."""

    label: str
    """'traffic[2]', 'setup.exec[0]', 'undo setup.exec[0]'."""
    node: str
    argv: tuple[str, ...]
    exit: int | None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "node": self.node,
            "argv": list(self.argv),
            "exit": self.exit,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecEvidence:
        return cls(
            str(data["label"]),
            str(data["node"]),
            tuple(data.get("argv", ())),
            data.get("exit"),
            str(data.get("stdout", "")),
            str(data.get("stderr", "")),
            float(data.get("seconds", 0.0)),
            data.get("error"),
        )


@dataclass(frozen=True, slots=True)
class SendEvidence:
    """One send step: how many datagrams/frames/echo requests went out and the errors the sender got."""

    node: str
    kind: str
    attempted: int
    sent: int
    errors: tuple[str, ...] = ()
    replies: int | None = None
    """ping only: echo replies received."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "kind": self.kind,
            "attempted": self.attempted,
            "sent": self.sent,
            "errors": list(self.errors),
            "replies": self.replies,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SendEvidence:
        return cls(
            str(data["node"]),
            str(data["kind"]),
            int(data["attempted"]),
            int(data["sent"]),
            tuple(data.get("errors", ())),
            data.get("replies"),
        )


@dataclass(frozen=True, slots=True)
class FdbEntry:
    mac: str
    port: str
    flags: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "port": self.port, "flags": list(self.flags)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FdbEntry:
        return cls(str(data["mac"]), str(data["port"]), tuple(data.get("flags", ())))


WalkStep = HookStep
"""One netfilter table/chain a packet passed on a node (``.name``: ``ip:filter:INPUT``), in kernel order."""

_STEP_FIELDS = (
    "family", "table", "chain", "seq", "ifin", "ifout", "mark", "physin", "physout", "src", "dst", "ip_id", "flow"
)


def step_as_dict(step: HookStep) -> dict[str, Any]:
    return {"name": step.name, **{f: getattr(step, f) for f in _STEP_FIELDS}}


def step_from_dict(data: Mapping[str, Any]) -> HookStep:
    if "family" not in data:  # the short form a golden file may use: just the name
        family, table, chain = str(data["name"]).split(":")
        return HookStep(family, table, chain, int(data.get("seq", 0)), None, None, 0)
    values: dict[str, Any] = {f: data.get(f) for f in _STEP_FIELDS}
    return HookStep(**values)


@dataclass(frozen=True)
class Evidence:
    """Everything one window showed for one lab.

    ``counters``: per node, deltas of every counter that moved (snmp, netstat,
    link stats ``eth0.rx_packets``, qdisc ``eth0.qdisc.drops``).
    ``counter_names``: per node, every counter the node has, so a typo is not
    read as "did not move".  ``walks``: per traced node, the netfilter walk
    of each packet, in the order the packets first appeared.
    ``notifications``: per node, netlink neighbour/fdb notifications seen in
    that node's namespace during the window (``neigh 10.0.0.9 eth0 FAILED``,
    ``fdb 02:..:01 veth1``) -- namespace-exact, unlike tracepoints.
    """

    packets: tuple[Packet, ...] = ()
    events: tuple[Event, ...] = ()
    """Every attributed event: the packets' events and deviceless events run by lab tasks."""
    traced: frozenset[str] = frozenset()
    """The tracepoints this kernel let the window enable."""
    lost_events: int = 0
    counters: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: FROZEN_EMPTY)
    counter_names: Mapping[str, frozenset[str]] = field(default_factory=lambda: FROZEN_EMPTY)
    softnet: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: FROZEN_EMPTY)
    """Per CPU (as a string), deltas of /proc/net/softnet_stat columns."""
    captures: Mapping[str, CaptureEvidence] = field(default_factory=lambda: FROZEN_EMPTY)
    sockets: tuple[SocketEvidence, ...] = ()
    sends: tuple[SendEvidence, ...] = ()
    rules: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: FROZEN_EMPTY)
    ebtables: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: FROZEN_EMPTY)
    ip6tables: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: FROZEN_EMPTY)
    nft: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: FROZEN_EMPTY)
    """Per node, packet deltas of nf_tables rule counters: by ``family table chain handle N`` and by comment."""
    walks: Mapping[str, tuple[tuple[WalkStep, ...], ...]] = field(default_factory=lambda: FROZEN_EMPTY)
    fdb: Mapping[str, tuple[FdbEntry, ...]] = field(default_factory=lambda: FROZEN_EMPTY)
    macs: Mapping[str, str] = field(default_factory=lambda: FROZEN_EMPTY)
    """``node:iface`` -> MAC, for expectations that name an interface instead of a MAC."""
    conntrack: int = 0
    conntrack_entries: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=lambda: FROZEN_EMPTY)
    """Per node, each conntrack entry as a flat record (proto, src, dst, sport, dport, reply_*, state, zone,
    status, mark) -- read only when an expectation needs conntrack."""
    routes: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: FROZEN_EMPTY)
    """``'node dst'`` -> what ``ip route get`` answered after the traffic (dev, via, src, mtu, type, error)."""
    notifications: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: FROZEN_EMPTY)
    errors: tuple[str, ...] = field(default=())
    """Steps that could not do what they said (a socket that failed, an exec that timed out)."""
    connections: tuple[ConnectionEvidence, ...] = ()
    """Every TCP connection the check's tcp steps attempted, in order."""
    execs: tuple[ExecEvidence, ...] = ()
    """Every program the check's exec steps ran (setup, traffic, undo), in order."""

    # ------------------------------------------------------------ derived views

    def drops(self) -> list[Event]:
        return [e for e in self.events if e.key == DROP_EVENT]

    def event_counts(self) -> Counter[str]:
        """Events by every name an expectation may use (:meth:`TraceEvent.names`).

        Counted by (key, devices) first: a burst's 80,000 events have a handful of those, and naming each
        event on its own was a third of a second of rx-backlog's check."""
        counts: Counter[str] = Counter()
        for (key, devices), n in Counter((e.key, e.devices) for e in self.events).items():
            counts[key] += n
            for device in devices:
                counts[f"{key}@{device}"] += n
        return counts

    def sent_total(self) -> int:
        return sum(s.sent for s in self.sends)

    # ------------------------------------------------------------ JSON

    def as_dict(self) -> dict[str, Any]:
        return {
            "packets": [p.as_dict() for p in self.packets],
            "events": [event_as_dict(e) for e in self.events if e.skbaddr is None],
            "traced": sorted(self.traced),
            "lost_events": self.lost_events,
            "counters": {n: dict(c) for n, c in self.counters.items()},
            "counter_names": {n: sorted(c) for n, c in self.counter_names.items()},
            "softnet": {c: dict(v) for c, v in self.softnet.items()},
            "captures": {k: v.as_dict() for k, v in self.captures.items()},
            "sockets": [s.as_dict() for s in self.sockets],
            "sends": [s.as_dict() for s in self.sends],
            "rules": {n: dict(r) for n, r in self.rules.items()},
            "ebtables": {n: dict(r) for n, r in self.ebtables.items()},
            "ip6tables": {n: dict(r) for n, r in self.ip6tables.items()},
            "nft": {n: dict(r) for n, r in self.nft.items()},
            "walks": {n: [[step_as_dict(s) for s in w] for w in walks] for n, walks in self.walks.items()},
            "fdb": {k: [e.as_dict() for e in v] for k, v in self.fdb.items()},
            "macs": dict(self.macs),
            "conntrack": self.conntrack,
            "conntrack_entries": {n: [dict(e) for e in v] for n, v in self.conntrack_entries.items()},
            "routes": {k: dict(v) for k, v in self.routes.items()},
            "notifications": {n: list(v) for n, v in self.notifications.items()},
            "errors": list(self.errors),
            "connections": [c.as_dict() for c in self.connections],
            "execs": [x.as_dict() for x in self.execs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evidence:
        """A recorded Evidence (golden files): the inverse of :meth:`as_dict`."""
        packets = tuple(Packet.from_dict(p) for p in data.get("packets", ()))
        loose = tuple(event_from_dict(e) for e in data.get("events", ()))
        events = tuple(sorted([e for p in packets for e in p.events] + list(loose), key=lambda e: e.timestamp))
        return cls(
            packets=packets,
            events=events,
            traced=frozenset(data.get("traced", ())),
            lost_events=int(data.get("lost_events", 0)),
            counters=frozen_nested(data.get("counters", {})),
            counter_names=MappingProxyType({n: frozenset(v) for n, v in data.get("counter_names", {}).items()}),
            softnet=frozen_nested(data.get("softnet", {})),
            captures=MappingProxyType({k: CaptureEvidence.from_dict(v) for k, v in data.get("captures", {}).items()}),
            sockets=tuple(SocketEvidence.from_dict(s) for s in data.get("sockets", ())),
            sends=tuple(SendEvidence.from_dict(s) for s in data.get("sends", ())),
            rules=frozen_nested(data.get("rules", {})),
            ebtables=frozen_nested(data.get("ebtables", {})),
            ip6tables=frozen_nested(data.get("ip6tables", {})),
            nft=frozen_nested(data.get("nft", {})),
            walks=MappingProxyType(
                {
                    n: tuple(tuple(step_from_dict(s) for s in w) for w in walks)
                    for n, walks in data.get("walks", {}).items()
                }
            ),
            fdb=MappingProxyType({k: tuple(FdbEntry.from_dict(e) for e in v) for k, v in data.get("fdb", {}).items()}),
            macs=MappingProxyType(dict(data.get("macs", {}))),
            conntrack=int(data.get("conntrack", 0)),
            conntrack_entries=MappingProxyType(
                {n: tuple(MappingProxyType(dict(e)) for e in v) for n, v in data.get("conntrack_entries", {}).items()}
            ),
            routes=frozen_nested(data.get("routes", {})),
            notifications=MappingProxyType({n: tuple(v) for n, v in data.get("notifications", {}).items()}),
            errors=tuple(data.get("errors", ())),
            connections=tuple(ConnectionEvidence.from_dict(c) for c in data.get("connections", ())),
            execs=tuple(ExecEvidence.from_dict(x) for x in data.get("execs", ())),
        )


def frozen_nested(data: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in data.items()})
