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

from labctl.evidence.model import Evidence
from labctl.kernel.tracefs import SkbChain, TraceEvent
from labctl.lab.trace.knowledge import Knowledge
from labctl.lab.trace.model import Ending, PacketPath
from labctl.lab.trace.path import PathBuilder
from labctl.lab.trace.placement import Hint, Placer, Timeline
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
    paths: list[PacketPath] = []
    for position, packet in enumerate(evidence.packets[:limit]):
        order = packet.origin in ("sent", "relayed")
        placed, hops = placer.place(packet.events, hints=hints if order else hints[::-1])
        timeline.add(placed)
        chain = SkbChain(packet.skb, list(packet.events), on_lab=True)
        path = builder.build(chain, placed, hops, index=position, role="injected" if order else "related")
        path.ending = _settled(path.ending, evidence)
        paths.append(path)
    return paths


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
    if len(paths) != len(evidence.packets):
        return pairing
    for node, walks in evidence.walks.items():
        visitors = [i for i, path in enumerate(paths) if node in path.nodes]
        if len(visitors) != len(walks):
            visitors = [i for i in visitors if paths[i].role == "injected"]
        if len(visitors) != len(walks):
            continue
        for index, walk in zip(visitors, walks, strict=True):
            pairing[index][node] = [step.name for step in walk]
    return pairing
