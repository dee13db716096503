"""Which skbs of a window of events are the injected ones (and those they caused), and their paths."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from labctl.kernel import tracefs
from labctl.kernel.tracefs import SkbChain, TraceEvent
from labctl.lab.trace.frame import FrameInfo
from labctl.lab.trace.knowledge import Knowledge
from labctl.lab.trace.model import PacketPath
from labctl.lab.trace.path import PathBuilder
from labctl.lab.trace.placement import RX_EVENTS, Placed, Placer, Timeline
from labctl.lab.trace.vocabulary import CONSUMERS
from labctl.lab.traffic import PreparedFrame


def is_injection(event: TraceEvent, tid: int, ifname: str, length: int) -> bool:
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
        if len(injected) < count and is_injection(first, tid, prepared.ifname, info.length):
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
    placed: list[Placed],
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
        read = last.event.key == "skb:consume_skb" and CONSUMERS.get(last.event.function or "", ("",))[0] == "relayed"
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
