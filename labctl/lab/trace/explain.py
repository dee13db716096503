"""Which skbs of a window of events are the injected ones (and those they caused), and their paths."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from labctl.kernel import tracefs
from labctl.kernel.tracefs import SkbChain, TraceEvent
from labctl.lab.trace.frame import FrameInfo
from labctl.lab.trace.knowledge import FibQuestion, Knowledge, fib_words
from labctl.lab.trace.model import PacketPath
from labctl.lab.trace.path import PathBuilder
from labctl.lab.trace.placement import CAUSE_WINDOW, RX_EVENTS, Placed, Placer, Timeline
from labctl.lab.trace.vocabulary import CONSUMERS
from labctl.lab.traffic import PreparedFrame

if TYPE_CHECKING:
    from labctl.lab.trace.burst import Folding


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
    folding: Folding | None = None,
) -> tuple[list[PacketPath], list[PacketPath]]:
    """(the injected skbs' paths, the related skbs' paths) from a window of events.

    With ``folding`` (:mod:`.burst`), ``events`` hold one representative chain
    per group of identical injected skbs: its path is built once and every
    member gets a :class:`PacketPath` of its own (index, skb, events) sharing
    the representative's segments and ending.
    """
    node = next(n for n, ns in knowledge.namespaces.items() if ns == prepared.namespace)
    ordered = sorted(events, key=attrgetter("timestamp"))  # stable: the stream's own order within a µs
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
    order = folding.order if folding is not None else {id(event): position for position, event in enumerate(ordered)}
    timeline = Timeline(order)
    claimed: set[int] = set()
    members: list[tuple[SkbChain, int]] = []  # (an injected skb's chain, its explanation)
    explained: list[tuple[PacketPath, list[Placed]]] = []
    for chain in injected:
        placed, hops = placer.place(chain.events, start=(node, prepared.ifname))
        chain = _through_relays(chain, placed, hops, chains, placer, knowledge, info, claimed)
        timeline.add(placed)
        knowledge.fib_log = [] if folding is not None else None
        path = builder.build(chain, placed, hops, index=0, role="injected", info=info)
        questions, knowledge.fib_log = knowledge.fib_log or [], None
        explained.append((path, placed))
        group = folding.members(chain) if folding is not None else [chain]
        attributed = [_as_attributed(member, group[0], chain) for member in group]
        if not questions or len(group) == 1:
            members.extend((member, len(explained) - 1) for member in attributed)
            continue
        # the path read fib lookups, matched by time: each member asks the same questions with its own
        # times, and one whose answers differ (no lookup, another table) gets a path of its own
        position = {id(event): at for at, event in enumerate(chain.events)}
        by_answers = {tuple(fib_words(q.answer) for q in questions): len(explained) - 1}
        for member in attributed:
            answers = tuple(fib_words(_asked(knowledge, q, member.events, position)) for q in questions)
            which = by_answers.get(answers)
            if which is None:
                own, own_hops = placer.place(member.events, start=(node, prepared.ifname))
                timeline.add(own)
                explained.append((builder.build(member, own, own_hops, index=0, role="injected", info=info), own))
                which = by_answers[answers] = len(explained) - 1
            members.append((member, which))
    if folding is not None:
        members.sort(key=lambda m: m[0].events[0].timestamp)
        del members[count:]
    paths = [_member_path(explained[which][0], member, index) for index, (member, which) in enumerate(members)]
    if folding is not None and related:
        _add_members_near(timeline, related, members, explained)
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


def _asked(knowledge: Knowledge, question: FibQuestion, events: Sequence[TraceEvent], position: dict[int, int]) -> Any:
    """The answer to a representative's fib ``question`` for another skb of its group (``events``)."""
    received = events[position[id(question.received)]]
    later = events[position[id(question.later)]] if question.later is not None else None
    start = received.timestamp
    end = later.timestamp if later is not None else start + 0.001
    return knowledge.fib_between(start, end, received.cpu, question.ifindex, question.info)


def _as_attributed(member: SkbChain, representative: SkbChain, kept: SkbChain) -> SkbChain:
    """A member's chain cut as attribution cut its representative's (``kept``: what it let through)."""
    if member is representative or len(kept.events) == len(representative.events):
        return member if member is not representative else kept
    position = {id(event): index for index, event in enumerate(representative.events)}
    at = [position[id(event)] for event in kept.events if id(event) in position]
    return SkbChain(member.skbaddr, [member.events[i] for i in at], on_lab=member.on_lab)


def _member_path(path: PacketPath, member: SkbChain, index: int) -> PacketPath:
    """``path`` for one skb that took it: its own index, address and events; the stages are shared."""
    if member.events is path.events:
        path.index = index
        return path
    return PacketPath(
        index, member.skbaddr, path.role, path.segments, path.ending, path.kind, path.length, member.events
    )


def _add_members_near(
    timeline: Timeline,
    related: Sequence[SkbChain],
    members: Sequence[tuple[SkbChain, int]],
    explained: Sequence[tuple[PacketPath, list[Placed]]],
) -> None:
    """Put the folded members' events on the timeline where a related skb may look for its cause.

    :meth:`Timeline.node_before` only looks back :data:`CAUSE_WINDOW` on one CPU, so only members
    that overlap such a window before a related skb's first event are added, placed as their
    representative was (same events, same places).
    """
    starts = sorted(chain.events[0].timestamp for chain in related)
    for member, which in members:
        _path, placed = explained[which]
        if not placed or member.events[0] is placed[0].event or len(member.events) != len(placed):
            continue  # the representative (already there), or cut differently (not placed alike)
        begin, end = member.events[0].timestamp, member.events[-1].timestamp
        at = bisect.bisect_left(starts, begin)
        if at == len(starts) or starts[at] - CAUSE_WINDOW > end:
            continue
        timeline.add(
            Placed(event, item.node, item.device, item.kind) for event, item in zip(member.events, placed, strict=True)
        )


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
