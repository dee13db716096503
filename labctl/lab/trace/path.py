"""One skb's placed events as segments of stages, in the notes' words, and an ending."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from labctl.kernel import tracefs
from labctl.kernel.tracefs import SkbChain, TraceEvent
from labctl.lab.trace.frame import ETH_P_ARP, ETH_P_IP, FrameInfo, ethertype_name
from labctl.lab.trace.knowledge import Knowledge
from labctl.lab.trace.model import Ending, Evidence, PacketPath, Segment, Stage
from labctl.lab.trace.placement import Placed
from labctl.lab.trace.upper import UpperLayers
from labctl.lab.trace.vocabulary import CONSUMERS, REASON_COUNTERS, drop_stage


def _traced(name: str, item: Placed, detail: str = "", counters: dict[str, int] | None = None) -> Stage:
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
    items: list[Placed] = field(default_factory=list)
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
        placed: list[Placed],
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
        kind = info.kind if info is not None else (ethertype_name(ethertype) if ethertype else "")
        return PacketPath(index, chain.skbaddr, role, segments, ending, kind, length, chain.events)

    # -- grouping

    @staticmethod
    def _visits(placed: list[Placed], hops: list[tuple[tuple[str, str], tuple[str, str]]]) -> list[_Visit]:
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
        self, visit: _Visit, segment: Segment, terminal: Placed | None, ethertype: int | None, info: FrameInfo | None
    ) -> Ending | None:
        """Stages of one node in event order; the upper layers go after the last receive."""
        stages = segment.stages
        items = visit.items
        received: Placed | None = None  # the last netif_receive_skb: the frame reached the protocols
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
                    fate, detail = CONSUMERS.get(item.event.function or "", ("consumed", "freed"))
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

    def _rx_stages(self, item: Placed, later: Sequence[Placed], counters: dict[str, int]) -> list[Stage]:
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

    def _backlog(self, rx: Placed, receive: Placed | None) -> Stage:
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

    def _tx_stage(self, item: Placed) -> Stage:
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

    def _other_stage(self, item: Placed) -> Stage:
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
        received: Placed,
        next_tx: Placed | None,
        terminal: Placed | None,
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
        end_stage = drop_stage(drop.event.reason, drop.event.function) if drop else None
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
        return UpperLayers(self, stages, node, device, received, next_tx, terminal, end_stage, info).run()

    # -- endings

    def _terminal_ending(self, item: Placed, stopped_at: str | None, info: FrameInfo | None) -> Ending:
        event = item.event
        node = item.node
        if event.key == "skb:kfree_skb":
            reason = event.reason or str(event.fields.get("reason", "?"))
            return Ending(
                "dropped",
                node,
                item.device,
                stopped_at or drop_stage(reason, event.function),
                reason,
                event.location,
                event.function,
                counters=self._reason_counters(node, item.device, reason, info),
            )
        function = event.function or ""
        fate, detail = CONSUMERS.get(function, ("consumed", f"freed by {function or '?'}"))
        return Ending(fate, node, item.device, stopped_at, None, event.location, function, detail)

    def _reason_counters(
        self, node: str | None, device: str | None, reason: str, info: FrameInfo | None
    ) -> dict[str, int]:
        moved = self.k.moved(node, REASON_COUNTERS.get(reason, ()))
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

    def _open_ending(self, visits: list[_Visit], terminal: Placed | None, info: FrameInfo | None) -> Ending:
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
