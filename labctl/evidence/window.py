"""The observation window: read everything before, let the caller act, read everything after.

One window serves every consumer -- a check's traffic, ``labctl trace``'s
injection, ``labctl hooks``' walk -- and returns one immutable
:class:`~labctl.evidence.model.Evidence`.  The order is what makes evidence
attributable: counters and rule counters are read, captures, hook tracers,
neighbour watches and the trace instance are opened, the caller acts (and
tells the window which tasks acted for it and what they sent), the kernel is
given its settle time, and everything is read again.  Whatever happens, every
kernel-side resource the window opened is closed before it returns or raises.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType

from labctl.evidence import netfilter as nf_evidence
from labctl.evidence.attribution import Scope, attribute
from labctl.evidence.kept_trace import stop_recording, trace_session
from labctl.evidence.model import (
    CaptureEvidence,
    ConnectionEvidence,
    Evidence,
    ExecEvidence,
    FdbEntry,
    SendEvidence,
    SocketEvidence,
    frozen_nested,
)
from labctl.kernel import conntrack, counters, netns, tracefs
from labctl.kernel.capture import Capture
from labctl.kernel.conntrack import as_record as conntrack_record
from labctl.kernel.links import NodeLinks
from labctl.kernel.neighwatch import NeighWatch, WatchPump, fdb_entries, flush_learned
from labctl.kernel.nftrace import IP_CHAINS, HookTracer
from labctl.kernel.routes import route_get
from labctl.lab import relay
from labctl.topology.model import Topology

BASE_EVENTS: tuple[str, ...] = (
    "skb:kfree_skb",
    "skb:consume_skb",
    "net:net_dev_queue",
    "net:netif_rx",
    "net:netif_receive_skb",
    "net:napi_gro_receive_entry",
    "neigh:neigh_timer_handler",
    "bridge:br_fdb_update",
    *tracefs.SOFTIRQ_EVENTS,
)
"""Always traced: enough to follow an skb across lab devices to its end, and to attribute timer-context
neighbour drops and fdb learning (rare events, nearly free), and what a timer made in softirq (the timer
vectors' entries and exits only: a few per tick).  Each costs 0.1-0.2 µs per packet, so a burst
is traced with what it asks for and no more (the ethertype of a packet, from net_dev_start_xmit, is asked
for by walk expectations)."""

DRAIN_SECONDS = 0.05
"""How often :meth:`Window.draining` reads the trace ring."""

LATE_EVENTS_SECONDS = 0.5
"""Events are kept until this long after the caller's last action (frees of queued skbs)."""

QUIET_SECONDS = 0.03
""":meth:`Window.settle` ends once the lab has been quiet this long: no packet counted by any of its devices
or qdiscs, nothing held in a qdisc or a CPU's backlog, nothing unread by a listener.  Once a send returns,
the kernel has done its work in the sender's own context (softirq runs as the send re-enables bottom
halves); what it defers is visible in those queues.  Steps whose wait is a *timer* (an ARP probe, a netem
delay) say how long with ``settle: SECONDS``, which is a fixed sleep."""

QUIET_RELAYED_SECONDS = 0.1
"""The quiet period of a lab with relays: a frame a relay process has not read yet is in a tap's socket
queue, which no counter shows (a relay waits for a core on a loaded machine)."""

QUIET_POLL_SECONDS = 0.01
"""How often :meth:`Window.settle` reads the lab's counters (0.5 ms of CPU for three namespaces)."""

QUIET_MAX_SECONDS = 2.0
"""A lab that never goes quiet (a flood, another user's load on the CPU backlog) is waited for this long."""


@dataclass
class CaptureRequest:
    node: str
    interface: str | None = None
    filter: str | None = None

    @property
    def key(self) -> str:
        return f"{self.node}:{self.interface}" if self.interface else self.node


@dataclass
class WalkRequest:
    """A netfilter walk to record on one node: bridge tables too, nat (conntrack on), packets matched."""

    bridge_tables: set[str] = field(default_factory=set)
    nat: bool = False
    match: str = ""
    nft: bool = False
    ip: bool = True
    ip6: bool = False
    """The ip6tables tables too (steps ``ip6:TABLE:CHAIN``)."""


@dataclass
class WindowSpec:
    """What to record beyond the counters, which are always read."""

    events: tuple[str, ...] = BASE_EVENTS
    buffer_kb: int | None = None
    captures: list[CaptureRequest] = field(default_factory=list)
    walks: dict[str, WalkRequest] = field(default_factory=dict)
    rules: set[str] = field(default_factory=set)
    """Nodes whose iptables rule counters are read."""
    ebtables: set[str] = field(default_factory=set)
    ip6tables: set[str] = field(default_factory=set)
    """Nodes whose ip6tables rule counters are read."""
    nft: set[str] = field(default_factory=set)
    """Nodes whose nf_tables rule counters are read."""
    fdb: set[str] = field(default_factory=set)
    conntrack: bool = False
    routes: set[tuple[str, str]] = field(default_factory=set)
    """(node, destination) looked up after the traffic, so a PMTU the traffic taught shows."""
    fdb_flush: tuple[tuple[str, str], ...] = ()
    """(node, bridge) whose learnt entries are forgotten once recording is on, just before the window starts."""


IP_TRACE_TABLES = tuple(IP_CHAINS)

Fold = Callable[[Sequence[tracefs.TraceEvent], Scope], list[tracefs.TraceEvent]]
"""What :meth:`Window.close` may apply to the raw events before attributing them."""


def lab_devices(topo: Topology) -> set[str]:
    names: set[str] = set()
    for node in topo.nodes:
        names |= topo.interface_names(node)
    return names


def own_tasks() -> set[int]:
    """Thread ids of this process: the window's senders, readers and injectors are among them."""
    return {int(t) for t in os.listdir("/proc/self/task")}


class Window:
    """``with Window(topo, spec) as w: act(); w.add_tasks(...); evidence = w.close()``."""

    def __init__(self, topo: Topology, spec: WindowSpec) -> None:
        self.topo = topo
        self.spec = spec
        self.nodes = {n: netns.namespace_name(topo.name, n) for n in topo.nodes}
        self._stack = contextlib.ExitStack()
        self._tasks: set[int] = set()
        self._sends: list[SendEvidence] = []
        self._sockets: list[SocketEvidence] = []
        self._errors: list[str] = []
        self._connections: list[ConnectionEvidence] = []
        self._execs: list[ExecEvidence] = []
        self._evidence: Evidence | None = None
        self._raw: list[tracefs.TraceEvent] = []
        self._relays: set[int] = set()
        self._busy: list[Callable[[], bool]] = []
        self.settled: list[float] = []
        """Seconds each :meth:`settle` waited (a fixed settle too), in order."""
        self.since = 0.0
        self.until = 0.0
        self.skipped: dict[str, str] = {}
        """Tracepoints asked for that this kernel does not have, and why (filled on close)."""

    # ------------------------------------------------------------ opening

    def __enter__(self) -> Window:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _open(self) -> None:
        spec = self.spec
        self._captures = {
            c.key: self._stack.enter_context(Capture(self.nodes[c.node], c.interface, c.filter)) for c in spec.captures
        }
        self._tracers = {
            node: self._stack.enter_context(
                HookTracer(
                    self.nodes[node],
                    tables=IP_TRACE_TABLES if w.ip else (),
                    match=w.match,
                    bridge_tables=sorted(w.bridge_tables),
                    conntrack=w.nat,
                    nft=w.nft,
                    tables6=IP_TRACE_TABLES if w.ip6 else (),
                )
            )
            for node, w in spec.walks.items()
        }
        self._rules_before = self._rule_counts()
        self._nft_before = nf_evidence.read_nft_counts({n: self.nodes[n] for n in self.spec.nft})
        self._ip6_before = nf_evidence.read_ip6_counts({n: self.nodes[n] for n in self.spec.ip6tables})
        self._before = counters.Snapshot.take(self.nodes.values())
        events = tuple(dict.fromkeys((*BASE_EVENTS, *spec.events)))
        buffer_kb = spec.buffer_kb or tracefs.DEFAULT_BUFFER_KB
        self._trace = self._stack.enter_context(trace_session(events, buffer_kb))
        # the watches after the trace: a notification heard is then never of an event fired before tracing
        # began, so the lab's notification always finds its own event (attribution.vouched_events)
        self._watches = {node: self._stack.enter_context(NeighWatch(ns)) for node, ns in self.nodes.items()}
        self._pump = self._stack.enter_context(WatchPump(list(self._watches.values())))
        self._relays = set(relay.find(self.topo.name))
        self._tasks |= own_tasks() | self._relays
        # a bridge is emptied with the trace and the watches on: whatever it learns from here on (even from a
        # neighbour's timer-driven ARP probe) is recorded, while what it learnt before is forgotten before `since`
        for node, bridge in spec.fdb_flush:
            flush_learned(self.nodes[node], bridge)
        self.since = time.monotonic()

    def _rule_counts(self) -> tuple[nf_evidence.RuleCounts, nf_evidence.RuleCounts]:
        return nf_evidence.read_rule_counts(
            {n: self.nodes[n] for n in self.spec.rules}, {n: self.nodes[n] for n in self.spec.ebtables}
        )

    # ------------------------------------------------------------ what the caller tells

    def add_tasks(self, pids: Iterable[int]) -> None:
        """Processes the caller started for this window (ping): their events are the lab's."""
        self._tasks |= set(pids)

    def record_send(self, send: SendEvidence) -> None:
        self._sends.append(send)

    def record_sockets(self, sockets: Iterable[SocketEvidence]) -> None:
        self._sockets += list(sockets)

    def record_connections(self, connections: Iterable[ConnectionEvidence]) -> None:
        self._connections += list(connections)

    def record_exec(self, run: ExecEvidence) -> None:
        self._execs.append(run)

    def busy_while(self, pending: Callable[[], bool]) -> None:
        """Tell :meth:`settle` of work the counters do not show (a listener thread with datagrams unread)."""
        self._busy.append(pending)

    def settle(self, fixed: float | None = None) -> float:
        """Wait until the kernel is done with what the caller sent; the seconds waited.

        ``fixed`` (a step's ``settle:``): exactly that long -- the wait is a timer nothing shows running
        (ARP probes, a netem delay).  Otherwise until the lab has been quiet for :data:`QUIET_SECONDS`
        (:data:`QUIET_RELAYED_SECONDS` with relays): no packet counted by its interfaces or qdiscs --
        read per namespace, so another lab's traffic neither ends nor stretches the wait -- nothing held
        in its qdiscs or any CPU's backlog, and nothing :meth:`busy_while` reports; at most
        :data:`QUIET_MAX_SECONDS`.  A quiet period is no shorter for a check that expects nothing
        (count 0): nothing can arrive unseen -- whatever the kernel still holds is in the queues read here.
        """
        start = time.monotonic()
        if fixed is not None:
            time.sleep(fixed)
            self.settled.append(fixed)
            return fixed
        quiet = QUIET_RELAYED_SECONDS if self._relays else QUIET_SECONDS
        handles: list[NodeLinks] = []
        try:
            handles = [NodeLinks(ns) for ns in self.nodes.values()]
            last: tuple[int, ...] | None = None
            quiet_since = start
            while True:
                now = time.monotonic()
                seen = [counters.activity(handle) for handle in handles]
                moved = tuple(m for m, _ in seen)
                held = any(h for _, h in seen) or counters.backlog() > 0 or any(busy() for busy in self._busy)
                if moved != last or held:
                    last, quiet_since = moved, now
                elif now - quiet_since >= quiet:
                    break
                if now - start >= QUIET_MAX_SECONDS:
                    break
                time.sleep(QUIET_POLL_SECONDS)
        finally:
            for handle in handles:
                handle.close()
        waited = time.monotonic() - start
        self.settled.append(waited)
        return waited

    def error(self, text: str) -> None:
        """A step that could not do what it said: the verdict must be ERROR, never PASS."""
        self._errors.append(text)

    def raw_events(self) -> list[tracefs.TraceEvent]:
        """Events recorded so far (consumed): for a caller that waits until its packets settle."""
        fresh = self._trace.events()
        self._raw.extend(fresh)
        return fresh

    @contextlib.contextmanager
    def draining(self, every: float = DRAIN_SECONDS) -> Iterator[None]:
        """Read the trace ring in the background while the body waits (a TCP handshake's 1 s retransmission,
        a program): trace_pipe consumes what it reads, so other namespaces' traffic, which the global
        tracepoints also record, does not fill the ring and lose this lab's events before the window closes.
        """
        stop = threading.Event()

        def drain() -> None:
            while not stop.wait(every):
                self._raw.extend(self._trace.events())

        thread = threading.Thread(target=drain, name="trace-drain", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # ------------------------------------------------------------ closing

    def close(self, fold: Fold | None = None) -> Evidence:
        """Stop recording, read everything again, attribute, and release every resource.

        ``fold`` may leave events out before attribution (``labctl trace`` of a burst: one chain per
        group of identical skbs, see :mod:`labctl.lab.trace.burst`); it sees the window's scope.
        """
        if self._evidence is not None:
            return self._evidence
        try:
            self.until = time.monotonic()
            self._tasks |= own_tasks()
            stop_recording(self._trace)
            self._raw.extend(self._trace.events())
            lost = self._trace.lost_events()
            traced = frozenset(self._trace.enabled)
            self.skipped = dict(self._trace.skipped)
            after = counters.Snapshot.take(self.nodes.values())
            rules_after = self._rule_counts()
            nft_after = nf_evidence.read_nft_counts({n: self.nodes[n] for n in self.spec.nft})
            ip6_after = nf_evidence.read_ip6_counts({n: self.nodes[n] for n in self.spec.ip6tables})
            self._pump.close()
            notes = {node: watch.notes() for node, watch in self._watches.items()}
            if self._pump.error:
                self.error(self._pump.error)
            lost_notes = sum(w.overruns for w in self._watches.values())
            if lost_notes:
                self.error(f"{lost_notes} overruns of the neighbour notification sockets: some were lost")
            walks = {node: nf_evidence.walks_per_packet(tracer.steps()) for node, tracer in self._tracers.items()}
            captures = {key: _capture(capture) for key, capture in self._captures.items()}
            fdb = {key: self._fdb(key) for key in sorted(self.spec.fdb)}
            macs = self._macs() if self.spec.fdb else {}
            ct_entries = (
                {node: conntrack.entries(ns) for node, ns in self.nodes.items()} if self.spec.conntrack else {}
            )
            ct = sum(len(found) for found in ct_entries.values())
            route_answers = {
                f"{node} {dst}": route_get(self.nodes[node], dst).as_dict() for node, dst in sorted(self.spec.routes)
            }
        finally:
            self._stack.close()
        delta = counters.delta(self._before, after)
        by_node = counters.by_node(delta, self.nodes)
        scope = Scope(
            devices=lab_devices(self.topo),
            tasks=self._tasks,
            since=self.since,
            until=self.until + LATE_EVENTS_SECONDS,
            notes=notes,
            relays=self._relays,
            unreachable={node: c.get("Icmp.OutDestUnreachs", 0) for node, c in by_node.items()},
            lost=lost,
        )
        if fold is not None:
            packets, events = attribute(fold(self._raw, scope), scope, unfolded=self._raw)
        else:
            packets, events = attribute(self._raw, scope)
        rules, bridge_rules = nf_evidence.rule_deltas(self._rules_before, rules_after)
        self._evidence = Evidence(
            packets=packets,
            events=events,
            traced=traced,
            lost_events=lost,
            counters=frozen_nested(by_node),
            counter_names=MappingProxyType(_counter_names(after, self.nodes)),
            softnet=frozen_nested(
                {
                    str(cpu): {k: v for k, v in cols.items() if isinstance(v, int)}
                    for cpu, cols in delta.get("softnet", {}).items()
                }
            ),
            captures=MappingProxyType(captures),
            sockets=tuple(self._sockets),
            sends=tuple(self._sends),
            rules=frozen_nested(rules),
            ebtables=frozen_nested(bridge_rules),
            ip6tables=frozen_nested(nf_evidence.nft_deltas(self._ip6_before, ip6_after)),
            nft=frozen_nested(nf_evidence.nft_deltas(self._nft_before, nft_after)),
            walks=MappingProxyType(walks),
            fdb=MappingProxyType(fdb),
            macs=MappingProxyType(macs),
            conntrack=ct,
            conntrack_entries=MappingProxyType(
                {node: tuple(conntrack_record(e) for e in found) for node, found in ct_entries.items() if found}
            ),
            routes=frozen_nested(route_answers),
            notifications=MappingProxyType({n: tuple(x.text() for x in v) for n, v in notes.items() if v}),
            errors=tuple(self._errors),
            connections=tuple(self._connections),
            execs=tuple(self._execs),
        )
        return self._evidence

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._evidence is None:
            self._stack.close()

    # ------------------------------------------------------------ readers

    def _fdb(self, key: str) -> tuple[FdbEntry, ...]:
        node, _, bridge = key.partition(":")
        return tuple(FdbEntry(r.mac, r.port, r.flags) for r in fdb_entries(self.nodes[node], bridge))

    def _macs(self) -> dict[str, str]:
        found = {}
        for node, ns in self.nodes.items():
            ipr = netns.netlink(ns)
            try:
                for link in ipr.get_links():
                    name, mac = link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS")
                    if name and mac:
                        found[f"{node}:{name}"] = str(mac).lower()
            finally:
                ipr.close()
        return found


def _capture(capture: Capture) -> CaptureEvidence:
    frames = capture.stop()
    directions: dict[str, int] = {}
    for frame in frames:
        directions[frame.direction] = directions.get(frame.direction, 0) + 1
    sources = tuple(":".join(f"{b:02x}" for b in frame.data[6:12]) for frame in frames)
    return CaptureEvidence(len(frames), capture.stats().drops, MappingProxyType(directions), sources, tuple(frames))


def _counter_names(snapshot: counters.Snapshot, nodes: Mapping[str, str]) -> dict[str, frozenset[str]]:
    names: dict[str, frozenset[str]] = {}
    for node, ns in nodes.items():
        taken = snapshot.namespaces[ns]
        found = set(taken.snmp)
        found |= {f"{ifname}.{key}" for ifname, stats in taken.links.items() for key in stats}
        found |= {f"{ifname}.qdisc.{key}" for ifname, qs in taken.qdisc.items() for q in qs.values() for key in q}
        names[node] = frozenset(found)
    return names
