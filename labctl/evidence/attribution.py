"""The one rule that decides which kernel events belong to a lab.

Tracepoints are global: every namespace's packets fire them, and device names
repeat (every lab has an ``eth0``).  An event is the lab's when one of these
holds, and never because of a device name alone:

1. **Its skb started with a lab task.**  Events are cut into per-skb chains
   (``skbaddr`` from first sighting to its free).  A chain is the lab's when
   its first event ran in a lab task -- labctl's own threads that send and
   read for this window, the lab's VM relays, programs the window started in
   lab namespaces (ping) -- and it never crosses onto a device that is not
   the lab's (and, when it starts in softirq context, reaches a lab device).
   Softirq work on veth runs in the sender's context, so a lab
   packet's whole receive path carries the sender's pid; later events of the
   chain may run anywhere (another CPU's backlog, a NAPI thread).  A chain is
   cut where a *foreign* user task touches the address in process context:
   that is a new skb reusing the address after an untraced free; so is a
   transmit in process context (a fresh send reusing a GRO-merged segment's address).
2. **It has no skb and ran in a lab task** (a fib lookup, a napi poll of a
   NAPI thread that handled the lab's skbs).
3. **It has no skb and the lab's own namespace vouches for it.**  Bridge fdb
   updates and neighbour events name a device but no namespace; rtnetlink
   notifications heard inside the lab's namespaces do.  Each notification
   vouches for one matching tracepoint event (same bridge port and MAC, same
   device and address).  A deviceless drop in timer context (NEIGH_FAILED,
   when a neighbour's ARP went unanswered) is vouched for through the
   ``neigh:neigh_timer_handler`` event that follows it on the same CPU.

Everything else is someone else's, whatever its device is called.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from labctl.evidence.model import Packet
from labctl.kernel.neighwatch import NeighNote
from labctl.kernel.tracefs import TraceEvent, all_chains

KERNEL_THREADS = ("ksoftirqd/", "kworker/", "swapper/", "<idle>", "irq/", "migration/", "rcu", "napi/")
"""Kernel threads: they run whatever softirq work is pending, for any namespace."""

VOUCHED = ("bridge:br_fdb_update", "neigh:")
"""Deviceless-by-namespace events that only a lab-side notification can attribute."""

TIMER_HANDLER = "neigh:neigh_timer_handler"
TIMER_GAP = 0.005
"""Seconds between a neighbour's purged-queue drops and its timer tracepoint on the same CPU."""


@dataclass
class Scope:
    """What identifies the lab in a window: its devices, its tasks, its time, its namespaces' notifications."""

    devices: set[str]
    tasks: set[int]
    since: float
    until: float
    notes: dict[str, list[NeighNote]] = field(default_factory=dict)
    """Per node, the rtnetlink neighbour/fdb notifications heard in its namespace."""


def is_kernel_thread(event: TraceEvent) -> bool:
    return event.pid == 0 or event.comm.startswith(KERNEL_THREADS)


def _foreign_process(event: TraceEvent, tasks: set[int]) -> bool:
    """A user task other than the lab's, in its own (process) context: it owns what it touches."""
    return not event.in_interrupt and event.pid not in tasks and not is_kernel_thread(event)


def _starts_an_skb(event: TraceEvent) -> bool:
    """A transmit in process context is a new skb's first step (a socket's or AF_PACKET's send):
    the address was freed without a traced free (a GRO-merged segment) and is reused."""
    return event.key == "net:net_dev_queue" and not event.in_interrupt


def _split(events: Sequence[TraceEvent], tasks: set[int]) -> list[list[TraceEvent]]:
    """Cut one address's events where a new skb starts using it (a foreign task's, or a fresh send)."""
    pieces: list[list[TraceEvent]] = [[]]
    for event in events:
        last = pieces[-1][-1] if pieces[-1] else None
        foreign = last is not None and _foreign_process(event, tasks) and not _foreign_process(last, tasks)
        if last is not None and (foreign or _starts_an_skb(event)):
            pieces.append([])
        pieces[-1].append(event)
    return [p for p in pieces if p]


def lab_packets(events: Sequence[TraceEvent], scope: Scope) -> list[Packet]:
    """Rule 1: the skbs whose story starts in a lab task and stays on lab devices."""
    found: list[Packet] = []
    for chain in all_chains(events, scope.devices, since=scope.since, until=scope.until):
        if chain.on_lab is False:
            continue
        for piece in _split(chain.events, scope.tasks):
            first = piece[0]
            if first.pid not in scope.tasks or (first.devices and not set(first.devices) & scope.devices):
                continue
            # softirq work runs in whichever task is current: an skb first seen there is the lab's only
            # if it then reaches a lab device (a deviceless one may be another namespace's timer or backlog)
            if first.in_interrupt and not any(set(e.devices) & scope.devices for e in piece):
                continue
            found.append(Packet(chain.skbaddr, tuple(piece)))
    return found


def _fdb_key(event: TraceEvent) -> tuple[str, str, str]:
    addr = event.fields.get("addr")
    mac = _mac(addr)
    return ("fdb", str(event.fields.get("dev", "")), mac)


def _mac(value: object) -> str:
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, int):
        return ":".join(f"{(value >> (8 * i)) & 0xFF:02x}" for i in range(6))
    return str(value)


def _neigh_key(event: TraceEvent) -> tuple[str, str, str]:
    raw = event.fields.get("primary_key4")
    address = ""
    if isinstance(raw, str):
        address = raw
    elif isinstance(raw, int):
        try:
            address = str(ipaddress.IPv4Address(raw.to_bytes(4, "little")))
        except (ValueError, OverflowError):
            address = str(raw)
    return ("neigh", str(event.fields.get("dev", "")), address)


def _note_keys(notes: Iterable[NeighNote]) -> Counter[tuple[str, str, str]]:
    return Counter((n.kind, n.device, n.address) for n in notes)


def vouched_events(events: Sequence[TraceEvent], scope: Scope) -> list[TraceEvent]:
    """Rule 3: fdb and neighbour tracepoint events matched one to one with the lab's notifications."""
    budget = _note_keys(n for notes in scope.notes.values() for n in notes)
    # a neighbour notification may be echoed by several tracepoints (update, timer): budget per event kind
    budgets: dict[str, Counter[tuple[str, str, str]]] = {}
    kept = []
    for event in events:
        if not (scope.since <= event.timestamp <= scope.until) or not event.key.startswith(VOUCHED):
            continue
        key = _fdb_key(event) if event.key == "bridge:br_fdb_update" else _neigh_key(event)
        left = budgets.setdefault(event.key, Counter(budget))
        if left[key] > 0:
            left[key] -= 1
            kept.append(event)
    return kept


def timer_drops(events: Sequence[TraceEvent], scope: Scope, vouched: Sequence[TraceEvent]) -> list[Packet]:
    """Rule 3 for drops: deviceless drops that precede a vouched neighbour timer event on the same CPU."""
    timers = [e for e in vouched if e.key == TIMER_HANDLER]
    found = []
    for event in events:
        if event.key != "skb:kfree_skb" or event.skbaddr is None:
            continue
        if not (scope.since <= event.timestamp <= scope.until):
            continue
        if any(t.cpu == event.cpu and 0 <= t.timestamp - event.timestamp <= TIMER_GAP for t in timers):
            found.append(Packet(event.skbaddr, (event,), origin="confirmed"))
    return found


def attribute(events: Sequence[TraceEvent], scope: Scope) -> tuple[tuple[Packet, ...], tuple[TraceEvent, ...]]:
    """The lab's packets and every lab event (packets' events plus rules 2 and 3), in time order."""
    ordered = sorted(events, key=lambda e: e.timestamp)
    packets = lab_packets(ordered, scope)
    in_packets = {id(e) for p in packets for e in p.events}
    napi_threads = {e.pid for p in packets for e in p.events if e.comm.startswith("napi/")}
    tasks = scope.tasks | napi_threads
    loose = [
        e
        for e in ordered
        if e.skbaddr is None
        and not e.key.startswith(VOUCHED)
        and scope.since <= e.timestamp <= scope.until
        and e.pid in tasks
        and not (e.devices and not set(e.devices) & scope.devices)
    ]
    vouched = vouched_events(ordered, scope)
    drops = [p for p in timer_drops(ordered, scope, vouched) if id(p.events[0]) not in in_packets]
    packets += drops
    chosen = [e for p in packets for e in p.events] + loose + vouched
    return tuple(packets), tuple(sorted(chosen, key=lambda e: e.timestamp))
