"""A check's recorded Evidence told as paths: the same placement and words ``labctl trace`` uses.

The Evidence is already attributed to the lab and holds each packet's events,
the counter deltas and the fib lookups, so no kernel is read here: the
topology alone says which device is whose and which link leads where (a
report is drawn long after the lab is down).  The nodes that sent the check's
traffic place the first transmit of a packet whose device name several nodes
share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from labctl.evidence.model import Evidence, Packet
from labctl.kernel.tracefs import SkbChain, TraceEvent
from labctl.lab.trace.knowledge import Knowledge
from labctl.lab.trace.model import Ending, PacketPath
from labctl.lab.trace.path import PathBuilder
from labctl.lab.trace.placement import RX_EVENTS, Hint, Placed, Placer, Timeline
from labctl.lab.trace.vocabulary import CONSUMERS
from labctl.topology.model import Topology

MAX_PATHS = 12
"""Paths drawn per check (a burst of a thousand identical frames is told by its first few)."""


def evidence_paths(topo: Topology, evidence: Evidence, limit: int = MAX_PATHS) -> list[PacketPath]:
    """The first ``limit`` packets of the evidence as placed paths, in the order they appeared."""
    knowledge = Knowledge(topo)
    knowledge.deltas = {node: dict(values) for node, values in evidence.counters.items()}
    knowledge.softnet = {cpu: dict(values) for cpu, values in evidence.softnet.items()}
    knowledge.set_fib(evidence.events)
    senders = list(dict.fromkeys(send.node for send in evidence.sends))
    timeline = Timeline()
    hints: list[Hint] = [_fixed(node) for node in senders] + [timeline.node_before]
    placer = Placer(knowledge)
    builder = PathBuilder(knowledge, rules_known=False)
    packets = list(evidence.packets)
    claimed: set[int] = set()
    paths: list[PacketPath] = []
    for position, packet in enumerate(packets):
        if position in claimed:
            continue  # the far half of a frame a VM relay carried: drawn with its first half
        if len(paths) >= limit:
            break
        order = packet.origin in ("sent", "relayed")
        placed, hops = placer.place(packet.events, hints=hints if order else hints[::-1])
        events = _through_relays(list(packet.events), placed, hops, packets, position, claimed, placer, knowledge)
        timeline.add(placed)
        chain = SkbChain(packet.skb, events, on_lab=True)
        path = builder.build(chain, placed, hops, index=position, role="injected" if order else "related")
        path.ending = _settled(path.ending, evidence)
        paths.append(path)
    return paths


def _through_relays(
    events: list[TraceEvent],
    placed: list[Placed],
    hops: list[tuple[tuple[str, str], tuple[str, str]]],
    packets: Sequence[Packet],
    position: int,
    claimed: set[int],
    placer: Placer,
    knowledge: Knowledge,
) -> list[TraceEvent]:
    """A frame a VM relay read from one tap goes on as a new skb the relay writes on the other.

    As in a live trace, the new skb is the next relayed packet whose first
    event is a receive on the far end of that tap link, after the read; its
    events and hops are added to this path (``placed``/``hops`` in place) and
    it is not drawn again on its own.
    """
    for _ in range(MAX_RELAYS):
        last = placed[-1] if placed else None
        if last is None or last.node is None or last.device is None:
            break
        end = (last.node, last.device)
        read = last.event.key == "skb:consume_skb" and CONSUMERS.get(last.event.function or "", ("",))[0] == "relayed"
        if not read or end not in knowledge.tap_ends or end not in knowledge.far:
            break
        far = knowledge.far[end]
        follow = next(
            (
                i
                for i in range(position + 1, len(packets))
                if i not in claimed
                and packets[i].origin == "relayed"
                and packets[i].events
                and packets[i].events[0].key in RX_EVENTS
                and packets[i].events[0].device == far[1]
                and packets[i].events[0].timestamp >= last.event.timestamp
            ),
            None,
        )
        if follow is None:
            break
        claimed.add(follow)
        more, more_hops = placer.place(packets[follow].events, start=far)
        hops.append((end, far))
        hops.extend(more_hops)
        placed.extend(more)
        events.extend(packets[follow].events)
    return events


MAX_RELAYS = 8


def _settled(ending: Ending, evidence: Evidence) -> Ending:
    """An open ending on a node whose listener read (or holds) datagrams: the socket evidence says which.

    A live trace asks the node's UDP sockets; a replay has the check's own
    listeners instead: what they read was delivered (its free is deferred and
    not traced), what waits in their queues is queued.
    """
    if ending.fate != "unknown" or ending.node is None:
        return ending
    mine = [s for s in evidence.sockets if s.node == ending.node]
    read = sum(s.received for s in mine)
    waiting = sum(s.queued_bytes for s in mine)
    ports = ", ".join(str(s.port) for s in mine)
    if read and not waiting:
        detail = f"read by the listener on udp port {ports} (its free is deferred and not traced)"
        return replace(ending, fate="delivered", stage="socket", detail=detail, evidence="counted")
    if waiting:
        detail = f"waiting in the receive queue of udp port {ports} ({waiting} bytes queued)"
        return replace(ending, fate="queued", stage="socket", detail=detail, evidence="counted")
    return ending


def _fixed(node: str) -> Hint:
    def hint(event: TraceEvent) -> str | None:
        return node

    return hint


def walks_for(evidence: Evidence, paths: Sequence[PacketPath]) -> list[dict[str, list[str]]]:
    """Each path's netfilter walks, when the recorded walks line up with the packets one to one.

    The window records, per node, one walk per packet it traced there, in the
    order the packets appeared.  When as many packets visited a node as it
    has walks -- counting every packet, or else only the ones the check sent
    (an ARP exchange may be traced by neither) -- the n-th visitor took the
    n-th walk; otherwise the pairing is unknown and the walks are left to the
    evidence rows rather than guessed.
    """
    pairing: list[dict[str, list[str]]] = [{} for _ in paths]
    if sum(len(p.events) for p in paths) != sum(len(p.events) for p in evidence.packets):
        return pairing  # not every packet is drawn: the n-th visitor is unknown
    for node, walks in evidence.walks.items():
        visitors = [i for i, path in enumerate(paths) if node in path.nodes]
        if len(visitors) != len(walks):
            visitors = [i for i in visitors if paths[i].role == "injected"]
        if len(visitors) != len(walks):
            continue
        for index, walk in zip(visitors, walks, strict=True):
            pairing[index][node] = [step.name for step in walk]
    return pairing
