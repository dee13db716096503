"""One check's observation window: stage, traffic, and everything the kernel showed.

The order is what makes the evidence attributable: counters and rule
counters are read, captures and the trace instance are opened, the traffic
is sent, the kernel is given a moment to finish, then everything is read
again.  All the stage (listeners, temporary rules, temporary sysctls) is
undone before the next check, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from labctl.kernel import counters, netns, sysctl, tracefs
from labctl.kernel.links import NodeLinks
from labctl.kernel.packet import Capture, inject
from labctl.kernel.sched import pinned
from labctl.kernel.sockets import SendResult, UdpListener, send_udp
from labctl.lab import netfilter_stage, relay
from labctl.lab.traffic import TrafficError, prepare_injection
from labctl.topology.checks import Check, Listen, Traffic
from labctl.topology.model import Topology


@dataclass
class CaptureResult:
    frames: int
    dropped: int
    directions: dict[str, int]


@dataclass
class Observation:
    """Everything one check saw; evaluate.py judges it, report.py shows it."""

    events: list[tracefs.TraceEvent] = field(default_factory=list)
    chains: list[tracefs.SkbChain] = field(default_factory=list)
    lost_events: int = 0
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    softnet_dropped: int = 0
    captures: dict[str, CaptureResult] = field(default_factory=dict)
    delivered: int = 0
    sources: list[str] = field(default_factory=list)
    send_results: list[SendResult] = field(default_factory=list)
    ping_ok: list[bool] = field(default_factory=list)
    rules: dict[str, dict[str, int]] = field(default_factory=dict)
    ebtables: dict[str, dict[str, int]] = field(default_factory=dict)
    hooks: dict[str, list[str]] = field(default_factory=dict)
    fdb: dict[str, list[str]] = field(default_factory=dict)
    conntrack: int = 0
    sent_frames: int = 0
    queued_bytes: int = 0
    tasks: set[int] = field(default_factory=set)
    counter_names: dict[str, set[str]] = field(default_factory=dict)
    """Every counter each node has (a delta lists only those that moved)."""
    traced_events: set[str] = field(default_factory=set)
    """The tracepoints this kernel let the session enable."""
    timer_drops: list[tracefs.TraceEvent] = field(default_factory=list)
    """Drops of skbs never seen on a device nor by a task of ours (timer context, e.g. NEIGH_FAILED)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "counters": self.counters,
            "softnet_dropped": self.softnet_dropped,
            "captures": {k: vars(v) for k, v in self.captures.items()},
            "delivered": self.delivered,
            "queued_bytes": self.queued_bytes,
            "sources": self.sources,
            "send_errors": [r.error_name for r in self.send_results if r.error_name],
            "rules": self.rules,
            "ebtables": self.ebtables,
            "hooks": self.hooks,
            "fdb": self.fdb,
            "conntrack": self.conntrack,
            "lost_trace_events": self.lost_events,
            "path": [
                {"skb": hex(c.skbaddr), "fate": c.fate, "stages": c.stages, "devices": c.devices} for c in self.chains
            ],
        }


def lab_devices(topo: Topology) -> set[str]:
    names: set[str] = set()
    for node in topo.nodes:
        names |= topo.interface_names(node)
    return names


@contextlib.contextmanager
def _temporary_sysctls(topo: Topology, check: Check) -> Iterator[None]:
    saved: list[tuple[str, str, str]] = []
    try:
        for node, settings in check.setup.sysctls.items():
            ns = netns.namespace_name(topo.name, node)
            for key, value in settings.items():
                saved.append((ns, key, sysctl.read(key, ns)))
                sysctl.write_many({key: sysctl.format_value(value)}, ns)
        yield
    finally:
        for ns, key, old in reversed(saved):
            with contextlib.suppress(sysctl.SysctlError):
                sysctl.write_many({key: old}, ns)


def _own_tasks() -> set[int]:
    """Thread ids of this process: trace events carry the task that ran them."""
    return {int(t) for t in os.listdir("/proc/self/task")}


def _ours(chain: tracefs.SkbChain, tasks: set[int]) -> bool:
    """A lab skb whose story touched a task of ours (sender, reader, relay, ping).

    Device names are not unique across namespaces (every lab has an eth0), so
    a device match alone would adopt other namespaces' packets; every packet a
    check causes is sent, relayed or read by one of our tasks, and softirq
    work on veth runs in the sender's context.
    """
    return any(event.pid in tasks for event in chain.events)


KERNEL_THREADS = ("ksoftirqd/", "kworker/", "swapper/", "<idle>", "irq/", "migration/", "rcu")


def _without_foreign_tasks(chain: tracefs.SkbChain, tasks: set[int]) -> tracefs.SkbChain:
    """Drop the events another program's task ran.

    An skb freed without a traced free (UDP's stateless consume) leaves its
    address open, and the next skb at that address -- another namespace's
    eth0 -- would join the chain. Our packets are handled by our tasks or by
    kernel threads (softirq), never by another user process.
    """
    kept = [e for e in chain.events if e.pid in tasks or e.pid == 0 or e.comm.startswith(KERNEL_THREADS)]
    if len(kept) == len(chain.events):
        return chain
    return tracefs.SkbChain(chain.skbaddr, kept, chain.on_lab)


def _send(topo: Topology, step: Traffic, seen: Observation) -> None:
    if step.inject is not None:
        prepared = prepare_injection(topo, step.inject.node, step.inject.interface, step.inject.packet)
        with pinned(step.inject.cpu):
            inject(prepared.namespace, prepared.ifname, prepared.frame, step.inject.count, step.inject.rate)
        seen.sent_frames += step.inject.count  # attempted: a frame the qdisc drops is refused, not unsent
    elif step.udp is not None:
        host, _, port = step.udp.to.rpartition(":")
        payload = step.udp.payload.encode()
        if step.udp.size is not None:
            payload = (payload * (step.udp.size // max(len(payload), 1) + 1))[: step.udp.size]
        ns = netns.namespace_name(topo.name, step.udp.node)
        seen.send_results.append(send_udp(ns, host.strip("[]"), int(port), payload, count=step.udp.count))
    elif step.ping is not None:
        ns = netns.namespace_name(topo.name, step.ping.node)
        argv = ["ping", "-n", "-q", "-c", str(step.ping.count), "-i", "0.01", "-W", "1", step.ping.to]
        proc = netns.popen(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen.tasks.add(proc.pid)  # its echo requests are ours too
        code = proc.wait()
        if code not in (0, 1):  # 1 is "no reply"; anything else means ping could not even try
            raise TrafficError(f"ping {step.ping.to} from {step.ping.node} failed to run (exit {code})")
        seen.ping_ok.append(code == 0)
    time.sleep(step.settle)


def fdb_of(topo: Topology, node: str, bridge: str) -> list[str]:
    with NodeLinks(netns.namespace_name(topo.name, node)) as handle:
        handle.refresh()
        return handle.learnt_macs(bridge)


def observe(topo: Topology, check: Check) -> Observation:
    """Stage the check, send its traffic under observation, undo the stage."""
    seen = Observation()
    namespaces = [netns.namespace_name(topo.name, n) for n in topo.nodes]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_temporary_sysctls(topo, check))
        stack.enter_context(netfilter_stage.temporary_rules(topo, check))
        listeners = [stack.enter_context(_listener(topo, spec)) for spec in check.setup.listen]
        captures = {
            (f"{spec.node}:{spec.interface}" if spec.interface else spec.node): stack.enter_context(
                Capture(netns.namespace_name(topo.name, spec.node), spec.interface, spec.filter)
            )
            for spec in check.setup.capture
        }
        hook_tracers = netfilter_stage.hook_tracers(topo, check, stack)
        rules_before = netfilter_stage.rule_counters(topo, check)
        before = counters.Snapshot.take(namespaces)
        trace = stack.enter_context(tracefs.TraceSession())
        since = time.monotonic()
        seen.tasks |= _own_tasks() | set(relay.find(topo.name))
        for step in check.traffic:
            _send(topo, step, seen)
        until = time.monotonic()
        seen.tasks |= _own_tasks()
        trace.stop()
        after = counters.Snapshot.take(namespaces)
        rules_after = netfilter_stage.rule_counters(topo, check)
        _attribute(seen, trace, lab_devices(topo), since, until + 0.5)
        delta = counters.delta(before, after)
        nodes = {n: netns.namespace_name(topo.name, n) for n in topo.nodes}
        seen.counters = counters.by_node(delta, nodes)
        seen.counter_names = _counter_names(after, nodes)
        seen.traced_events = set(trace.enabled)
        seen.softnet_dropped = sum(cpu.get("dropped", 0) for cpu in delta.get("softnet", {}).values())
        seen.rules, seen.ebtables = netfilter_stage.rule_deltas(rules_before, rules_after)
        seen.hooks = {node: tracer.steps_text() for node, tracer in hook_tracers.items()}
        seen.captures = {key: _capture_result(capture) for key, capture in captures.items()}
        for listener in listeners:
            seen.queued_bytes += listener.stats().queued_bytes
            received = listener.received()
            seen.delivered += len(received)
            seen.sources += [source for _, (source, _port) in received]
        for key in check.expect.fdb:
            node, _, bridge = key.partition(":")
            seen.fdb[key] = fdb_of(topo, node, bridge)
        if check.expect.conntrack is not None:
            seen.conntrack = netfilter_stage.conntrack_count(topo, check)
    return seen


def _counter_names(snapshot: counters.Snapshot, nodes: dict[str, str]) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for node, ns in nodes.items():
        taken = snapshot.namespaces[ns]
        found = set(taken.snmp)
        found |= {f"{ifname}.{key}" for ifname, stats in taken.links.items() for key in stats}
        found |= {f"{ifname}.qdisc.{key}" for ifname, qs in taken.qdisc.items() for q in qs.values() for key in q}
        names[node] = found
    return names


def _listener(topo: Topology, spec: Listen) -> UdpListener:
    ns = netns.namespace_name(topo.name, spec.node)
    return UdpListener(ns, spec.port, addr=spec.address, rcvbuf=spec.rcvbuf, read=spec.read, socket_filter=spec.filter)


def _attribute(seen: Observation, trace: tracefs.TraceSession, devices: set[str], since: float, until: float) -> None:
    """Keep the skbs of this check: on lab devices and handled by our tasks (see ``_ours``)."""
    raw_events = trace.events()
    seen.lost_events = trace.lost_events()
    every = tracefs.all_chains(raw_events, devices, since=since, until=until)
    # deviceless chains are ours only if our task ran them (a send dropped before any device)
    seen.chains = [
        _without_foreign_tasks(c, seen.tasks) for c in every if c.on_lab is not False and _ours(c, seen.tasks)
    ]
    seen.timer_drops = [
        c.events[-1] for c in every if c.on_lab is None and not _ours(c, seen.tasks) and c.drop is not None
    ]
    kept = {id(e) for c in seen.chains for e in c.events}
    seen.events = [
        e
        for e in tracefs.attribute(raw_events, devices, since=since, until=until)
        if id(e) in kept or e.skbaddr is None
    ] + [e for c in seen.chains if c.on_lab is None for e in c.events]


def _capture_result(capture: Capture) -> CaptureResult:
    frames = capture.stop()
    directions: dict[str, int] = {}
    for frame in frames:
        directions[frame.direction] = directions.get(frame.direction, 0) + 1
    return CaptureResult(len(frames), capture.stats().drops, directions)
