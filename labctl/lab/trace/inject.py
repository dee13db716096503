"""Tracing an injection: trace_packet and trace_frame inject a frame and explain each skb."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

from labctl.evidence.model import SendEvidence
from labctl.evidence.window import Window, WindowSpec
from labctl.kernel import tracefs
from labctl.kernel.inject import Injector
from labctl.kernel.sched import pinned
from labctl.kernel.tracefs import TraceEvent
from labctl.lab.trace.burst import Folding
from labctl.lab.trace.explain import explain, is_injection
from labctl.lab.trace.frame import FrameInfo
from labctl.lab.trace.knowledge import Knowledge
from labctl.lab.trace.model import TraceResult
from labctl.lab.trace.rules import moved_rules, read_rules, rule_deltas
from labctl.lab.traffic import PreparedFrame, prepare_injection
from labctl.topology.model import Topology

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
    *tracefs.SOFTIRQ_EVENTS,
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


def _events_for(count: int) -> tuple[str, ...]:
    return RICH_EVENTS if count <= BULK else LEAN_EVENTS


def _buffer_kb(count: int, events: Sequence[str]) -> int:
    """Per-CPU ring size: room for our packets plus whatever else the host does meanwhile."""
    if count <= BULK:
        return 2048
    per_packet = BYTES_PER_PACKET * (1 if len(events) <= len(LEAN_EVENTS) else 3)
    return min(MAX_BUFFER_KB, count * per_packet // 1024 + tracefs.DEFAULT_BUFFER_KB)


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
            ours = event.pid == self.tid and not tracefs.is_softirq_mark(event)
            if is_injection(event, self.tid, self.ifname, self.length) and self.seen < self.count and addr:
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


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the body (back on after, if it was on).

    Explaining a 100k-frame burst makes millions of objects that live until the end (events, chains,
    paths) and form no cycles: the collector's passes over them, started every 700 allocations, took 40 %
    of the CPU (4.8 s instead of 7.8 s with the rich events, on recorded bursts).  Reference counting
    still frees everything else as before; cycles wait for the next collection after the trace.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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


@_gc_paused()
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
    rules_before = read_rules(knowledge)
    tid = threading.get_native_id()
    wanted = tuple(events) if events is not None else _events_for(count)
    spec = WindowSpec(events=wanted, buffer_kb=_buffer_kb(count, wanted))
    with Window(topo, spec) as window, pinned(cpu), Injector(prepared.namespace, prepared.ifname) as injector:
        settler = _Settler(tid, prepared.ifname, len(prepared.frame), count)
        since = time.monotonic()
        result.sent = injector.send(prepared.frame, count)
        result.inject_seconds = time.monotonic() - since
        result.send_errors = dict(injector.errors)
        window.record_send(SendEvidence(node, "inject", count, result.sent))
        settler.count = result.sent
        deadline = time.monotonic() + settle
        if count <= BULK:
            while True:
                settler.feed(window.raw_events())
                if settler.settled():
                    result.settled = True
                    break
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.003)
        else:
            time.sleep(min(settle, 0.2))
            result.settled = True
        folding = Folding(tid, prepared.ifname, len(prepared.frame))
        evidence = window.close(folding.fold if Folding.applies(bool(knowledge.tap_ends)) else None)
    result.events_enabled = sorted(evidence.traced)
    result.events_skipped = dict(window.skipped)
    result.lost_events = evidence.lost_events
    rules_after = read_rules(knowledge)
    knowledge.read_sockets(after=True)
    knowledge.deltas = {node: dict(c) for node, c in evidence.counters.items() if c}
    knowledge.softnet = {cpu_id: dict(cols) for cpu_id, cols in evidence.softnet.items()}
    knowledge.rules = rule_deltas(rules_before, rules_after)
    knowledge.rules_known = True
    knowledge.set_fib(evidence.events)
    result.counters = knowledge.deltas
    result.softnet = {cpu_id: dict(cols) for cpu_id, cols in knowledge.softnet.items()}
    result.rules = moved_rules(knowledge.rules)
    result.packets, result.related = explain(
        evidence.events, knowledge, prepared, info, tid, since, result.sent, folding if folding.groups else None
    )
    result.elapsed_seconds = time.monotonic() - started
    return result
