"""What the lab knows during a trace: devices, links, ifindexes, sockets, fib lookups and counter deltas."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any, NamedTuple

from labctl.kernel import counters, netns
from labctl.kernel.links import NodeLinks
from labctl.kernel.procnet import PacketSocket, UdpSocket, packet_sockets, udp_sockets
from labctl.kernel.tracefs import TraceEvent
from labctl.lab import relay
from labctl.lab.trace.frame import ETH_P_ALL, FrameInfo
from labctl.lab.trace.model import RuleDelta
from labctl.lab.trace.rules import hook_of
from labctl.topology.model import Topology


class FibQuestion(NamedTuple):
    """One question the path builder asked about a fib lookup, and the answer."""

    received: TraceEvent
    later: TraceEvent | None
    ifindex: int | None
    info: FrameInfo | None
    answer: TraceEvent | None


def fib_words(fib: TraceEvent | None) -> tuple[object, object] | None:
    """What a path says of a fib lookup (its table and device): two answers alike read alike."""
    return None if fib is None else (fib.fields.get("tb_id"), fib.fields.get("name"))


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
        self._moved: dict[tuple[str | None, tuple[str, ...]], dict[str, int]] = {}
        self._moved_of: dict[str, dict[str, int]] | None = None
        self.fib_log: list[FibQuestion] | None = None
        """When a list: every fib_after question and its answer (see :meth:`fib_after`)."""

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
        """The counters among ``keys`` that moved on ``node`` (a new dict: callers add to it).

        A burst asks the same questions for every packet; the answers are
        remembered (the deltas do not change once the window is read).
        """
        wanted = keys if isinstance(keys, tuple) else tuple(keys)
        memo = (node, wanted)
        found = self._moved.get(memo)
        if found is None or self._moved_of is not self.deltas:
            if self._moved_of is not self.deltas:  # new deltas (a follower reads them again)
                self._moved, self._moved_of = {}, self.deltas
            found = {key: value for key in wanted if (value := self.delta(node, key))}
            self._moved[memo] = found
        return dict(found)

    def link_moved(self, node: str | None, device: str | None, keys: Iterable[str]) -> dict[str, int]:
        return self.moved(node, tuple(f"{device}.{key}" for key in keys)) if device else {}

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

    def fib_after(
        self, received: TraceEvent, later: TraceEvent | None, index: int | None, info: FrameInfo | None
    ) -> TraceEvent | None:
        """The fib lookup of the packet ``received`` on its CPU, before its ``later`` event (or within 1 ms).

        Each answer is appended to :attr:`fib_log` when it is a list: a burst's grouped skbs
        (:mod:`.burst`) are asked the same questions with their own events' times.
        """
        start = received.timestamp
        end = later.timestamp if later is not None else start + 0.001
        found = self.fib_between(start, end, received.cpu, index, info)
        if self.fib_log is not None:
            self.fib_log.append(FibQuestion(received, later, index, info, found))
        return found

    def hook_rules(self, node: str, hook: str) -> list[RuleDelta]:
        return [r for r in self.rules.get(node, {}).values() if hook_of(r, self.rules.get(node, {})) == hook]


def counter_deltas(delta: dict[str, Any], knowledge: Knowledge) -> dict[str, dict[str, int]]:
    """Per node that moved: snmp names as they are, ``eth0.rx_packets`` links, ``eth0.qdisc.drops`` qdiscs."""
    return {
        node: flat
        for node, flat in counters.by_node(
            delta, {n: netns.namespace_name(knowledge.topo.name, n) for n in knowledge.topo.nodes}
        ).items()
        if flat
    }
