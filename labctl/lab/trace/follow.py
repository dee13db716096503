"""Following a lab live: every lab skb's path as it completes (``labctl trace LAB --follow``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from labctl.kernel import counters
from labctl.kernel.tracefs import ChainBuilder, SkbChain, TraceEvent, TraceSession
from labctl.lab.trace.inject import RICH_EVENTS
from labctl.lab.trace.knowledge import Knowledge, counter_deltas
from labctl.lab.trace.model import FollowSummary, PacketPath
from labctl.lab.trace.path import PathBuilder
from labctl.lab.trace.placement import Placer, Timeline, event_kind
from labctl.lab.trace.rules import moved_rules, read_rules, rule_deltas
from labctl.lab.trace.tasks import FOREIGN, KERNEL, UNKNOWN, TaskMap, foreign_device_names
from labctl.topology.model import Topology

if TYPE_CHECKING:
    from labctl.kernel import iptables


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
                self._summary.counters = counter_deltas(delta, self.k)
                self._summary.softnet = {str(c): v for c, v in delta.get("softnet", {}).items()}
                self._summary.rules = moved_rules(rule_deltas(self._rules_before, read_rules(self.k)))
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
            kind = event_kind(event)
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
