"""A burst of identical frames explained once per distinct path, then counted.

``labctl trace -n 100000`` records ~4 events per frame.  Attributing and
explaining 400,000 events one skb at a time cost ~30 s; yet a burst of one
frame takes a handful of different paths.  So, before attribution, the
injected skbs' chains are grouped by everything an event says except its
time -- (event, pid, comm, cpu, context flags, every field: device, address,
length, reason, location) for each event of the chain, which the parser
makes cheap to compare (:func:`~labctl.kernel.tracefs.same_but_time`) -- and only the first
chain of each group (its *representative*) goes on to attribution and to the
path builder.  The other members get the representative's verdict and path;
their own skb addresses, events and times are kept.

Why this is exact, not an approximation:

- attribution (:mod:`labctl.evidence.attribution`) judges a chain by its
  events' contents (task, context, devices, event kinds) and cuts chains by
  address and frees; timestamps only bound the window, which is applied here
  first, the same way.  Chains with the same contents get the same verdict.
- only chains that began with the injection (:func:`is_injection`) and ended
  with a free, after a free of the previous skb at that address, are folded:
  leaving them out cannot glue two other chains together, and every other
  chain (ARP, ICMP errors, other labs' look-alikes, neighbour drops) reaches
  attribution untouched.
- path building reads timestamps across chains only for VM relays (tap
  links: then nothing is folded) and for fib lookups (the rich event set: a
  routing stage is "traced" by the lookup its packet made).  The fib
  questions the representative's path asked are asked again with each
  member's own times (:meth:`Knowledge.fib_after`); a member whose answers
  differ gets a path of its own.

A test checks attribution of the folded window against the unfolded one on
recorded events (``tests/lab/test_trace_burst.py``): a future attribution rule
that looks across chains turns it red.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from labctl.evidence.attribution import Scope
from labctl.kernel.tracefs import TERMINAL_EVENTS, ChainBuilder, SkbChain, TraceEvent, same_but_time
from labctl.lab.trace.explain import is_injection


@dataclass
class Group:
    """Injected skbs whose chains say the same but for time: one explanation serves them all."""

    representative: SkbChain
    members: list[SkbChain] = field(default_factory=list)
    """Every chain of the group, the representative first, in the order they started."""


class Folding:
    """Groups a window's injected chains (:meth:`fold`), and gives the groups back to ``explain``."""

    def __init__(self, tid: int, ifname: str, length: int) -> None:
        self.tid, self.ifname, self.length = tid, ifname, length
        self.groups: dict[int, Group] = {}
        """id(representative's first event) → its group."""
        self.order: dict[int, int] = {}
        """id(event) → position in the whole (unfolded) window, for the timeline of related skbs."""
        self.folded_events = 0

    @staticmethod
    def applies(tap_links: bool) -> bool:
        """Folding is exact only without VM relays (the relay's new skb is found by time)."""
        return not tap_links

    def fold(self, events: Sequence[TraceEvent], scope: Scope) -> list[TraceEvent]:
        """The window's events with every injected chain but its group's representative left out."""
        since, until = scope.since, scope.until
        ordered = [e for e in events if since <= e.timestamp <= until]
        ordered.sort(key=attrgetter("timestamp"))
        self.order = dict(zip(map(id, ordered), range(len(ordered)), strict=True))
        builder = ChainBuilder(scope.devices, keep=True)
        add = builder.add
        for event in ordered:
            if event.skbaddr is not None:  # events of no skb (fib lookups, neighbour timers): never folded
                add(event)
        kept: set[int] = set()  # the skb events left in: those of chains not folded, and the representatives'
        freed_before: dict[int, bool] = {}
        by_signature: dict[tuple[int, ...], Group] = {}
        injection: dict[int, bool] = {}  # per first event's token: is_injection reads nothing else
        for chain in builder.created:  # every skb event is in exactly one of them
            events_of = chain.events
            clean = freed_before.get(chain.skbaddr, True)
            freed = events_of[-1].key in TERMINAL_EVENTS
            freed_before[chain.skbaddr] = freed
            first = events_of[0]
            token = same_but_time(first)
            injected = injection.get(token)
            if injected is None:
                injected = injection[token] = is_injection(first, self.tid, self.ifname, self.length)
            if not (clean and freed and injected):
                kept.update(map(id, events_of))
                continue
            signature = tuple(map(same_but_time, events_of))
            group = by_signature.get(signature)
            if group is None:
                by_signature[signature] = group = Group(chain, [chain])
                self.groups[id(first)] = group
                kept.update(map(id, events_of))
                continue
            group.members.append(chain)
            self.folded_events += len(events_of)
        # what is left, in the window's order: one pass, not a sort of the kept events by their position
        return [e for e in ordered if e.skbaddr is None or id(e) in kept]

    def members(self, chain: SkbChain) -> list[SkbChain]:
        """The chains ``chain`` stands for (itself alone when it was not folded)."""
        group = self.groups.get(id(chain.events[0])) if chain.events else None
        return group.members if group is not None else [chain]
