"""Where a lab's packet went in the kernel, and why it stopped there.

``labctl trace`` answers the first question a reader of the notes asks: *where
did my packet go?*  It injects a frame on a node's interface (the frame
``labctl inject`` would send), records the kernel's tracepoints in a private
tracefs instance, and tells that skb's story in the notes' vocabulary::

    client eth0 ─tx→ server eth0: netif_rx → backlog (cpu1) → netif_receive_skb
      → AF_PACKET tap (1 socket) → ip_rcv → PREROUTING → routing: local → LOCAL_IN → UDP
      ✗ dropped: NO_SOCKET at __udp4_lib_rcv   (Udp NoPorts +1, ICMP port unreachable sent)

Three problems shape the code.

**Attribution.**  Tracepoints are global and device names are not unique
(every lab has an eth0).  An injected skb is recognised by its *first* event:
``net_dev_queue`` on the injecting device, run by the injecting thread in its
own call (not in a softirq it lent its context to), with the frame's length.
From there it is followed by address until it is freed, whichever CPU or task
runs the later stages (RPS, NAPI, ksoftirqd).  Skbs born from ours -- in our
thread, right after one of our events on the same CPU, on a device of that
node (the ARP exchange, the ICMP error) -- are reported as *related*.
Nothing else is adopted, however similar.

**Placement.**  A device event names a device, not a namespace.  The node is
resolved from the lab: the injecting node for the first transmit, the far
end of the link (``topo.links``) for the receive that follows a transmit, the
node the skb is already on for its other devices (a bridge, ``lo``, the way
out of a router), a device name only one node has, the node the same CPU was
working in just before (for related skbs), the task's network namespace
(``--follow``), and the fib lookup the receiver made (its input ifindex and
the packet's addresses, which the topology assigns to nodes).  A VM relay
copies a frame into a new skb: the path goes on with the skb that relay
writes on the far tap, with the same length.  What cannot be placed is shown
raw, never dropped.

**Evidence.**  Much of the path has no tracepoint on this kernel (no
kprobes): ip_rcv, the netfilter hooks, routing and UDP do not.  Every stage
says how it is known -- ``traced`` (a tracepoint of this skb or of the
lookup it made), ``counted`` (a counter of that node moved during the trace:
snmp/netstat, a rule counter, softnet_stat, link stats) or ``inferred``
(the code path between two stages with evidence must have run).  Nothing is
claimed past the last stage with evidence, and counters are always shown as
deltas over the trace, so with ``count`` > 1 or other traffic in the lab they
count every packet, not one.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from labctl.kernel import counters, iptables, netns, tracefs
from labctl.kernel.links import NodeLinks
from labctl.kernel.packet import Injector
from labctl.kernel.tracefs import ChainBuilder, SkbChain, TraceEvent, TraceSession
from labctl.lab import relay
from labctl.lab.traffic import PreparedFrame, prepare_injection
from labctl.topology.model import Topology

Evidence = Literal["traced", "counted", "inferred"]
Fate = Literal["dropped", "delivered", "consumed", "queued", "merged", "relayed", "unknown"]

RICH_EVENTS: tuple[str, ...] = tracefs.DEFAULT_EVENTS
"""Events for a few packets: everything, including the fib lookups that prove routing."""

LEAN_EVENTS: tuple[str, ...] = (
    "skb:kfree_skb",
    "skb:consume_skb",
    "skb:skb_copy_datagram_iovec",
    "net:netif_rx",
    "net:netif_receive_skb",
    "net:napi_gro_receive_entry",
    "net:net_dev_queue",
    "qdisc:*",
    "bridge:br_fdb_update",
)
"""Events for bursts.  Measured on 6.18, 100k frames on a veth (bench/bench_trace.py): every
tracepoint costs 0.1-0.2 µs per packet, so the rich set (fib lookups, the driver transmit's
start and end, napi_poll) takes injection down to 0.47× the untraced rate, this set to 0.73×.
It keeps what attribution and placement need: the first transmit, every receive, the free."""

BULK = 64
"""Above this many packets a trace uses :data:`LEAN_EVENTS` and waits a fixed settle time."""

BYTES_PER_PACKET = 512
"""Ring-buffer room per traced packet with LEAN_EVENTS (4-6 events of ~60 bytes); three times that
with the rich set, whose fib lookup and driver-transmit events are larger."""

MAX_BUFFER_KB = 256 * 1024
QUIET = 0.03
"""Seconds with no new event of ours before a trace is considered settled."""
IDLE = 0.05
"""An injected skb with no new event for this long is not going anywhere (queued, merged)."""

RX_EVENTS = frozenset(
    {
        "net:netif_rx",
        "net:netif_receive_skb",
        "net:napi_gro_receive_entry",
        "net:netif_receive_skb_entry",
        "net:netif_receive_skb_list_entry",
        "net:netif_rx_entry",
        "net:napi_gro_frags_entry",
    }
)
TX_EVENTS = frozenset({"net:net_dev_queue", "net:net_dev_start_xmit", "net:net_dev_xmit"})

ETH_P_IP, ETH_P_ARP, ETH_P_ALL = 0x0800, 0x0806, 0x0003
IP_PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP"}

HOOKS = {
    "PREROUTING": "PREROUTING",
    "INPUT": "LOCAL_IN",
    "FORWARD": "FORWARD",
    "OUTPUT": "LOCAL_OUT",
    "POSTROUTING": "POSTROUTING",
}
"""Built-in iptables chain → the netfilter hook the notes name."""

_REASON_STAGE = {
    "CPU_BACKLOG": "backlog",
    "OTHERHOST": "ip_rcv",
    "PKT_TOO_SMALL": "ip_rcv",
    "IP_CSUM": "ip_rcv",
    "IP_INHDR": "ip_rcv",
    "IP_RPFILTER": "routing",
    "UNICAST_IN_L2_MULTICAST": "ip_rcv",
    "NETFILTER_DROP": "netfilter",
    "IP_INADDRERRORS": "routing",
    "IP_INNOROUTES": "routing",
    "IP_OUTNOROUTES": "routing",
    "NO_SOCKET": "L4",
    "UDP_CSUM": "L4",
    "SOCKET_RCVBUFF": "socket",
    "SOCKET_FILTER": "socket",
    "SOCKET_CLOSE": "socket",
    "PROTO_MEM": "socket",
    "QDISC_DROP": "qdisc",
}
"""Where on the path each drop reason stops a packet (the stage it is shown after)."""

_FUNCTION_STAGE = {
    "enqueue_to_backlog": "backlog",
    "ip_rcv": "ip_rcv",
    "ip_rcv_core": "ip_rcv",
    "ip_error": "routing",
    "ip_rcv_finish": "routing",
    "ip_rcv_finish_core": "routing",
    "nf_hook_slow": "netfilter",
    "__udp4_lib_rcv": "L4",
    "udp_rcv": "L4",
    "tcp_v4_rcv": "L4",
    "icmp_rcv": "L4",
    "udp_queue_rcv_one_skb": "socket",
    "__udp_enqueue_schedule_skb": "socket",
    "__dev_queue_xmit": "qdisc",
}

_CONSUMERS: dict[str, tuple[Fate, str]] = {
    "skb_consume_udp": ("delivered", "read by the application (recvmsg)"),
    "__consume_stateless_skb": ("delivered", "read by the application (recvmsg)"),
    "udp_recvmsg": ("delivered", "read by the application (recvmsg)"),
    "skb_free_datagram": ("delivered", "read by the application (recvmsg)"),
    # 6.18 hands a read skb back to the CPU that allocated it (skb_attempt_defer_free, only
    # called by the sockets' receive paths); that CPU frees it at its next softirq
    "skb_defer_free_flush": ("delivered", "read by the application (recvmsg), freed later (deferred free)"),
    "napi_consume_skb": ("delivered", "read by the application (recvmsg), freed later (deferred free)"),
    "icmp_rcv": ("consumed", "handled by ICMP (icmp_rcv)"),
    "arp_process": ("consumed", "handled by ARP (arp_process)"),
    "arp_rcv": ("consumed", "handled by ARP (arp_rcv)"),
    "tun_do_read": ("relayed", "read from the tap by the VM relay (tun_do_read)"),
    "tun_put_user": ("relayed", "read from the tap by the VM relay"),
    "tpacket_rcv": ("consumed", "AF_PACKET copy freed (tpacket_rcv)"),
}
"""consume_skb locations → what the consumption means."""

_LOCAL_FUNCTIONS = frozenset({"__udp4_lib_rcv", "udp_rcv", "tcp_v4_rcv", "icmp_rcv", "ip_local_deliver"})
_LOCAL_FUNCTIONS |= frozenset({"udp_queue_rcv_one_skb", "__udp_enqueue_schedule_skb", "raw_rcv"})

_STAGE_COUNTERS: dict[str, tuple[str, ...]] = {
    "ip_rcv": ("Ip.InReceives", "Ip.InHdrErrors", "Ip.InDiscards", "IpExt.InTruncatedPkts", "IpExt.InCsumErrors"),
    "routing:local": ("Ip.InDelivers",),
    "routing:forward": ("Ip.ForwDatagrams",),
    "routing:error": ("Ip.InAddrErrors", "IpExt.InNoRoutes"),
    "UDP": ("Udp.InDatagrams", "Udp.NoPorts", "Udp.InErrors", "Udp.InCsumErrors"),
    "TCP": ("Tcp.InSegs", "Tcp.InErrs", "Tcp.OutRsts"),
    "ICMP": ("Icmp.InMsgs", "Icmp.InErrors", "Icmp.InEchos", "Icmp.InDestUnreachs"),
    "socket": ("Udp.RcvbufErrors", "Udp.InErrors"),
}
"""Counters shown next to a stage when they moved (snmp/netstat names as ``Proto.Name``)."""

_REASON_COUNTERS: dict[str, tuple[str, ...]] = {
    "NO_SOCKET": ("Udp.NoPorts", "Icmp.OutDestUnreachs"),
    "SOCKET_RCVBUFF": ("Udp.RcvbufErrors", "Udp.InErrors"),
    "SOCKET_FILTER": ("Udp.InErrors",),
    "IP_INADDRERRORS": ("Ip.InAddrErrors",),
    "IP_INNOROUTES": ("IpExt.InNoRoutes",),
    "OTHERHOST": (),
    "CPU_BACKLOG": (),
}


# --------------------------------------------------------------------------- results


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
    """One skb from its first event to its free (or to the end of the trace)."""

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
    - ``packets``: one object per injected skb, in order; ``related``: skbs born while our
      thread handled them (ARP, ICMP errors).  Each has ``index``, ``skb`` (hex address),
      ``role`` (injected/related/observed), ``kind``, ``length``, ``segments`` and ``ending``.
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
        """Injected packets with the same path, in order of first appearance."""
        by_signature: dict[tuple[Any, ...], list[PacketPath]] = {}
        for path in self.packets:
            by_signature.setdefault(path.signature(), []).append(path)
        return list(by_signature.values())

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
            "packets": [p.as_dict() for p in self.packets],
            "related": [p.as_dict() for p in self.related],
            "counters": self.counters,
            "softnet": self.softnet,
            "rules": {
                node: {key: {"rule": r.rule, "packets": r.packets} for key, r in rows.items()}
                for node, rows in self.rules.items()
            },
        }


# --------------------------------------------------------------------------- what the frame is


@dataclass(frozen=True)
class FrameInfo:
    """The headers of an injected frame that the analysis needs (parsed without Scapy)."""

    length: int
    ethertype: int
    src_ip: str | None = None
    dst_ip: str | None = None
    protocol: int | None = None
    dport: int | None = None

    @classmethod
    def parse(cls, frame: bytes) -> FrameInfo:
        if len(frame) < 14:
            return cls(len(frame), 0)
        (ethertype,) = struct.unpack_from("!H", frame, 12)
        offset = 14
        if ethertype == 0x8100 and len(frame) >= 18:
            (ethertype,) = struct.unpack_from("!H", frame, 16)
            offset = 18
        if ethertype != ETH_P_IP or len(frame) < offset + 20:
            return cls(len(frame), ethertype)
        ihl = (frame[offset] & 0x0F) * 4
        protocol = frame[offset + 9]
        src = str(ipaddress.IPv4Address(frame[offset + 12 : offset + 16]))
        dst = str(ipaddress.IPv4Address(frame[offset + 16 : offset + 20]))
        dport = None
        if protocol in (6, 17) and len(frame) >= offset + ihl + 4:
            (dport,) = struct.unpack_from("!H", frame, offset + ihl + 2)
        return cls(len(frame), ethertype, src, dst, protocol, dport)

    @property
    def kind(self) -> str:
        if self.ethertype == ETH_P_IP:
            return "IPv4 " + IP_PROTOCOLS.get(self.protocol or -1, f"proto {self.protocol}")
        return _ethertype_name(self.ethertype)


def _ethertype_name(ethertype: int | None) -> str:
    return {ETH_P_IP: "IPv4", ETH_P_ARP: "ARP", 0x86DD: "IPv6"}.get(ethertype or -1, f"ethertype {ethertype:#06x}")


# --------------------------------------------------------------------------- what the lab knows


@dataclass(frozen=True)
class PacketSocket:
    """A row of /proc/net/packet: an AF_PACKET socket that may tap a device."""

    protocol: int
    ifindex: int
    running: bool


def _read_in(namespace: str, path: str) -> str:
    """A /proc/net file as seen from ``namespace`` (thread-self: the thread's namespace)."""
    with netns.entered(namespace), open(path.replace("/proc/net/", "/proc/thread-self/net/")) as f:
        return f.read()


def packet_sockets(namespace: str) -> list[PacketSocket]:
    sockets = []
    for line in _read_in(namespace, "/proc/net/packet").splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6:
            sockets.append(PacketSocket(int(parts[3], 16), int(parts[4]), parts[5] == "1"))
    return sockets


@dataclass(frozen=True)
class UdpSocket:
    port: int
    rx_queue: int
    drops: int
    inode: int


def udp_sockets(namespace: str) -> dict[int, UdpSocket]:
    """Bound UDP sockets by inode, with receive-queue bytes and the socket's own drop count."""
    found: dict[int, UdpSocket] = {}
    for line in _read_in(namespace, "/proc/net/udp").splitlines()[1:]:
        parts = line.split()
        if len(parts) < 13:
            continue
        port = int(parts[1].rpartition(":")[2], 16)
        rx_queue = int(parts[4].partition(":")[2], 16)
        found[int(parts[9])] = UdpSocket(port, rx_queue, int(parts[12]), int(parts[9]))
    return found


class Knowledge:
    """The lab as the analysis needs it: devices, links, ifindexes, sockets and counter deltas."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.namespaces = {node: netns.namespace_name(topo.name, node) for node in topo.nodes}
        self.devices: dict[str, set[str]] = {node: topo.interface_names(node) for node in topo.nodes}
        self.owners: dict[str, list[str]] = {}
        for node, names in self.devices.items():
            for name in names:
                self.owners.setdefault(name, []).append(node)
        self.far: dict[tuple[str, str], tuple[str, str]] = {}
        self.tap_ends: set[tuple[str, str]] = set()
        for link in topo.links:
            a, b = link.ends
            self.far[(a.node, a.interface)] = (b.node, b.interface)
            self.far[(b.node, b.interface)] = (a.node, a.interface)
            if topo.is_tap_link(link):
                self.tap_ends |= {(a.node, a.interface), (b.node, b.interface)}
        self.bridge_of: dict[tuple[str, str], str] = {
            (node, port): bridge
            for node, spec in topo.nodes.items()
            for bridge, config in spec.bridges.items()
            for port in config.ports
        }
        self.rps: dict[tuple[str, str], str] = {
            (node, ifname): cfg.rps_cpus
            for node, spec in topo.nodes.items()
            for ifname, cfg in spec.interfaces.items()
            if cfg.rps_cpus and int(cfg.rps_cpus.replace(",", ""), 16)
        }
        self.addresses: dict[str, str] = {
            str(iface.ip): node
            for node, spec in topo.nodes.items()
            for cfg in spec.interfaces.values()
            for iface in cfg.addresses
        }
        """Lab IP address → the node that has it."""
        self.relays: dict[int, str] = {}
        """VM relay pid → its vm node (read by read_interfaces)."""
        self.ifindex: dict[str, dict[str, int]] = {}
        self.taps: dict[str, list[PacketSocket]] = {}
        self.udp_before: dict[str, dict[int, UdpSocket]] = {}
        self.udp_after: dict[str, dict[int, UdpSocket]] = {}
        self.deltas: dict[str, dict[str, int]] = {}
        self.softnet: dict[str, dict[str, int]] = {}
        self.rules: dict[str, dict[str, RuleDelta]] = {}
        self.rules_known = False
        self.fib: list[TraceEvent] = []
        self._fib_times: list[float] = []

    @property
    def lab_devices(self) -> set[str]:
        return set(self.owners)

    def read_interfaces(self) -> None:
        """Interface indexes of every node, and the VM relays (only labs with VMs have any)."""
        for node, ns in self.namespaces.items():
            with NodeLinks(ns) as handle:
                self.ifindex[node] = handle.refresh()
        if self.tap_ends:
            self.relays = {pid: vm for pid, (_lab, vm) in relay.find(self.topo.name).items()}

    def read_sockets(self, *, after: bool) -> None:
        """Packet sockets (taps) before the trace; UDP queues before and after it."""
        for node, ns in self.namespaces.items():
            if not after:
                self.taps[node] = packet_sockets(ns)
            (self.udp_after if after else self.udp_before)[node] = udp_sockets(ns)

    def set_fib(self, events: Iterable[TraceEvent]) -> None:
        self.fib = sorted((e for e in events if e.key == "fib:fib_table_lookup"), key=lambda e: e.timestamp)
        self._fib_times = [e.timestamp for e in self.fib]

    # -- lookups the path builder makes

    def delta(self, node: str | None, key: str) -> int:
        return self.deltas.get(node or "", {}).get(key, 0)

    def moved(self, node: str | None, keys: Iterable[str]) -> dict[str, int]:
        return {key: value for key in keys if (value := self.delta(node, key))}

    def link_moved(self, node: str | None, device: str | None, keys: Iterable[str]) -> dict[str, int]:
        return self.moved(node, (f"{device}.{key}" for key in keys)) if device else {}

    def tap_count(self, node: str, device: str, ethertype: int | None) -> int:
        index = self.ifindex.get(node, {}).get(device)
        wanted = {ETH_P_ALL} | ({ethertype} if ethertype else set())
        return sum(1 for s in self.taps.get(node, []) if s.running and s.protocol in wanted and s.ifindex in (0, index))

    def queued_on(self, node: str, port: int | None) -> tuple[int, int]:
        """(bytes waiting, socket drops during the trace) of the UDP sockets bound to ``port``."""
        waiting = drops = 0
        before = self.udp_before.get(node, {})
        for inode, sock in self.udp_after.get(node, {}).items():
            if port is not None and sock.port != port:
                continue
            waiting += sock.rx_queue
            old = before.get(inode)
            drops += sock.drops - (old.drops if old else 0)
        return waiting, drops

    def fib_between(
        self,
        start: float,
        end: float,
        cpu: int,
        index: int | None,
        info: FrameInfo | None,
        *,
        any_iif: bool = False,
    ) -> TraceEvent | None:
        """The first fib lookup on ``cpu`` in [start, end] for this packet (same addresses or ifindex).

        ``any_iif``: the first input lookup (iif set), whatever the interface.
        """
        for position in range(bisect.bisect_left(self._fib_times, start), len(self.fib)):
            event = self.fib[position]
            if event.timestamp > end:
                break
            if event.cpu != cpu:
                continue
            fields = event.fields
            if info is not None and info.dst_ip is not None:
                if fields.get("dst") == info.dst_ip and fields.get("src") == info.src_ip:
                    return event
            else:
                iif = fields.get("iif")
                if (index is not None and iif == index) or (any_iif and isinstance(iif, int) and iif > 0):
                    return event
        return None

    def hook_rules(self, node: str, hook: str) -> list[RuleDelta]:
        return [r for r in self.rules.get(node, {}).values() if _hook_of(r, self.rules.get(node, {})) == hook]


# --------------------------------------------------------------------------- counters


def _flatten(delta: dict[str, Any], knowledge: Knowledge) -> dict[str, dict[str, int]]:
    """Per node: snmp names as they are, ``eth0.rx_packets`` links, ``eth0.qdisc.drops`` qdiscs."""
    result: dict[str, dict[str, int]] = {}
    for node, ns in knowledge.namespaces.items():
        data = delta.get("namespaces", {}).get(ns, {})
        flat: dict[str, int] = dict(data.get("snmp", {}))
        for ifname, stats in data.get("links", {}).items():
            for key, value in stats.items():
                flat[f"{ifname}.{key}"] = value
        for ifname, qdiscs in data.get("qdisc", {}).items():
            for stats in qdiscs.values():
                for key, value in stats.items():
                    flat[f"{ifname}.qdisc.{key}"] = flat.get(f"{ifname}.qdisc.{key}", 0) + value
        if flat:
            result[node] = flat
    return result


def _rule_key(row: iptables.RuleCounter) -> str:
    return f"{row.table}:{row.chain}:{'policy' if row.position == 0 else row.position}"


def _target(row: iptables.RuleCounter) -> str | None:
    if row.position == 0:
        return row.policy
    match = re.search(r"(?:^|\s)-[jg] (\S+)", row.rule)
    return match.group(1) if match else None


def read_rules(knowledge: Knowledge) -> dict[str, dict[str, iptables.RuleCounter]]:
    """Every iptables rule and policy counter of every node (tables that exist only)."""
    rows: dict[str, dict[str, iptables.RuleCounter]] = {}
    for node, ns in knowledge.namespaces.items():
        try:
            rows[node] = {_rule_key(r): r for r in iptables.list_rules(ns)}
        except (iptables.RuleError, OSError):
            rows[node] = {}
    return rows


def rule_deltas(
    before: dict[str, dict[str, iptables.RuleCounter]], after: dict[str, dict[str, iptables.RuleCounter]]
) -> dict[str, dict[str, RuleDelta]]:
    """Per node, every rule with its packet delta (zero included: a hook with rules but no count)."""
    result: dict[str, dict[str, RuleDelta]] = {}
    for node, rows in after.items():
        old = before.get(node, {})
        result[node] = {}
        for key, row in rows.items():
            prev = old.get(key)
            base = prev.packets if prev is not None and prev.rule == row.rule else 0
            result[node][key] = RuleDelta(row.table, row.chain, key, row.rule, row.packets - base, _target(row))
    return result


def _hook_of(rule: RuleDelta, rows: dict[str, RuleDelta], depth: int = 0) -> str | None:
    """The hook a rule runs in; a user chain inherits it from a built-in chain that jumps to it."""
    if rule.hook is not None or depth > 8:
        return rule.hook
    for other in rows.values():
        if other.table == rule.table and re.search(rf"-[jg] {re.escape(rule.chain)}(\s|$)", other.rule):
            hook = _hook_of(other, rows, depth + 1)
            if hook is not None:
                return hook
    return None


def rule_words(rule: RuleDelta) -> str:
    """``filter INPUT policy ACCEPT +1`` / ``filter INPUT #1 -p udp --dport 5000 -j DROP +1``."""
    if rule.key.endswith(":policy"):
        return f"{rule.table} {rule.chain} policy {rule.target} {rule.packets:+d}"
    number = rule.key.rpartition(":")[2]
    text = rule.rule.removeprefix(f"-A {rule.chain} ")
    return f"{rule.table} {rule.chain} #{number} {text} {rule.packets:+d}"


# --------------------------------------------------------------------------- placement


@dataclass
class _Placed:
    event: TraceEvent
    node: str | None
    device: str | None
    kind: Literal["tx", "rx", "other"]


def _kind(event: TraceEvent) -> Literal["tx", "rx", "other"]:
    if event.key in TX_EVENTS or event.system == "qdisc":
        return "tx"
    if event.key in RX_EVENTS:
        return "rx"
    return "other"


class Timeline:
    """Where (which node) each CPU was working a moment ago, from the events placed so far.

    A skb born inside the kernel (an ARP request, an ICMP error, an echo
    reply) starts with a transmit on a device whose name several nodes have;
    it is born in softirq context, in the middle of handling a placed skb on
    the same CPU and task, in the node that answers.  Only that immediate
    past counts (same CPU, same task, within :data:`CAUSE_WINDOW`): the task
    itself may live in another node (softirqs run in whoever's context).

    The text trace has microsecond timestamps, and a veth hop takes about one,
    so events are ordered by their position in the stream (``order``: the
    kernel merges the per-CPU buffers in nanosecond order), not by time alone.
    """

    def __init__(self, order: dict[int, int] | None = None) -> None:
        self.order = order if order is not None else {}
        """id(event) → position in the event stream."""
        self._keys: dict[int, list[tuple[float, int]]] = {}
        self._where: dict[int, list[tuple[str, int]]] = {}

    def key(self, event: TraceEvent) -> tuple[float, int]:
        return event.timestamp, self.order.get(id(event), -1)

    def add(self, placed: Iterable[_Placed]) -> None:
        for item in placed:
            if item.node is None:
                continue
            keys = self._keys.setdefault(item.event.cpu, [])
            where = self._where.setdefault(item.event.cpu, [])
            at = bisect.bisect_right(keys, self.key(item.event))
            keys.insert(at, self.key(item.event))
            where.insert(at, (item.node, item.event.pid))

    def node_before(self, event: TraceEvent) -> str | None:
        """The node of the placed event that ran just before ``event`` on its CPU, in its task."""
        keys = self._keys.get(event.cpu, [])
        at = bisect.bisect_left(keys, self.key(event))
        if not at or event.timestamp - keys[at - 1][0] > CAUSE_WINDOW:
            return None
        node, pid = self._where[event.cpu][at - 1]
        return node if pid == event.pid else None

    def forget(self, before: float) -> None:
        """Drop what is older than ``before`` (a live view runs for hours)."""
        for cpu, keys in self._keys.items():
            at = bisect.bisect_left(keys, (before, -1))
            del keys[:at]
            del self._where[cpu][:at]


CAUSE_WINDOW = 0.001
"""Seconds between the event that caused a new skb and the new skb's first transmit."""


Hint = Callable[[TraceEvent], "str | None"]


class Placer:
    """Puts each event of one skb in a node, following the skb through the lab's links."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.k = knowledge

    def _node_for(self, device: str, here: str | None, event: TraceEvent, hints: Sequence[Hint]) -> str | None:
        if here is not None and device in self.k.devices.get(here, ()):
            return here
        for hint in hints:
            node = hint(event)
            if node is not None and device in self.k.devices.get(node, ()):
                return node
        owners = self.k.owners.get(device, [])
        return owners[0] if len(owners) == 1 else None

    def receiver_by_fib(self, event: TraceEvent) -> str | None:
        """The node that received ``event``, from the fib lookup its IP layer made right after.

        The lookup names the input ifindex and the packet's addresses: the node
        with that device at that index that owns the destination (or whose
        link's far end owns the source) is the receiver.
        """
        if event.device is None:
            return None
        fib = self.k.fib_between(event.timestamp, event.timestamp + 0.001, event.cpu, None, None, any_iif=True)
        if fib is None:
            return None
        iif = fib.fields.get("iif")
        candidates = [
            node
            for node in self.k.owners.get(event.device, [])
            if self.k.ifindex.get(node, {}).get(event.device) == iif
        ]
        for address, owner_of in ((fib.fields.get("dst"), "self"), (fib.fields.get("src"), "far")):
            owner = self.k.addresses.get(str(address))
            if owner is None:
                continue
            fits = [
                n
                for n in candidates
                if (owner == n if owner_of == "self" else self.k.far.get((n, event.device), ("",))[0] == owner)
            ]
            if len(fits) == 1:
                return fits[0]
        return None

    def _anchor(self, events: Sequence[TraceEvent], hints: Sequence[Hint]) -> tuple[str, str] | None:
        """Where a chain whose first transmit nothing can place started: the far end of its receiver."""
        first = events[0] if events else None
        if first is None or first.device is None or _kind(first) != "tx":
            return None
        if self._node_for(first.device, None, first, hints) is not None:
            return None
        receive = next((e for e in events[1:] if e.key == "net:netif_receive_skb"), None)
        receiver = self.receiver_by_fib(receive) if receive is not None else None
        if receive is None or receiver is None or receive.device is None:
            return None
        far = self.k.far.get((receiver, receive.device))
        return far if far is not None and far[1] == first.device else None

    def place(
        self, events: Sequence[TraceEvent], start: tuple[str, str] | None = None, hints: Sequence[Hint] = ()
    ) -> tuple[list[_Placed], list[tuple[tuple[str, str], tuple[str, str]]]]:
        """(placed events, hops as ((tx node, dev), (rx node, dev))) for one skb's events."""
        if start is None:
            start = self._anchor(events, hints)
        here = start[0] if start else None
        device = start[1] if start else None
        pending: tuple[str, str] | None = None  # the last transmit, waiting for its far end
        last_xmit: tuple[str, str] | None = None  # the driver transmit that net_dev_xmit completes
        placed: list[_Placed] = []
        hops: list[tuple[tuple[str, str], tuple[str, str]]] = []
        provisional = start is None  # the first node comes from a hint until a link confirms it
        for event in events:
            kind = _kind(event)
            dev = event.device
            node: str | None
            if dev is None:
                placed.append(_Placed(event, here, device, kind))
                continue
            if event.key == "net:net_dev_xmit" and last_xmit is not None and last_xmit[1] == dev:
                placed.append(_Placed(event, last_xmit[0], dev, kind))
                continue
            if kind == "rx" and pending is not None and provisional:
                pending = self._confirm(pending, dev, placed)
                last_xmit = pending if last_xmit is not None else None
            if kind == "rx" and pending is not None and self.k.far.get(pending, ("", ""))[1] == dev:
                node = self.k.far[pending][0]
                hops.append((pending, (node, dev)))
                pending = None
            else:
                node = self._node_for(dev, here, event, hints)
            if node is not None and kind == "rx":
                provisional = False
            if node is not None:
                here, device = node, dev
                if kind == "tx":
                    pending = (node, dev)
                    if event.key == "net:net_dev_start_xmit":
                        last_xmit = (node, dev)
            placed.append(_Placed(event, node, dev, kind))
        return placed, hops

    def _confirm(self, pending: tuple[str, str], rx_device: str, placed: list[_Placed]) -> tuple[str, str]:
        """Check a hinted first transmit against the link it went out on; move it if another node fits.

        When the receive that follows names a device the hinted node's link
        does not lead to, and exactly one node owning the transmit device has
        a link that does, the transmit was that node's: the events placed so
        far are moved there.
        """
        node, dev = pending
        if self.k.far.get(pending, ("", ""))[1] == rx_device:
            return pending
        fits = [n for n in self.k.owners.get(dev, []) if self.k.far.get((n, dev), ("", ""))[1] == rx_device]
        if len(fits) != 1:
            return pending
        for item in placed:
            if item.node == node:
                item.node = fits[0]
        return fits[0], dev


# --------------------------------------------------------------------------- stages


def _drop_stage(reason: str | None, function: str | None) -> str | None:
    if reason and reason in _REASON_STAGE:
        return _REASON_STAGE[reason]
    if function and function in _FUNCTION_STAGE:
        return _FUNCTION_STAGE[function]
    if reason and reason.startswith("NEIGH_"):
        return "neighbour"
    return None


def _traced(name: str, item: _Placed, detail: str = "", counters: dict[str, int] | None = None) -> Stage:
    event = item.event
    return Stage(
        name,
        item.node,
        item.device,
        "traced",
        detail,
        event.key,
        event.timestamp,
        event.cpu,
        event.pid,
        counters or {},
    )


def _ethertype_of(events: Sequence[TraceEvent], info: FrameInfo | None) -> int | None:
    if info is not None:
        return info.ethertype
    for event in events:
        value = event.fields.get("protocol")
        if isinstance(value, int) and value:
            return value
    return None


@dataclass
class _Visit:
    node: str | None
    items: list[_Placed] = field(default_factory=list)
    hop_from: tuple[str, str] | None = None
    device: str | None = None


class PathBuilder:
    """Turns one skb's placed events into segments of stages and an ending."""

    def __init__(self, knowledge: Knowledge, *, rules_known: bool) -> None:
        self.k = knowledge
        self.rules_known = rules_known

    def build(
        self,
        chain: SkbChain,
        placed: list[_Placed],
        hops: list[tuple[tuple[str, str], tuple[str, str]]],
        *,
        index: int,
        role: Literal["injected", "related", "observed"],
        info: FrameInfo | None = None,
    ) -> PacketPath:
        visits = self._visits(placed, hops)
        terminal = placed[-1] if placed and placed[-1].event.key in tracefs.TERMINAL_EVENTS else None
        ethertype = _ethertype_of(chain.events, info)
        segments: list[Segment] = []
        ending: Ending | None = None
        for visit in visits:
            segment = Segment(visit.node, visit.device, visit.hop_from)
            local_end = self._visit_stages(visit, segment, terminal, ethertype, info)
            if local_end is not None:
                ending = local_end
            segments.append(segment)
        if ending is None:
            ending = self._open_ending(visits, terminal, info)
        length = info.length if info is not None else _first_int(chain.events, "len")
        kind = info.kind if info is not None else (_ethertype_name(ethertype) if ethertype else "")
        return PacketPath(index, chain.skbaddr, role, segments, ending, kind, length, chain.events)

    # -- grouping

    @staticmethod
    def _visits(placed: list[_Placed], hops: list[tuple[tuple[str, str], tuple[str, str]]]) -> list[_Visit]:
        arrivals = {to: frm for frm, to in hops}
        visits: list[_Visit] = []
        current: _Visit | None = None
        for item in placed:
            if item.event.key == "net:net_dev_xmit":
                owner = next((v for v in reversed(visits) if v.node == item.node), current)
                if owner is not None:
                    owner.items.append(item)
                    continue
            new_node = item.node is not None and (current is None or item.node != current.node)
            if current is None or (new_node and item.kind != "other"):
                current = _Visit(item.node)
                if item.kind == "rx" and item.node is not None and item.device is not None:
                    current.device = item.device
                    current.hop_from = arrivals.get((item.node, item.device))
                visits.append(current)
            current.items.append(item)
        return visits

    # -- one node

    def _visit_stages(
        self, visit: _Visit, segment: Segment, terminal: _Placed | None, ethertype: int | None, info: FrameInfo | None
    ) -> Ending | None:
        """Stages of one node in event order; the upper layers go after the last receive."""
        stages = segment.stages
        items = visit.items
        received: _Placed | None = None  # the last netif_receive_skb: the frame reached the protocols
        first_rx = True
        upper_done = False
        ending: Ending | None = None
        for position, item in enumerate(items):
            key = item.event.key
            if item.node is None:
                stages.append(_traced(key, item, _raw_fields(item.event)))
                continue
            if key in tracefs.TERMINAL_EVENTS:
                if item is not terminal:  # freed after a copy went on (the VM relay's new skb)
                    fate, detail = _CONSUMERS.get(item.event.function or "", ("consumed", "freed"))
                    stages.append(_traced("relay" if fate == "relayed" else "freed", item, detail))
                    continue
                stopped_at = None
                if received is not None and not upper_done:
                    stopped_at = self._upper(stages, received, None, item, ethertype, info)
                    upper_done = True
                ending = self._terminal_ending(item, stopped_at, info)
                continue
            if item.kind == "rx":
                if received is not None and not upper_done:
                    bridge = self.k.bridge_of.get((received.node or "", received.device or ""))
                    if bridge is not None and item.device == bridge:
                        detail = f"{bridge}: up to the stack (br_pass_frame_up)"
                        stages.append(Stage("bridge", item.node, received.device, "inferred", detail))
                        upper_done = True
                counters = self.k.link_moved(item.node, item.device, ("rx_packets", "rx_dropped")) if first_rx else {}
                first_rx = False
                stages.extend(self._rx_stages(item, items[position + 1 :], counters))
                if key == "net:netif_receive_skb":
                    received = item
                    upper_done = False
                continue
            if item.kind == "tx":
                if received is not None and not upper_done:
                    self._upper(stages, received, item, None, ethertype, info)
                    upper_done = True
                stages.append(self._tx_stage(item))
                continue
            stages.append(self._other_stage(item))
        if received is not None and not upper_done:
            self._upper(stages, received, None, None, ethertype, info)
        return ending

    def _rx_stages(self, item: _Placed, later: Sequence[_Placed], counters: dict[str, int]) -> list[Stage]:
        key = item.event.key
        node, device = item.node, item.device
        if key == "net:netif_rx":
            stages = [_traced("netif_rx", item, counters=counters)]
            receive = next((x for x in later if x.event.key == "net:netif_receive_skb"), None)
            stages.append(self._backlog(item, receive))
            return stages
        if key == "net:napi_gro_receive_entry":
            return [_traced("napi_gro_receive", item, f"GRO, NAPI on cpu{item.event.cpu}", counters)]
        if key == "net:netif_receive_skb":
            if counters:
                return [_traced("netif_receive_skb", item, counters=counters)]
            return [_traced("netif_receive_skb", item)]
        name = item.event.name
        return [Stage(name, node, device, "traced", "", key, item.event.timestamp, item.event.cpu, item.event.pid)]

    def _backlog(self, rx: _Placed, receive: _Placed | None) -> Stage:
        """enqueue_to_backlog: which CPU's input_pkt_queue (RPS may pick another one)."""
        node, device = rx.node or "", rx.device or ""
        cpu = receive.event.cpu if receive is not None else None
        if cpu is None:  # dropped at the enqueue: softnet says which CPU's queue overflowed
            full = [c for c, cols in self.k.softnet.items() if cols.get("dropped")]
            cpu = int(full[0]) if len(full) == 1 else None
        rps = self.k.rps.get((node, device))
        detail = f"cpu{cpu}" if cpu is not None else "cpu ?"
        if rps and cpu is not None and cpu != rx.event.cpu:
            detail += f", RPS from cpu{rx.event.cpu} (rps_cpus {rps})"
        elif rps:
            detail += f" (rps_cpus {rps})"
        columns = ("processed", "dropped", "received_rps", "time_squeeze")
        moved = {}
        if cpu is not None:
            moved = {f"softnet.cpu{cpu}.{c}": v for c in columns if (v := self.k.softnet.get(str(cpu), {}).get(c))}
        evidence: Evidence = "traced" if receive is not None else ("counted" if moved else "inferred")
        return Stage("backlog", rx.node, rx.device, evidence, detail, None, None, cpu, None, moved)

    def _tx_stage(self, item: _Placed) -> Stage:
        key = item.event.key
        if key == "net:net_dev_queue":
            moved = self.k.link_moved(item.node, item.device, ("tx_packets", "tx_dropped"))
            moved.update(self.k.link_moved(item.node, item.device, ("qdisc.drops",)))
            return _traced("dev_queue_xmit", item, counters=moved)
        if key == "net:net_dev_start_xmit":
            return _traced("driver xmit", item)
        if key == "net:net_dev_xmit":
            rc = item.event.fields.get("rc", 0)
            return _traced("tx done", item, "" if rc == 0 else f"rc={rc}")
        return _traced(item.event.key.replace("qdisc:qdisc_", "qdisc "), item)

    def _other_stage(self, item: _Placed) -> Stage:
        key = item.event.key
        if key == "skb:skb_copy_datagram_iovec":
            on_tap = (item.node, item.device) in self.k.tap_ends
            return _traced("copied to user", item, "the VM relay reads the tap" if on_tap else "recvmsg")
        if key == "bridge:br_fdb_update":
            return _traced("bridge fdb update", item, _raw_fields(item.event))
        return _traced(key, item, _raw_fields(item.event))

    # -- above the device layer

    def _upper(
        self,
        stages: list[Stage],
        received: _Placed,
        next_tx: _Placed | None,
        terminal: _Placed | None,
        ethertype: int | None,
        info: FrameInfo | None,
    ) -> str | None:
        """Stages between netif_receive_skb and the next transmit or the free, on one node.

        Returns the name of the stage a drop happened at, when these stages
        could say it (``LOCAL_IN`` for an INPUT DROP, ``UDP`` for NO_SOCKET).
        """
        node = received.node or ""
        device = received.device or ""
        drop = terminal if terminal is not None and terminal.event.key == "skb:kfree_skb" else None
        end_stage = _drop_stage(drop.event.reason, drop.event.function) if drop else None
        bridge = self.k.bridge_of.get((node, device))
        if bridge is not None:
            where = f"forward → {next_tx.device}" if next_tx is not None else "up to the bridge device"
            stages.append(Stage("bridge", node, device, "inferred", f"{bridge}: {where}"))
            return None
        taps = self.k.tap_count(node, device, ethertype)
        if taps:
            noun = "socket" if taps == 1 else "sockets"
            stages.append(Stage("AF_PACKET tap", node, device, "inferred", f"{taps} packet {noun} on {device}"))
        if ethertype == ETH_P_ARP:
            stages.append(Stage("ARP", node, device, "inferred", "arp_rcv"))
            return None
        if ethertype not in (ETH_P_IP, None):
            return None
        return _Upper(self, stages, node, device, received, next_tx, terminal, end_stage, info).run()

    # -- endings

    def _terminal_ending(self, item: _Placed, stopped_at: str | None, info: FrameInfo | None) -> Ending:
        event = item.event
        node = item.node
        if event.key == "skb:kfree_skb":
            reason = event.reason or str(event.fields.get("reason", "?"))
            return Ending(
                "dropped",
                node,
                item.device,
                stopped_at or _drop_stage(reason, event.function),
                reason,
                event.location,
                event.function,
                counters=self._reason_counters(node, item.device, reason, info),
            )
        function = event.function or ""
        fate, detail = _CONSUMERS.get(function, ("consumed", f"freed by {function or '?'}"))
        return Ending(fate, node, item.device, stopped_at, None, event.location, function, detail)

    def _reason_counters(
        self, node: str | None, device: str | None, reason: str, info: FrameInfo | None
    ) -> dict[str, int]:
        moved = self.k.moved(node, _REASON_COUNTERS.get(reason, ()))
        if reason == "CPU_BACKLOG":
            for cpu, cols in self.k.softnet.items():
                if cols.get("dropped"):
                    moved[f"softnet.cpu{cpu}.dropped"] = cols["dropped"]
            moved.update(self.k.link_moved(node, device, ("rx_dropped",)))
        if reason in ("SOCKET_RCVBUFF", "SOCKET_FILTER") and node is not None:
            _, drops = self.k.queued_on(node, info.dport if info else None)
            if drops:
                moved["socket.drops"] = drops
        if reason == "QDISC_DROP":
            moved.update(self.k.link_moved(node, device, ("tx_dropped", "qdisc.drops")))
        if reason == "NETFILTER_DROP" and node is not None:
            for rule in self.k.rules.get(node, {}).values():
                if rule.packets > 0 and rule.target in ("DROP", "REJECT"):
                    moved[rule.key] = rule.packets
        return moved

    def _open_ending(self, visits: list[_Visit], terminal: _Placed | None, info: FrameInfo | None) -> Ending:
        """No free was traced: say what the evidence allows (queued in a socket, merged, relayed)."""
        items = [item for visit in visits for item in visit.items]
        last = items[-1] if items else None
        node = last.node if last else None
        device = last.device if last else None
        if last is not None and last.event.key == "net:napi_gro_receive_entry":
            return Ending(
                "merged",
                node,
                device,
                "napi_gro_receive",
                detail="merged by GRO (its free is not traced)",
                evidence="inferred",
            )
        if last is not None and last.kind == "tx" and (node, device) in self.k.tap_ends:
            return Ending(
                "relayed", node, device, "tap", detail="queued on the tap for the VM relay", evidence="inferred"
            )
        if info is not None and info.protocol == 17 and node is not None:
            waiting, _ = self.k.queued_on(node, info.dport)
            read = self.k.delta(node, "Udp.InDatagrams")
            if read and not waiting:
                return Ending(
                    "delivered",
                    node,
                    device,
                    "socket",
                    detail="read by the application (recvmsg counts Udp InDatagrams);"
                    " its free is deferred (skb_attempt_defer_free) and was not traced",
                    counters={"Udp.InDatagrams": read},
                    evidence="counted",
                )
            if waiting:
                return Ending(
                    "queued",
                    node,
                    device,
                    "socket",
                    detail=f"waiting in the receive queue of udp port {info.dport} ({waiting} bytes queued)",
                    counters={"socket.rx_queue_bytes": waiting},
                    evidence="counted",
                )
        return Ending(
            "unknown", node, device, None, detail="no free was traced before the trace ended", evidence="inferred"
        )


class _Upper:
    """The IPv4 stages on one node after netif_receive_skb: what the evidence allows, no more."""

    def __init__(
        self,
        builder: PathBuilder,
        stages: list[Stage],
        node: str,
        device: str,
        received: _Placed,
        next_tx: _Placed | None,
        terminal: _Placed | None,
        end_stage: str | None,
        info: FrameInfo | None,
    ) -> None:
        self.b = builder
        self.k = builder.k
        self.stages = stages
        self.node = node
        self.device = device
        self.received = received
        self.next_tx = next_tx
        self.terminal = terminal
        self.end_stage = end_stage
        self.info = info
        drop = terminal if terminal is not None and terminal.event.key == "skb:kfree_skb" else None
        self.reason = drop.event.reason if drop else None
        self.function = drop.event.function if drop else None
        consume = terminal if terminal is not None and terminal.event.key == "skb:consume_skb" else None
        self.consumed_by = consume.event.function if consume else None

    def add(self, name: str, evidence: Evidence, detail: str = "", counters: dict[str, int] | None = None) -> None:
        self.stages.append(Stage(name, self.node, self.device, evidence, detail, counters=counters or {}))

    def run(self) -> str | None:
        """Add the stages; returns the stage a drop stopped the packet at, when it is one of them."""
        ip_moved = self.k.moved(self.node, _STAGE_COUNTERS["ip_rcv"])
        ip_evidence: Evidence = "traced" if self.end_stage == "ip_rcv" else ("counted" if ip_moved else "inferred")
        self.add("ip_rcv", ip_evidence, counters=ip_moved)
        if self.end_stage == "ip_rcv":
            return "ip_rcv"
        nf_hook = self._netfilter_hook() if self.end_stage == "netfilter" else None
        self.hook("PREROUTING")
        if nf_hook == "PREROUTING":
            return nf_hook
        if self.end_stage == "netfilter" and nf_hook is None:
            self.add("netfilter", "traced", "hook not identified: no DROP rule or policy counted")
            return "netfilter"
        route = self._route(nf_hook)
        if route is None:
            return None
        self._routing(route)
        if route == "error":
            return "routing"
        if route == "local":
            self.hook("LOCAL_IN")
            if nf_hook == "LOCAL_IN":
                return nf_hook
            return self._transport()
        self.hook("FORWARD")
        if nf_hook == "FORWARD":
            return nf_hook
        self.hook("POSTROUTING")
        return "POSTROUTING" if nf_hook == "POSTROUTING" else None

    def hook(self, hook: str) -> None:
        """A netfilter hook: counted when a rule or policy of that hook moved, inferred otherwise."""
        if not self.b.rules_known:
            self.add(hook, "inferred")
            return
        rules = self.k.hook_rules(self.node, hook)
        moved = [r for r in rules if r.packets > 0]
        if moved:
            detail = "; ".join(rule_words(r) for r in moved)
            self.add(hook, "counted", detail, {r.key: r.packets for r in moved})
        else:
            self.add(hook, "inferred", "no rule counted it" if rules else "no iptables rules")

    def _netfilter_hook(self) -> str | None:
        """The hook whose DROP (rule, REJECT or policy) counted packets during the trace."""
        order = ["PREROUTING", "LOCAL_IN", "FORWARD", "POSTROUTING"]
        found = set()
        for rule in self.k.rules.get(self.node, {}).values():
            if rule.packets > 0 and rule.target in ("DROP", "REJECT"):
                hook = _hook_of(rule, self.k.rules.get(self.node, {}))
                if hook is not None:
                    found.add(hook)
        return next((hook for hook in order if hook in found), None)

    def _route(self, nf_hook: str | None) -> str | None:
        if self.end_stage == "routing":
            return "error"
        if nf_hook == "LOCAL_IN":
            return "local"
        if nf_hook in ("FORWARD", "POSTROUTING"):
            return "forward"
        if self.next_tx is not None:
            return "forward"
        if self.end_stage in ("L4", "socket") or self.function in _LOCAL_FUNCTIONS:
            return "local"
        if self.consumed_by in _CONSUMERS or self.consumed_by in _LOCAL_FUNCTIONS:
            return "local"
        if self.terminal is None:
            if self.k.delta(self.node, "Ip.InDelivers"):
                return "local"
            if self.k.delta(self.node, "Ip.ForwDatagrams"):
                return "forward"
        return None

    def _routing(self, route: str) -> None:
        fib = self._fib()
        moved = self.k.moved(self.node, _STAGE_COUNTERS[f"routing:{route}"])
        if route == "error":
            detail = {
                "IP_INADDRERRORS": "not local, and forwarding is off (ip_error)",
                "IP_INNOROUTES": "no route (ip_error)",
                "IP_RPFILTER": "reverse-path filter (rp_filter)",
            }.get(self.reason or "", f"refused ({self.function})")
            self.add("routing", "traced", detail, moved)
            return
        detail = "local" if route == "local" else f"forward → {self.next_tx.device if self.next_tx else '?'}"
        if fib is not None:
            self.add("routing", "traced", detail, moved)
            self.stages[-1].note = f"fib_table_lookup table {fib.fields.get('tb_id')} → dev {fib.fields.get('name')}"
        else:
            self.add("routing", "counted" if moved else "inferred", detail, moved)

    def _fib(self) -> Any:
        start = self.received.event.timestamp
        later = [x for x in (self.next_tx, self.terminal) if x is not None]
        end = later[0].event.timestamp if later else start + 0.001
        index = self.k.ifindex.get(self.node, {}).get(self.device)
        return self.k.fib_between(start, end, self.received.event.cpu, index, self.info)

    def _transport(self) -> str | None:
        protocol = self.info.protocol if self.info is not None else _protocol_from(self.function or self.consumed_by)
        name = IP_PROTOCOLS.get(protocol or -1)
        if name is None:
            if self.end_stage == "L4":
                self.add(self.function or "L4", "traced")
                return self.function
            return None
        moved = self.k.moved(self.node, _STAGE_COUNTERS[name])
        evidence: Evidence = "traced" if self.end_stage == "L4" else ("counted" if moved else "inferred")
        self.add(name, evidence, counters=moved)
        if self.end_stage == "L4":
            return name
        if name != "UDP":
            return None
        dport = self.info.dport if self.info is not None else None
        where = f"udp port {dport}" if dport else ""
        if self.end_stage == "socket":
            _, drops = self.k.queued_on(self.node, dport)
            moved = self.k.moved(self.node, _STAGE_COUNTERS["socket"])
            if drops:
                moved["socket.drops"] = drops
            self.add("socket", "traced", where, moved)
            return "socket"
        if self.consumed_by in _CONSUMERS and _CONSUMERS[self.consumed_by][0] == "delivered":
            self.add("socket", "traced", where)
        elif self.terminal is None:
            waiting, _ = self.k.queued_on(self.node, dport)
            read = self.k.delta(self.node, "Udp.InDatagrams")
            if waiting:
                self.add("socket", "counted", where, {"socket.rx_queue_bytes": waiting})
            elif read:
                self.add("socket", "counted", where, {"Udp.InDatagrams": read})
        return None


def _protocol_from(function: str | None) -> int | None:
    if not function:
        return None
    for prefix, proto in (("udp", 17), ("__udp", 17), ("tcp", 6), ("icmp", 1)):
        if function.startswith(prefix):
            return proto
    return None


def _first_int(events: Sequence[TraceEvent], name: str) -> int | None:
    for event in events:
        value = event.fields.get(name)
        if isinstance(value, int):
            return value
    return None


def _raw_fields(event: TraceEvent) -> str:
    """An event as the kernel's fields, for events this module cannot name or place."""
    keep = {k: v for k, v in event.fields.items() if k != "skbaddr"}
    return " ".join(f"{k}={v}" for k, v in keep.items())


# --------------------------------------------------------------------------- tracing an injection


def _events_for(count: int) -> tuple[str, ...]:
    return RICH_EVENTS if count <= BULK else LEAN_EVENTS


def _buffer_kb(count: int, events: Sequence[str]) -> int:
    """Per-CPU ring size: room for our packets plus whatever else the host does meanwhile."""
    if count <= BULK:
        return 2048
    per_packet = BYTES_PER_PACKET * (1 if len(events) <= len(LEAN_EVENTS) else 3)
    return min(MAX_BUFFER_KB, count * per_packet // 1024 + tracefs.DEFAULT_BUFFER_KB)


@contextlib.contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """Run the body on ``cpu`` (sched_setaffinity(0) is per thread), e.g. to make RPS cross CPUs."""
    if cpu is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


class _Settler:
    """Decides, from the events read so far, when the injected skbs have finished moving."""

    def __init__(self, tid: int, ifname: str, length: int, count: int) -> None:
        self.tid, self.ifname, self.length, self.count = tid, ifname, length, count
        self.open: dict[int, float] = {}
        self.seen = 0
        self.last_ours = time.monotonic()

    def feed(self, events: Iterable[TraceEvent]) -> None:
        for event in events:
            addr = event.skbaddr
            ours = event.pid == self.tid
            if _is_injection(event, self.tid, self.ifname, self.length) and self.seen < self.count and addr:
                self.open[addr] = event.timestamp
                self.seen += 1
            elif addr is not None and addr in self.open:
                ours = True
                self.open[addr] = event.timestamp
                if event.key in tracefs.TERMINAL_EVENTS:
                    del self.open[addr]
            if ours:
                self.last_ours = time.monotonic()

    def settled(self) -> bool:
        now = time.monotonic()
        if self.seen < self.count or now - self.last_ours < QUIET:
            return False
        return all(now - last > IDLE for last in self.open.values())


def _is_injection(event: TraceEvent, tid: int, ifname: str, length: int) -> bool:
    """The first event of an injected skb: our thread queues it on the injecting device, in its own call.

    Skbs our softirqs send meanwhile (an ARP reply of 42 bytes, like a bare UDP
    frame) carry our thread id too; they run in softirq context, sendmsg does not.
    """
    return (
        event.key == "net:net_dev_queue"
        and event.pid == tid
        and not event.in_interrupt
        and event.device == ifname
        and event.fields.get("len") == length
    )


def trace_packet(
    topo: Topology,
    node: str,
    expr: str,
    *,
    interface: str | None = None,
    count: int = 1,
    cpu: int | None = None,
    settle: float = 0.5,
    events: Sequence[str] | None = None,
) -> TraceResult:
    """Inject ``expr`` ``count`` times from ``node`` and explain where each skb went.

    The frame is completed from the lab exactly as ``labctl inject`` does it
    (:func:`labctl.lab.traffic.prepare_injection`).  ``cpu`` pins the
    injecting thread (RPS experiments); ``settle`` bounds the wait for the
    kernel to finish (a single packet usually settles in a few ms).  The
    private tracefs instance is removed before this returns or raises,
    including on KeyboardInterrupt.
    """
    prepared = prepare_injection(topo, node, interface, expr)
    return trace_frame(topo, node, prepared, expr, count=count, cpu=cpu, settle=settle, events=events)


def trace_frame(
    topo: Topology,
    node: str,
    prepared: PreparedFrame,
    expr: str = "",
    *,
    count: int = 1,
    cpu: int | None = None,
    settle: float = 0.5,
    events: Sequence[str] | None = None,
) -> TraceResult:
    """:func:`trace_packet` for a frame already prepared (the verification labs build their own)."""
    started = time.monotonic()
    info = FrameInfo.parse(prepared.frame)
    result = TraceResult(topo.name, node, prepared.ifname, expr, prepared.summary, len(prepared.frame), count)
    knowledge = Knowledge(topo)
    knowledge.read_interfaces()
    knowledge.read_sockets(after=False)
    namespaces = list(knowledge.namespaces.values())
    rules_before = read_rules(knowledge)
    before = counters.Snapshot.take(namespaces)
    tid = threading.get_native_id()
    wanted = tuple(events) if events is not None else _events_for(count)
    collected: list[TraceEvent] = []
    with (
        TraceSession(wanted, buffer_kb=_buffer_kb(count, wanted)) as session,
        _pinned(cpu),
        Injector(prepared.namespace, prepared.ifname) as injector,
    ):
        result.events_enabled, result.events_skipped = list(session.enabled), dict(session.skipped)
        settler = _Settler(tid, prepared.ifname, len(prepared.frame), count)
        since = time.monotonic()
        result.sent = injector.send(prepared.frame, count)
        result.inject_seconds = time.monotonic() - since
        result.send_errors = dict(injector.errors)
        settler.count = result.sent
        deadline = time.monotonic() + settle
        if count <= BULK:
            while True:
                fresh = session.events()
                collected.extend(fresh)
                settler.feed(fresh)
                if settler.settled():
                    result.settled = True
                    break
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.003)
        else:
            time.sleep(min(settle, 0.2))
            result.settled = True
        session.stop()
        collected.extend(session.events())
        result.lost_events = session.lost_events()
    after = counters.Snapshot.take(namespaces)
    rules_after = read_rules(knowledge)
    knowledge.read_sockets(after=True)
    delta = counters.delta(before, after)
    knowledge.deltas = _flatten(delta, knowledge)
    knowledge.softnet = {str(cpu_id): cols for cpu_id, cols in delta.get("softnet", {}).items()}
    knowledge.rules = rule_deltas(rules_before, rules_after)
    knowledge.rules_known = True
    knowledge.set_fib(collected)
    result.counters = knowledge.deltas
    result.softnet = {
        cpu_id: {k: v for k, v in cols.items() if isinstance(v, int)} for cpu_id, cols in knowledge.softnet.items()
    }
    result.rules = {
        node_name: {key: r for key, r in rows.items() if r.packets}
        for node_name, rows in knowledge.rules.items()
        if any(r.packets for r in rows.values())
    }
    result.packets, result.related = explain(collected, knowledge, prepared, info, tid, since, result.sent)
    result.elapsed_seconds = time.monotonic() - started
    return result


def explain(
    events: Iterable[TraceEvent],
    knowledge: Knowledge,
    prepared: PreparedFrame,
    info: FrameInfo,
    tid: int,
    since: float,
    count: int,
) -> tuple[list[PacketPath], list[PacketPath]]:
    """(the injected skbs' paths, the related skbs' paths) from a window of events."""
    node = next(n for n, ns in knowledge.namespaces.items() if ns == prepared.namespace)
    ordered = sorted(events, key=lambda e: e.timestamp)  # stable: the stream's own order within a µs
    chains = tracefs.all_chains(ordered, knowledge.lab_devices, since=since - 0.001)
    injected: list[SkbChain] = []
    related: list[SkbChain] = []
    for chain in chains:
        first = chain.events[0]
        if len(injected) < count and _is_injection(first, tid, prepared.ifname, info.length):
            injected.append(chain)
        elif chain.on_lab and first.pid == tid and first.device is not None:
            related.append(chain)
    placer = Placer(knowledge)
    builder = PathBuilder(knowledge, rules_known=knowledge.rules_known)
    timeline = Timeline({id(event): position for position, event in enumerate(ordered)})
    paths: list[PacketPath] = []
    claimed: set[int] = set()
    for index, chain in enumerate(injected):
        placed, hops = placer.place(chain.events, start=(node, prepared.ifname))
        chain = _through_relays(chain, placed, hops, chains, placer, knowledge, info, claimed)
        timeline.add(placed)
        paths.append(builder.build(chain, placed, hops, index=index, role="injected", info=info))
    others: list[PacketPath] = []
    for chain in related:
        if len(others) >= MAX_RELATED:
            break
        # born from one of our skbs: right after a placed event of ours, on that CPU, in that task,
        # on a device of that node.  Our softirq also runs other namespaces' packets (the host's
        # eth0, other labs); what they give birth to is not ours, whatever its device is called.
        first = chain.events[0]
        cause = timeline.node_before(first)
        if cause is None or first.device not in knowledge.devices.get(cause, ()):
            continue
        placed, hops = placer.place(chain.events, hints=[timeline.node_before])
        timeline.add(placed)
        others.append(builder.build(chain, placed, hops, index=len(others), role="related"))
    return paths, others


MAX_RELATED = 200
MAX_RELAYS = 8


def _through_relays(
    chain: SkbChain,
    placed: list[_Placed],
    hops: list[tuple[tuple[str, str], tuple[str, str]]],
    chains: Sequence[SkbChain],
    placer: Placer,
    knowledge: Knowledge,
    info: FrameInfo,
    claimed: set[int],
) -> SkbChain:
    """Follow a frame across VM relays: the relay reads it from one tap and writes a new skb on the other.

    The new skb is the relay's first receive on the far end of the tap link,
    after the old one was read, with the same frame length; ``placed`` and
    ``hops`` are extended in place and the returned chain holds every event.
    """
    events = list(chain.events)
    for _ in range(MAX_RELAYS):
        last = placed[-1] if placed else None
        if last is None or last.node is None or last.device is None:
            break
        # only a frame the relay read from the tap goes on; a drop or a delivery is the end
        read = last.event.key == "skb:consume_skb" and _CONSUMERS.get(last.event.function or "", ("",))[0] == "relayed"
        end = (last.node, last.device)
        if not read or end not in knowledge.tap_ends or end not in knowledge.far:
            break
        far = knowledge.far[end]
        follow = next(
            (
                c
                for c in chains
                if id(c) not in claimed
                and c.start >= last.event.timestamp
                and c.events[0].pid == last.event.pid  # the relay that read it writes it
                and c.events[0].pid in knowledge.relays
                and c.events[0].key in RX_EVENTS
                and c.events[0].device == far[1]
                and c.events[0].fields.get("len") == info.length - 14
            ),
            None,
        )
        if follow is None:
            break
        claimed.add(id(follow))
        more, more_hops = placer.place(follow.events, start=far)
        hops.append((end, far))
        hops.extend(more_hops)
        placed.extend(more)
        events.extend(follow.events)
    return SkbChain(chain.skbaddr, events, on_lab=chain.on_lab)


# --------------------------------------------------------------------------- following a lab live


LAB_TASK_TTL = 60.0
OTHER_TASK_TTL = 1.0
FOREIGN = "<foreign>"
"""Verdict for a task that works for another namespace (lives in one, or holds only its sockets)."""
UNKNOWN = "<unknown>"
"""Verdict for a user task of labctl's own namespace holding no socket now (``labctl inject`` after sending)."""
KERNEL = "<kernel>"
"""Verdict for the idle task, kernel threads and tasks already gone: they run everyone's softirqs."""


class TaskMap:
    """Which lab node a task (thread id) works for, from its namespace or the sockets it holds.

    Used by ``--follow``, where the traffic is not ours: an skb on a device
    name that other namespaces also have (every host has an eth0) is the lab's
    when the task that started it lives in a lab namespace, holds a socket of
    one (asked of the socket itself: pidfd_getfd + SIOCGSKNS), or is the lab's
    VM relay.  A task holding a socket of any other namespace but labctl's own
    is :data:`FOREIGN`.  ``labctl inject`` runs in labctl's namespace and holds
    its lab socket for about a millisecond, so a task of that namespace with no
    other evidence is :data:`UNKNOWN`: its skb is shown if it crossed a lab
    link (a transmit, then a receive on the far end's name) -- which a short-
    lived injector into *another* lab with the same names would also do.
    """

    def __init__(self, knowledge: Knowledge) -> None:
        self.k = knowledge
        self.inodes: dict[int, str] = {}
        for node, ns in knowledge.namespaces.items():
            with contextlib.suppress(OSError):
                self.inodes[os.stat(netns.path(ns)).st_ino] = node
        self.relays = dict(knowledge.relays)
        self._cache: dict[int, tuple[float, str]] = {}
        self._sockets: dict[int, str] = {}
        self._sockets_at = 0.0
        # labctl's own namespace (the host's, normally; /proc/1 may not be readable in a container)
        self._root = os.stat("/proc/self/ns/net").st_ino

    def _socket_inodes(self, max_age: float = 1.0) -> dict[int, str]:
        """Socket inode → node, for every socket of the lab's namespaces (re-read when older than max_age)."""
        if time.monotonic() - self._sockets_at > max_age:
            found: dict[int, str] = {}
            for node, ns in self.k.namespaces.items():
                for table in ("packet", "udp", "tcp", "raw", "icmp"):
                    with contextlib.suppress(OSError, netns.NamespaceError):
                        for line in _read_in(ns, f"/proc/net/{table}").splitlines()[1:]:
                            parts = line.split()
                            column = 8 if table == "packet" else 9
                            if len(parts) > column and parts[column].isdigit():
                                found[int(parts[column])] = node
            self._sockets, self._sockets_at = found, time.monotonic()
        return self._sockets

    def verdict(self, tid: int) -> str:
        """A lab node's name, or :data:`FOREIGN`, :data:`UNKNOWN` or :data:`KERNEL`.

        Kept for a minute when it names a node (a ping that exited has still
        sent what the trace shows later), a second otherwise (a task may enter
        a lab namespace or open a socket in one).  Callers ask as soon as a
        task's events are read, while it still exists.
        """
        if tid <= 0:
            return KERNEL
        cached = self._cache.get(tid)
        if cached is not None:
            lab_task = cached[1] not in (FOREIGN, UNKNOWN, KERNEL)
            if time.monotonic() - cached[0] < (LAB_TASK_TTL if lab_task else OTHER_TASK_TTL):
                return cached[1]
        answer = self._classify(tid)
        self._cache[tid] = (time.monotonic(), answer)
        return answer

    def node_of(self, tid: int) -> str | None:
        """The lab node the task works for, or None."""
        answer = self.verdict(tid)
        return None if answer in (FOREIGN, UNKNOWN, KERNEL) else answer

    def _classify(self, tid: int) -> str:
        if tid in self.relays:
            return self.relays[tid]
        try:
            inode = os.stat(f"/proc/{tid}/ns/net").st_ino
            os.readlink(f"/proc/{tid}/exe")  # kernel threads have no executable
        except OSError:
            return KERNEL
        if inode in self.inodes:
            return self.inodes[inode]
        held: dict[int, int] = {}  # fd → socket inode
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{tid}/fd"):
                with contextlib.suppress(OSError, ValueError):
                    target = os.readlink(f"/proc/{tid}/fd/{fd}")
                    if target.startswith("socket:["):
                        held[int(fd)] = int(target[8:-1])
        if not held:
            return UNKNOWN if inode == self._root else FOREIGN
        namespaces = socket_namespaces(tid, list(held))
        if namespaces is None:  # no pidfd_getfd here: look the sockets up in the lab's tables
            sockets = self._socket_inodes()
            if not set(held.values()) & sockets.keys():  # a socket opened since the last look
                sockets = self._socket_inodes(max_age=0.02)
            node = next((sockets[i] for i in held.values() if i in sockets), None)
            return node if node is not None else FOREIGN
        node = next((self.inodes[ns] for ns in namespaces if ns in self.inodes), None)
        if node is not None:
            return node
        if any(ns != self._root for ns in namespaces):  # works in another lab or container
            return FOREIGN
        return UNKNOWN if inode == self._root else FOREIGN


_SYS_PIDFD_GETFD = 438
SIOCGSKNS = 0x894C
"""ioctl on a socket: a new fd of the network namespace the socket belongs to."""


def socket_namespaces(tid: int, fds: Sequence[int]) -> list[int] | None:
    """Inodes of the network namespaces of another task's socket fds (None: this kernel cannot say).

    Each fd is duplicated with pidfd_getfd(2) and asked its namespace with
    SIOCGSKNS: exact, and immune to the socket's namespace having the same
    device names as the lab's.  Sockets closed meanwhile are skipped.
    """
    import ctypes
    import fcntl

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with open(f"/proc/{tid}/status") as f:
            tgid = int(next(line.split()[1] for line in f if line.startswith("Tgid:")))
        pidfd = os.pidfd_open(tgid)
    except (OSError, StopIteration, ValueError):
        return []
    inodes: list[int] = []
    try:
        for fd in fds:
            local = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if local < 0:
                if ctypes.get_errno() in (38, 1):  # ENOSYS, EPERM: not available to us
                    return None
                continue
            try:
                ns_fd = fcntl.ioctl(local, SIOCGSKNS)
                try:
                    inodes.append(os.fstat(ns_fd).st_ino)
                finally:
                    os.close(ns_fd)
            except OSError:
                pass
            finally:
                os.close(local)
    finally:
        os.close(pidfd)
    return inodes


def foreign_device_names(knowledge: Knowledge) -> set[str]:
    """Device names that exist in namespaces other than the lab's (the root's, other labs', containers')."""
    lab_inodes = set()
    for ns in knowledge.namespaces.values():
        with contextlib.suppress(OSError):
            lab_inodes.add(os.stat(netns.path(ns)).st_ino)
    names: set[str] = set()
    seen: set[int] = set(lab_inodes)
    for name in netns.list_all():
        with contextlib.suppress(OSError):
            inode = os.stat(netns.path(name)).st_ino
            if inode in seen:
                continue
            seen.add(inode)
            with contextlib.suppress(netns.NamespaceError, OSError):
                names |= _dev_names(_read_in(name, "/proc/net/dev"))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
            if inode in seen:
                continue
            seen.add(inode)
            with open(f"/proc/{entry}/net/dev") as f:
                names |= _dev_names(f.read())
    return names


def _dev_names(text: str) -> set[str]:
    return {line.split(":", 1)[0].strip() for line in text.splitlines()[2:] if ":" in line}


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
            "rules": {
                node: {key: {"rule": r.rule, "packets": r.packets} for key, r in rows.items()}
                for node, rows in self.rules.items()
            },
        }


class Follower:
    """Every lab skb as it completes, until stopped: ``with Follower(topo) as f: for p in f.paths(): ...``.

    Per-packet counters cannot be told apart while traffic flows, so stages
    here are traced or inferred; the counter deltas of the whole run are in
    :meth:`summary` once the follower has stopped.  Events are parsed in
    Python (some 100-200k events/s): a flood makes a live view fall behind, and once
    the ring buffer is full the kernel drops events (``summary().lost_events``).

    ``labctl trace LAB --follow --json`` writes JSON lines: one
    ``{"type": "packet", ...}`` per skb with the fields of
    :meth:`PacketPath.as_dict` (role ``observed``), then one
    ``{"type": "summary", ...}`` (:meth:`FollowSummary.as_dict`).
    """

    def __init__(self, topo: Topology, *, idle: float = 1.0, events: Sequence[str] = RICH_EVENTS) -> None:
        self.topo = topo
        self.idle = idle
        self.k = Knowledge(topo)
        self.session = TraceSession(events)
        self._summary = FollowSummary()
        self._started = 0.0
        self._before: counters.Snapshot | None = None
        self._rules_before: dict[str, dict[str, iptables.RuleCounter]] = {}
        self._index = 0
        self._builder = ChainBuilder(self.k.lab_devices)
        self._order: dict[int, int] = {}
        """id(event) → stream position, for the events of open chains."""
        self._timeline = Timeline(self._order)
        self._recent_fib: list[TraceEvent] = []
        self._position = 0
        self._ready: list[SkbChain] = []

    def __enter__(self) -> Follower:
        self.k.read_interfaces()
        self.k.read_sockets(after=False)
        self._rules_before = read_rules(self.k)
        self._before = counters.Snapshot.take(list(self.k.namespaces.values()))
        self.tasks = TaskMap(self.k)
        self._link_names = {(a[1], b[1]) for a, b in self.k.far.items()}
        self.foreign = foreign_device_names(self.k) & self.k.lab_devices
        self._started = time.monotonic()
        self.session.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop tracing (the instance is removed first), then read the closing counters."""
        if not self.session.running and self._before is None:
            return
        try:
            self.session.stop()
            self._summary.lost_events = self.session.lost_events()
        finally:
            if self._before is not None:
                before, self._before = self._before, None
                after = counters.Snapshot.take(list(self.k.namespaces.values()))
                delta = counters.delta(before, after)
                self._summary.counters = _flatten(delta, self.k)
                self._summary.softnet = {str(c): v for c, v in delta.get("softnet", {}).items()}
                rules = rule_deltas(self._rules_before, read_rules(self.k))
                self._summary.rules = {n: {k: r for k, r in rows.items() if r.packets} for n, rows in rules.items()}
                self._summary.rules = {n: rows for n, rows in self._summary.rules.items() if rows}
                self._summary.seconds = time.monotonic() - self._started

    def summary(self) -> FollowSummary:
        return self._summary

    def _ours(self, chain: SkbChain) -> bool:
        """Whether a chain seen on lab device names is the lab's (see :class:`TaskMap`)."""
        if not chain.on_lab:
            return False
        if not set(chain.devices) & self.foreign:
            return True
        answer = self.tasks.verdict(chain.events[0].pid)
        if answer == UNKNOWN:
            return self._crosses_a_link(chain)
        return answer not in (FOREIGN, KERNEL)

    def _crosses_a_link(self, chain: SkbChain) -> bool:
        """A transmit on one end of a lab link followed by a receive on the other end's name."""
        pending: str | None = None
        for event in chain.events:
            kind = _kind(event)
            if kind == "tx" and event.device is not None:
                pending = event.device
            elif kind == "rx" and pending is not None and (pending, event.device) in self._link_names:
                return True
        return False

    def _pump(self) -> None:
        """Read what the kernel has, feed the chain builder, queue the chains that completed."""
        done: list[SkbChain] = []
        seen_pids: set[int] = set()
        for event in self.session.events():
            if event.key == "fib:fib_table_lookup":
                self._recent_fib.append(event)
                continue
            if event.skbaddr is not None:
                self._position += 1
                self._order[id(event)] = self._position
                if event.pid not in seen_pids:  # classify now, while the task still exists
                    seen_pids.add(event.pid)
                    self.tasks.verdict(event.pid)
            done.extend(self._builder.add(event))
        done.extend(self._builder.idle(time.monotonic() - self.idle))
        self._recent_fib = self._recent_fib[-4000:]
        self._ready.extend(sorted(done, key=lambda c: c.start))

    def paths(self, stop: Callable[[], bool] | None = None, poll: float = 0.2) -> Iterator[PacketPath]:
        """Yield each lab skb's path as it is freed (or has been idle for ``idle`` seconds).

        Returns when ``stop()`` is true (checked every ``poll`` seconds) or the
        session stopped; a later call carries on where this one stopped (skbs
        half seen stay open).  Ctrl-C (KeyboardInterrupt) propagates to the
        caller, whose ``with`` block removes the instance.
        """
        placer = Placer(self.k)
        paths = PathBuilder(self.k, rules_known=False)

        def task_hint(event: TraceEvent) -> str | None:
            return self.tasks.node_of(event.pid)

        while True:
            if self.session.running:
                self._pump()
            self.k.set_fib(self._recent_fib)
            while self._ready:
                chain = self._ready.pop(0)
                try:
                    if not self._ours(chain):
                        if chain.on_lab:
                            self._summary.ambiguous += 1
                        continue
                    placed, hops = placer.place(chain.events, hints=[self._timeline.node_before, task_hint])
                    self._timeline.add(placed)
                    self._index += 1
                    self._summary.shown += 1
                    yield paths.build(chain, placed, hops, index=self._index, role="observed")
                finally:
                    for event in chain.events:
                        self._order.pop(id(event), None)
            self._timeline.forget(time.monotonic() - 10 * self.idle - 1)
            if not self.session.running or (stop is not None and stop()):
                return
            self.session.wait(poll)
