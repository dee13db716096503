"""The attribution of global events to a lab: per-skb chains, kept when seen on the lab's devices.

Tracepoints fire for every namespace on the host.  :func:`chains` and :func:`all_chains` keep only the skbs
that were seen on a lab's devices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter

from labctl.kernel.tracefs.event import TERMINAL_EVENTS, TraceEvent, stage_of


@dataclass
class SkbChain:
    """The events of one skb, from its first sighting to its free."""

    skbaddr: int
    events: list[TraceEvent]
    on_lab: bool | None = None
    """True once seen on a lab device, False once seen on another device, None before any device."""

    @property
    def start(self) -> float:
        return self.events[0].timestamp

    @property
    def end(self) -> float:
        return self.events[-1].timestamp

    @property
    def fate(self) -> str | None:
        """``dropped``, ``consumed``, or None when the skb was still alive at the end."""
        last = self.events[-1].key
        return {"skb:kfree_skb": "dropped", "skb:consume_skb": "consumed"}.get(last)

    @property
    def drop(self) -> TraceEvent | None:
        last = self.events[-1]
        return last if last.key == "skb:kfree_skb" else None

    @property
    def stages(self) -> list[str]:
        return [stage_of(e) for e in self.events]

    @property
    def devices(self) -> list[str]:
        seen: list[str] = []
        for event in self.events:
            for dev in event.devices:
                if dev not in seen:
                    seen.append(dev)
        return seen


_TIMESTAMP = attrgetter("timestamp")


def _windowed(events: Iterable[TraceEvent], since: float | None, until: float | None) -> list[TraceEvent]:
    kept = [e for e in events if (since is None or e.timestamp >= since) and (until is None or e.timestamp <= until)]
    kept.sort(key=_TIMESTAMP)  # stable: equal µs timestamps keep the kernel's order
    return kept


def _device_verdict(event: TraceEvent, devices: set[str]) -> bool | None:
    """True: the event names a device of ``devices``; False: only others; None: no device at all."""
    named = event.devices
    return not devices.isdisjoint(named) if named else None


MAX_CHAIN_EVENTS = 4096
"""A chain is cut at this many events.  A real skb's path is tens of events; an address recycled by an
untraced free under a machine-wide flood would otherwise collect events for as long as the flood lasts
(a live ``--follow`` grew to gigabytes that way)."""


class ChainBuilder:
    """Cuts an event stream into per-skb chains as the events arrive.

    An address is reused as soon as its skb is freed: a chain ends at
    kfree_skb/consume_skb.  Some frees are not traced (GRO-merged heads,
    ``kfree_skb_partial``), so a chain also ends when the address shows up on
    a device of the other side (lab vs non-lab): one skb never crosses from a
    lab namespace into a foreign one.

    The batch functions below use it on a whole window; a live view
    (``labctl trace --follow``) feeds it event by event and shows each chain
    as :meth:`add` reports it complete, or when :meth:`idle` gives it up.
    """

    def __init__(self, devices: set[str], *, keep: bool = False) -> None:
        self.devices = devices
        self.open: dict[int, SkbChain] = {}
        self.created: list[SkbChain] = []
        """Every chain in the order it started (only with ``keep``: a live view would grow forever)."""
        self._keep = keep

    def add(self, event: TraceEvent) -> list[SkbChain]:
        """Feed the next event (time order); returns the chains it completed (freed or cut)."""
        addr = event.skbaddr
        if addr is None:
            return []
        done: list[SkbChain] = []
        named = event.devices  # _device_verdict, inline: this runs for every event of a window
        verdict = not self.devices.isdisjoint(named) if named else None
        chain = self.open.get(addr)
        if chain is not None and verdict is not None and chain.on_lab is not None and chain.on_lab != verdict:
            done.append(chain)
            chain = None
        if chain is None:
            chain = SkbChain(addr, [])
            self.open[addr] = chain
            if self._keep:
                self.created.append(chain)
        chain.events.append(event)
        if chain.on_lab is None:
            chain.on_lab = verdict
        if event.key in TERMINAL_EVENTS or len(chain.events) >= MAX_CHAIN_EVENTS:
            del self.open[addr]
            done.append(chain)
        return done

    def idle(self, before: float) -> list[SkbChain]:
        """Give up the open chains whose last event is older than ``before`` (queued, merged, lost)."""
        stale = [c for c in self.open.values() if c.end < before]
        for chain in stale:
            del self.open[chain.skbaddr]
        return stale

    def flush(self) -> list[SkbChain]:
        """Every chain still open, oldest first; the builder is empty afterwards."""
        rest = sorted(self.open.values(), key=lambda c: c.start)
        self.open = {}
        return rest


def _all_chains(events: list[TraceEvent], devices: set[str]) -> list[SkbChain]:
    """Cut the (time-ordered) event stream into per-skb chains, in the order they started."""
    builder = ChainBuilder(devices, keep=True)
    add = builder.add
    for event in events:
        if event.skbaddr is not None:  # add() ignores the others: not a call each for fib lookups and polls
            add(event)
    return builder.created


def chains(
    events: Iterable[TraceEvent], devices: set[str], since: float | None = None, until: float | None = None
) -> list[SkbChain]:
    """The skbs seen on ``devices`` within the window, each with its whole story, ordered by start."""
    ordered = _windowed(events, since, until)
    return [c for c in _all_chains(ordered, devices) if c.on_lab]


def all_chains(
    events: Iterable[TraceEvent], devices: set[str], since: float | None = None, until: float | None = None
) -> list[SkbChain]:
    """Every skb chain of the window: on the lab (on_lab True), elsewhere (False) or on no device (None).

    Callers that can tell their own skbs apart by other means (the task that
    ran an event) use the deviceless ones too: a datagram dropped before it
    reached any device (OUTPUT drop) has no device event at all.
    """
    return _all_chains(_windowed(events, since, until), devices)
