"""What a trace shows: stages, endings, paths and results, and their ``--json`` fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from labctl.kernel.tracefs import TraceEvent

Evidence = Literal["traced", "counted", "inferred"]
Fate = Literal["dropped", "delivered", "consumed", "queued", "merged", "relayed", "unknown"]

HOOKS = {
    "PREROUTING": "PREROUTING",
    "INPUT": "LOCAL_IN",
    "FORWARD": "FORWARD",
    "OUTPUT": "LOCAL_OUT",
    "POSTROUTING": "POSTROUTING",
}
"""Built-in iptables chain → the netfilter hook the notes name."""


@dataclass
class Stage:
    """One step of a packet's path, in the notes' words, and how it is known."""

    name: str
    """``netif_rx``, ``backlog``, ``netif_receive_skb``, ``AF_PACKET tap``, ``ip_rcv``, a hook
    (``PREROUTING``, ``LOCAL_IN``, ``FORWARD``, ``LOCAL_OUT``, ``POSTROUTING``), ``routing``,
    ``UDP``/``TCP``/``ICMP``, ``socket``, ``dev_queue_xmit``, ``driver xmit``, ``tx done`` ... or,
    for an event this module has no word for, the event's own ``system:name``."""
    node: str | None
    """None: the event could not be placed in a node (shown raw)."""
    device: str | None = None
    evidence: Evidence = "traced"
    detail: str = ""
    event: str | None = None
    """The tracepoint (``net:netif_rx``) for traced stages."""
    timestamp: float | None = None
    cpu: int | None = None
    pid: int | None = None
    counters: dict[str, int] = field(default_factory=dict)
    """Deltas over the whole trace next to this stage: ``Udp.NoPorts``, ``eth0.rx_packets``,
    ``softnet.cpu1.processed``, ``filter:INPUT:policy`` ..."""
    note: str = ""
    """Secondary evidence, e.g. the fib lookup that proves a routing stage."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "node": self.node,
            "device": self.device,
            "evidence": self.evidence,
            "detail": self.detail,
            "event": self.event,
            "timestamp": self.timestamp,
            "cpu": self.cpu,
            "pid": self.pid,
            "counters": self.counters,
            "note": self.note,
        }


@dataclass
class Ending:
    """Where a packet's story stopped, and why."""

    fate: Fate
    node: str | None
    device: str | None = None
    stage: str | None = None
    """The stage it stopped at (``L4`` becomes the protocol's name)."""
    reason: str | None = None
    location: str | None = None
    function: str | None = None
    detail: str = ""
    counters: dict[str, int] = field(default_factory=dict)
    evidence: Evidence = "traced"

    def as_dict(self) -> dict[str, Any]:
        return {
            "fate": self.fate,
            "node": self.node,
            "device": self.device,
            "stage": self.stage,
            "reason": self.reason,
            "location": self.location,
            "function": self.function,
            "detail": self.detail,
            "counters": self.counters,
            "evidence": self.evidence,
        }


@dataclass
class Segment:
    """The part of a path spent in one node: arrived over ``hop_from`` on ``device``."""

    node: str | None
    device: str | None
    hop_from: tuple[str, str] | None
    stages: list[Stage] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "device": self.device,
            "from": f"{self.hop_from[0]}:{self.hop_from[1]}" if self.hop_from else None,
            "stages": [s.as_dict() for s in self.stages],
        }


@dataclass
class PacketPath:
    """One skb from its first event to its free (or to the end of the trace).

    Skbs of a burst that took the same path (:mod:`.burst`) share one explanation: their
    ``segments`` and ``ending`` are the same objects (stage times are the first skb's); ``index``,
    ``skb`` and ``events`` are each one's own.
    """

    index: int
    skb: int
    role: Literal["injected", "related", "observed"]
    segments: list[Segment]
    ending: Ending
    kind: str = ""
    """``IPv4 UDP``, ``ARP``, ``IPv4 ICMP`` ... when known."""
    length: int | None = None
    events: list[TraceEvent] = field(default_factory=list, repr=False)

    @property
    def stages(self) -> list[Stage]:
        return [stage for segment in self.segments for stage in segment.stages]

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.segments if s.node is not None]

    @property
    def start(self) -> float:
        return self.events[0].timestamp if self.events else 0.0

    @property
    def end(self) -> float:
        return self.events[-1].timestamp if self.events else 0.0

    def signature(self) -> tuple[Any, ...]:
        """What makes two paths the same for people: stages, places and the ending (not times)."""
        stages = tuple((s.name, s.node, s.device, s.evidence, s.detail) for s in self.stages)
        return (stages, self.ending.fate, self.ending.reason, self.ending.function, self.ending.node)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "skb": hex(self.skb),
            "role": self.role,
            "kind": self.kind,
            "length": self.length,
            "segments": [s.as_dict() for s in self.segments],
            "ending": self.ending.as_dict(),
        }


@dataclass
class RuleDelta:
    table: str
    chain: str
    key: str
    rule: str
    packets: int
    target: str | None

    @property
    def hook(self) -> str | None:
        return HOOKS.get(self.chain)


def rules_as_dict(rules: dict[str, dict[str, RuleDelta]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{node: {"table:CHAIN:N|policy": {"rule", "packets"}}}``, the ``rules`` field of the JSON forms."""
    return {
        node: {key: {"rule": r.rule, "packets": r.packets} for key, r in rows.items()} for node, rows in rules.items()
    }


@dataclass
class TraceResult:
    """What one traced injection showed.  ``as_dict()`` is the ``--json`` form.

    JSON fields (stable; new fields may be added, none renamed):

    - ``lab``, ``node``, ``interface``, ``packet`` (the expression), ``summary`` (Scapy's),
      ``frame_bytes``, ``count`` (asked), ``sent`` (accepted by the kernel), ``send_errors``
      ({errno: n}), ``inject_seconds``, ``elapsed_seconds`` (the whole trace),
      ``settled`` (every injected skb was seen and went quiet before the deadline),
      ``lost_events`` (non-zero: the evidence is incomplete), ``events`` (tracepoints
      recorded), ``events_skipped`` ({event: why}), ``fates`` ({"dropped:NO_SOCKET": n, ...}).
    - ``packets``: one object per distinct path the injected skbs took, in order of first
      appearance (a burst of 100,000 identical frames is one object): the first skb that took
      it, in full, plus ``count`` (how many took it) and ``skbs`` ([index, hex address, first
      and last event's timestamp] of every one of them; the stages' times are the first
      one's).  ``related``: skbs born while our thread handled them (ARP, ICMP errors), one
      object each.  Each has ``index``, ``skb`` (hex address), ``role``
      (injected/related/observed), ``kind``, ``length``, ``segments`` and ``ending``.
    - a segment: ``node`` (null when it could not be placed), ``device`` (arrived on),
      ``from`` ("node:device" of the transmit, or null), ``stages``.
    - a stage: ``stage`` (name), ``node``, ``device``, ``evidence`` (traced | counted |
      inferred), ``detail``, ``event`` (tracepoint or null), ``timestamp`` (CLOCK_MONOTONIC s),
      ``cpu``, ``pid``, ``counters`` ({name: delta}).
    - ``ending``: ``fate`` (dropped | delivered | consumed | queued | merged | relayed |
      unknown), ``node``, ``device``, ``stage``, ``reason`` (drop reason), ``location``
      (``fn+off/len``), ``function``, ``detail``, ``counters``, ``evidence``.
    - ``counters``: {node: {name: delta}} with snmp/netstat names (``Udp.NoPorts``), link
      stats as ``<dev>.<stat>`` and qdisc stats as ``<dev>.qdisc.<stat>``; ``softnet``:
      {cpu: {column: delta}} (host-wide); ``rules``: {node: {"table:CHAIN:N|policy":
      {"rule", "packets"}}} (iptables, legacy xtables) -- every one a delta over the trace.
    """

    lab: str
    node: str
    interface: str
    packet: str
    summary: str
    frame_bytes: int
    count: int
    sent: int = 0
    send_errors: dict[int, int] = field(default_factory=dict)
    inject_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    settled: bool = False
    lost_events: int = 0
    events_enabled: list[str] = field(default_factory=list)
    events_skipped: dict[str, str] = field(default_factory=dict)
    packets: list[PacketPath] = field(default_factory=list)
    related: list[PacketPath] = field(default_factory=list)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    softnet: dict[str, dict[str, int]] = field(default_factory=dict)
    rules: dict[str, dict[str, RuleDelta]] = field(default_factory=dict)

    @property
    def fates(self) -> dict[str, int]:
        tally: dict[str, int] = {}
        for path in self.packets:
            key = path.ending.fate + (f":{path.ending.reason}" if path.ending.reason else "")
            tally[key] = tally.get(key, 0) + 1
        return tally

    def groups(self) -> list[list[PacketPath]]:
        """Injected packets with the same path, in order of first appearance.

        Packets of a burst explained once (:mod:`.burst`) share their segments: the signature is
        computed once per explanation, not once per packet.
        """
        by_explanation: dict[int, list[PacketPath]] = {}
        for path in self.packets:
            by_explanation.setdefault(id(path.segments), []).append(path)
        by_signature: dict[tuple[Any, ...], list[PacketPath]] = {}
        for bucket in by_explanation.values():
            by_signature.setdefault(bucket[0].signature(), []).extend(bucket)
        groups = list(by_signature.values())
        for group in groups:
            group.sort(key=lambda p: p.index)
        groups.sort(key=lambda g: g[0].index)
        return groups

    @staticmethod
    def group_as_dict(group: list[PacketPath]) -> dict[str, Any]:
        """A distinct path: its first packet in full, how many took it, and each one's skb and times."""
        return {
            **group[0].as_dict(),
            "count": len(group),
            "skbs": [[p.index, hex(p.skb), p.start, p.end] for p in group],
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "node": self.node,
            "interface": self.interface,
            "packet": self.packet,
            "summary": self.summary,
            "frame_bytes": self.frame_bytes,
            "count": self.count,
            "sent": self.sent,
            "send_errors": {str(k): v for k, v in self.send_errors.items()},
            "inject_seconds": round(self.inject_seconds, 6),
            "elapsed_seconds": round(self.elapsed_seconds, 6),
            "settled": self.settled,
            "lost_events": self.lost_events,
            "events": self.events_enabled,
            "events_skipped": self.events_skipped,
            "fates": self.fates,
            "packets": [self.group_as_dict(group) for group in self.groups()],
            "related": [p.as_dict() for p in self.related],
            "counters": self.counters,
            "softnet": self.softnet,
            "rules": rules_as_dict(self.rules),
        }


@dataclass
class FollowSummary:
    """What ``--follow`` saw overall; counters are deltas from its start to its end.

    JSON fields: ``type`` ("summary"), ``seconds``, ``shown``, ``ambiguous``,
    ``lost_events``, ``counters``, ``softnet``, ``rules`` (as in :class:`TraceResult`).
    """

    seconds: float = 0.0
    shown: int = 0
    ambiguous: int = 0
    """Skbs on device names other namespaces share, started by no task of the lab: not shown."""
    lost_events: int = 0
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    softnet: dict[str, dict[str, int]] = field(default_factory=dict)
    rules: dict[str, dict[str, RuleDelta]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "summary",
            "seconds": round(self.seconds, 3),
            "shown": self.shown,
            "ambiguous": self.ambiguous,
            "lost_events": self.lost_events,
            "counters": self.counters,
            "softnet": self.softnet,
            "rules": rules_as_dict(self.rules),
        }
