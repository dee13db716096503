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
   transmit in process context (a fresh send reusing a GRO-merged segment's
   address) or in a timer's run the address's previous event was not part of
   (a retransmission's clone: a timer never sends on what was received), and
   a transmit right after a driver receive (GRO freed the merged
   segment; another namespace's answer sent in softirq reused it).  But the
   task a softirq runs in only lent its context: a chain started there is
   not the lab's when the CPU's order shows it made for another -- a
   neighbour timer's probe whose timer event no lab notification vouches for,
   any other timer's skb (between a timer vector's softirq entry and exit:
   whose timer it was, nothing says), an answer to a receive that was not the
   lab's (:func:`made_elsewhere`) --
   or shows it the peer's end of a transmit on a foreign device into one only
   named like the lab's (:func:`crossed_from_elsewhere`).
2. **It has no skb and ran in a lab task** (a fib lookup, a napi poll of a
   NAPI thread that handled the lab's skbs).
3. **A bridge learnt from the lab's skb.**  ``br_fdb_update`` names the
   bridge, port and MAC but no namespace or skb, so two copies of a lab make
   identical events.  The bridge learns inside the receive of the frame, in
   one call on one CPU: ``__netif_receive_skb_core`` fires
   ``net:netif_receive_skb`` and then runs the port's rx handler
   (``br_handle_frame_finish`` → ``br_fdb_update``).  A CPU's events are in
   strict order, so an fdb update belongs to the latest receive before it on
   its CPU (same task, same context, on its port): when that skb is one of
   the lab's packets (rule 1), so is the update -- whatever the look-alikes
   next to it in time.
4. **It has no skb and the lab's own namespace vouches for it.**  Bridge fdb
   updates and neighbour events name a device but no namespace; rtnetlink
   notifications heard inside the lab's namespaces do.  Each notification
   vouches for one matching tracepoint event (same bridge port and MAC, same
   device and address): its own if rule 3 found it, otherwise the closest
   one that no other rule gives away -- never an fdb update learnt from an
   skb a foreign task sent in its own call.  A deviceless drop in timer
   context (NEIGH_FAILED, when a neighbour's ARP went unanswered) is vouched
   for through the ``neigh:neigh_timer_handler`` event that follows it on the
   same CPU.

Everything else is someone else's, whatever its device is called.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from labctl.evidence.cpuorder import (
    DRIVER_RECEIVES,
    LEARN_GAP,
    RECEIVE,
    TIMER_GAP,
    TIMER_HANDLER,
    CpuOrder,
    crossed_from_elsewhere,
    made_elsewhere,
)
from labctl.evidence.model import Packet
from labctl.kernel.neighwatch import NeighNote
from labctl.kernel.tracefs import TERMINAL_EVENTS, SkbChain, TraceEvent, all_chains, is_softirq_mark

_TIMESTAMP = attrgetter("timestamp")

KERNEL_THREADS = ("ksoftirqd/", "kworker/", "swapper/", "<idle>", "irq/", "migration/", "rcu", "napi/")
"""Kernel threads: they run whatever softirq work is pending, for any namespace."""

VOUCHED = ("bridge:br_fdb_update", "neigh:")
"""Deviceless-by-namespace events that only a lab-side notification can attribute."""

FDB_UPDATE = "bridge:br_fdb_update"
VOUCH_WINDOW = 0.25
"""Seconds a notification may be read after its tracepoint fired (the reader thread's wake-up under load)."""


Owners = dict[int, str]
"""Per event (``id``): ``lab`` (one of the lab's packets), ``foreign`` (an skb a foreign task sent in its own
call), or ``unknown`` (started in softirq or a kernel thread: a timer's ARP probe, a reply made on receive)."""


Pieces = Sequence[tuple[SkbChain, list[TraceEvent]]]


@dataclass
class Scope:
    """What identifies the lab in a window: its devices, its tasks, its time, its namespaces' notifications."""

    devices: set[str]
    tasks: set[int]
    since: float
    until: float
    notes: dict[str, list[NeighNote]] = field(default_factory=dict)
    """Per node, the rtnetlink neighbour/fdb notifications heard in its namespace."""
    relays: set[int] = field(default_factory=set)
    """The lab's VM relays (among ``tasks``): what they write on a tap is a VM's frame, not the check's send."""
    unreachable: dict[str, int] = field(default_factory=dict)
    """Per node, its Icmp.OutDestUnreachs delta: how many queued skbs its failed neighbours gave back."""
    lost: int = 0
    """Events the trace lost: a CPU's order then has holes, and no event is tied to another by it (rule 3)."""


def is_kernel_thread(event: TraceEvent) -> bool:
    return event.pid == 0 or event.comm.startswith(KERNEL_THREADS)


def _foreign_process(event: TraceEvent, tasks: set[int]) -> bool:
    """A user task other than the lab's, in its own (process) context: it owns what it touches."""
    return not event.in_interrupt and event.pid not in tasks and not is_kernel_thread(event)


def _starts_an_skb(event: TraceEvent, previous: TraceEvent, timer_run: TimerRun) -> bool:
    """A transmit in process context is a new skb's first step (a socket's or AF_PACKET's send):
    the address was freed without a traced free (a GRO-merged segment) and is reused.  So is a
    transmit in a timer's run that the address's previous event was not part of (a TCP
    retransmission's clone, a probe): a timer never sends on an skb that was received -- what is
    received is sent on in the receive's own call.  (In the same run the skb may go down a stack of
    devices -- a bridge, then its port -- as one skb.)"""
    if event.key != "net:net_dev_queue":
        return False
    if not event.in_interrupt:
        return True
    run = timer_run(event)
    return run is not None and timer_run(previous) != run


def _received_anew(event: TraceEvent, previous: TraceEvent) -> bool:
    """A driver receive not right after a transmit is another skb: one already up the stack never
    re-enters a driver without being sent again (its address was freed untraced -- a read datagram)."""
    return event.key in DRIVER_RECEIVES and not (previous.key.startswith(("net:net_dev_", "qdisc:")))


def _sent_unreceived(event: TraceEvent, previous: TraceEvent) -> bool:
    """A transmit right after a driver receive is another skb: a received frame is sent on only after the
    stack took it (``netif_receive_skb``: forwarding, bridging); GRO frees the segments it merged untraced,
    and the next skb allocated on that CPU -- another namespace's reply sent in softirq -- reuses the address.
    (``net_dev_xmit`` after ``netif_rx`` is the same skb: veth's transmit *is* the peer's receive.)"""
    return previous.key in DRIVER_RECEIVES and event.key == "net:net_dev_queue"


TimerRun = Callable[[TraceEvent], "int | None"]
"""The number of the timer vector's softirq run an event ran in (:meth:`CpuOrder.timer_run`), or None."""


def _split(events: Sequence[TraceEvent], tasks: set[int], timer_run: TimerRun) -> list[list[TraceEvent]]:
    """Cut one address's events where a new skb starts using it (a foreign task's, or a fresh send)."""
    pieces: list[list[TraceEvent]] = [[]]
    for event in events:
        last = pieces[-1][-1] if pieces[-1] else None
        foreign = last is not None and _foreign_process(event, tasks) and not _foreign_process(last, tasks)
        if last is not None and (
            foreign
            or _starts_an_skb(event, last, timer_run)
            or _received_anew(event, last)
            or _sent_unreceived(event, last)
        ):
            pieces.append([])
        pieces[-1].append(event)
    return [p for p in pieces if p]


def _pieces(events: Sequence[TraceEvent], scope: Scope, order: CpuOrder) -> list[tuple[SkbChain, list[TraceEvent]]]:
    """Every skb's story in the window: each address's chain cut where a new skb starts using it."""
    return [
        (chain, piece)
        for chain in all_chains(events, scope.devices, since=scope.since, until=scope.until)
        for piece in _split(chain.events, scope.tasks, order.timer_run)
    ]


def _by_start(pieces: Pieces, ordered: Sequence[TraceEvent]) -> list[tuple[int, tuple[SkbChain, list[TraceEvent]]]]:
    """The pieces (with their index) by their first event's time; pieces that start in the same microsecond in
    the kernel's order (their place in the time-sorted ``ordered``), so that a cause comes before what it
    caused.  Only the ties are looked up: a window has a piece per skb and many more events."""
    by_time = sorted(enumerate(pieces), key=lambda ip: ip[1][1][0].timestamp)
    result: list[tuple[int, tuple[SkbChain, list[TraceEvent]]]] = []
    start = 0
    while start < len(by_time):
        timestamp = by_time[start][1][1][0].timestamp
        end = start + 1
        while end < len(by_time) and by_time[end][1][1][0].timestamp == timestamp:
            end += 1
        tied = by_time[start:end]
        if len(tied) > 1:
            low = bisect.bisect_left(ordered, timestamp, key=_TIMESTAMP)
            high = bisect.bisect_right(ordered, timestamp, key=_TIMESTAMP)
            place = {id(e): at for at, e in enumerate(ordered[low:high])}
            tied.sort(key=lambda ip: place.get(id(ip[1][1][0]), 0))
        result += tied
        start = end
    return result


def _lab_packets(
    pieces: Pieces, scope: Scope, order: CpuOrder, timers: set[int], ordered: Sequence[TraceEvent]
) -> list[Packet]:
    found: dict[int, Packet] = {}
    lab: set[int] = set()
    judged: set[int] = set()  # every piece's events, gathered when first asked (most windows never ask)

    def ours(event: TraceEvent) -> bool:  # an event of no piece here was folded away: an injected lab frame's
        if id(event) in lab:
            return True
        if not judged:
            judged.update(id(e) for _, piece in pieces for e in piece)
        return id(event) not in judged

    last_seen: dict[int, TraceEvent] = {}  # per address, the last event of its latest chain so far
    for index, (chain, piece) in _by_start(pieces, ordered):  # causes first
        before = last_seen.get(chain.skbaddr)
        last_seen[chain.skbaddr] = piece[-1]
        if chain.on_lab is False:
            continue
        first = piece[0]
        if first.pid not in scope.tasks or (first.devices and not set(first.devices) & scope.devices):
            continue
        # softirq work runs in whichever task is current: an skb first seen there is the lab's only
        # if it then reaches a lab device (a deviceless one may be another namespace's timer or backlog),
        # and if the CPU's order does not show it made for another (a timer's probe, a reply to a receive)
        if first.in_interrupt and not any(set(e.devices) & scope.devices for e in piece):
            continue
        if first.in_interrupt and first.skbaddr is not None and made_elsewhere(first, order, ours, timers, scope.since):
            continue
        if first.in_interrupt and crossed_from_elsewhere(first, before, scope.devices):
            continue
        if all(e.key == "skb:consume_skb" and not e.devices for e in piece):
            continue  # a socket freeing what it read (labctl's own netlink replies): not a packet of the lab
        origin = "task" if first.in_interrupt else ("relayed" if first.pid in scope.relays else "sent")
        found[index] = Packet(chain.skbaddr, tuple(piece), origin=origin)
        lab.update(id(e) for e in piece)
    return [found[index] for index in sorted(found)]


def learnt_from(events: Sequence[TraceEvent]) -> dict[int, TraceEvent]:
    """Rule 3's tie: for each fdb update (by ``id``), the receive whose rx handler made it.

    ``events`` is in trace order (each CPU's events in the order its ring
    buffer kept them).  The receive is the latest ``net:netif_receive_skb``
    on the update's CPU, in the same task and context (a softirq never
    switches task), on the update's port, not freed in between, and at most
    :data:`LEARN_GAP` earlier.  An update with no such receive (a user's
    ``bridge fdb ... use``) is tied to nothing.
    """
    latest: dict[int, TraceEvent] = {}
    tied: dict[int, TraceEvent] = {}
    for event in events:
        key = event.key
        if key == RECEIVE:
            latest[event.cpu] = event
        elif key in TERMINAL_EVENTS:
            receive = latest.get(event.cpu)
            if receive is not None and receive.skbaddr == event.skbaddr:
                del latest[event.cpu]  # its skb is gone: nothing after this was learnt from it
        elif key == FDB_UPDATE:
            receive = latest.get(event.cpu)
            if (
                receive is not None
                and receive.pid == event.pid
                and receive.in_interrupt == event.in_interrupt
                and receive.device == event.fields.get("dev")
                and 0 <= event.timestamp - receive.timestamp <= LEARN_GAP
            ):
                tied[id(event)] = receive
    return tied


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


def _event_key(event: TraceEvent) -> tuple[str, str, str]:
    return _fdb_key(event) if event.key == "bridge:br_fdb_update" else _neigh_key(event)


def _purged_before(timer: TraceEvent, events: Sequence[TraceEvent], scope: Scope) -> list[TraceEvent]:
    """The deviceless NEIGH_FAILED drops of the queue this timer event's neighbour purged.

    neigh_invalidate frees the queue and then the timer's tracepoint fires, on
    one CPU in one call: the drops are those on that CPU after the previous
    timer event there (another neighbour's, perhaps another namespace's, in the
    same timer run) and just before this one.  ``events`` is in trace order.
    """
    index = next(i for i, e in enumerate(events) if e is timer)
    found = []
    for event in reversed(events[:index]):
        if event.cpu != timer.cpu:
            continue
        if event.key == TIMER_HANDLER or timer.timestamp - event.timestamp > TIMER_GAP:
            break
        if (
            event.key == "skb:kfree_skb"
            and event.reason == "NEIGH_FAILED"
            and event.skbaddr is not None
            and event.in_interrupt  # the timer runs in softirq; a task's own NEIGH_FAILED is not this purge
        ):
            found.append(event)
    return [e for e in reversed(found) if scope.since <= e.timestamp]


def _state_agrees(event: TraceEvent, note: NeighNote) -> bool:
    """A neighbour tracepoint vouched for by a notification must report the state the notification announced."""
    if note.kind != "neigh":
        return True
    state = event.fields.get("nud_state")
    return not isinstance(state, str) or state.upper() in note.state.split("|")


def skb_owners(pieces: Pieces, packets: Sequence[Packet], tasks: set[int]) -> Owners:
    """Who each skb event's story belongs to, as far as rule 1 can tell."""
    owners: Owners = {}
    for _, piece in pieces:
        owner = "foreign" if _foreign_process(piece[0], tasks) else "unknown"
        owners.update((id(e), owner) for e in piece)
    owners.update((id(e), "lab") for p in packets for e in p.events)
    return owners


def vouched_events(events: Sequence[TraceEvent], scope: Scope, owners: Owners | None = None) -> list[TraceEvent]:
    """Rules 3 and 4: the fdb updates learnt from the lab's skbs, and those each lab notification vouches for.

    The kernel fires the tracepoint and then sends the notification in the
    same call; the window reads notifications as they arrive and stamps them
    with the trace clock, so *this* namespace's event is a matching one shortly
    before the stamp.  Notifications are taken in the order they were read.
    A notification first takes an fdb update rule 3 tied to a lab skb (its
    own).  Otherwise, among several look-alikes (another namespace with the
    same device name and address), the one whose consequences agree with what
    the namespace itself counted is chosen: for a neighbour that failed, the
    queue it purged has as many skbs as the node sent ICMP host-unreachable
    errors for (``Icmp.OutDestUnreachs``), and none is when none agrees (its
    own would: the others are look-alikes); otherwise the closest -- but never
    an fdb update rule 3 tied to a foreign or a lab skb, both someone's own.
    Each event kind is vouched separately.
    """
    owners = owners if owners is not None else {}
    tied = learnt_from(events) if not scope.lost else {}
    owner_of = {update: owners.get(id(receive), "unknown") for update, receive in tied.items()}
    # a pass over the whole window (a burst's 1.2 million events) only when an update was learnt from a lab skb
    kept = (
        [e for e in events if owner_of.get(id(e)) == "lab" and scope.since <= e.timestamp <= scope.until]
        if "lab" in owner_of.values()
        else []
    )
    candidates: dict[tuple[str, tuple[str, str, str]], list[TraceEvent]] = {}
    for event in events:
        if event.key.startswith(VOUCHED) and scope.since <= event.timestamp <= scope.until:
            candidates.setdefault((event.key, _event_key(event)), []).append(event)
    taken: set[int] = set()
    heard = sorted(((note, node) for node, notes in scope.notes.items() for note in notes), key=lambda n: n[0].received)
    for note, node in heard:
        key = (note.kind, note.device, note.address)
        for (kind, event_key), group in candidates.items():
            if event_key != key:  # each event's state is checked below: a group mixes a neighbour's states
                continue
            # its own update, however late the notification was read (a loaded host): each update sends one
            own = [
                e for e in group if id(e) not in taken and owner_of.get(id(e)) == "lab" and e.timestamp <= note.received
            ]
            if own:
                taken.add(id(own[0]))  # already kept: the notification is its own
                continue
            before = [
                e
                for e in group
                if id(e) not in taken
                and 0 <= note.received - e.timestamp <= VOUCH_WINDOW
                and _state_agrees(e, note)
                and owner_of.get(id(e)) not in ("foreign", "lab")
            ]
            if not before:
                continue
            chosen = max(before, key=lambda e: e.timestamp)
            errors = scope.unreachable.get(node)
            if kind == TIMER_HANDLER and "FAILED" in note.state and errors is not None:
                agreeing = [e for e in before if len(_purged_before(e, events, scope)) == errors]
                if not agreeing:
                    continue  # its own would agree: every candidate contradicts the namespace's own count
                chosen = max(agreeing, key=lambda e: e.timestamp)
            taken.add(id(chosen))
            kept.append(chosen)
    return sorted(kept, key=_TIMESTAMP)


def timer_drops(events: Sequence[TraceEvent], scope: Scope, vouched: Sequence[TraceEvent]) -> list[Packet]:
    """Rule 4 for drops: the queue a vouched neighbour timer event purged (NEIGH_FAILED, deviceless)."""
    found: dict[int, Packet] = {}
    for timer in vouched:
        if timer.key == TIMER_HANDLER:
            for event in _purged_before(timer, events, scope):
                found.setdefault(id(event), Packet(event.skbaddr or 0, (event,), origin="confirmed"))
    return list(found.values())


def attribute(
    events: Sequence[TraceEvent], scope: Scope, unfolded: Sequence[TraceEvent] | None = None
) -> tuple[tuple[Packet, ...], tuple[TraceEvent, ...]]:
    """The lab's packets and every lab event (packets' events plus rules 2 to 4), in time order.

    ``unfolded``: when ``events`` is a burst folded to its groups' representatives (labctl/lab/trace/burst.py),
    the window's whole trace -- what ran before an event on its CPU is read there, not in the folded list,
    so that folding cannot change what caused what."""
    ordered = sorted(events, key=_TIMESTAMP)  # stable: each CPU's events keep the kernel's order
    brackets = not scope.lost  # a lost softirq exit would make the CPU's later work look like a timer's
    order = (
        CpuOrder(ordered, brackets=brackets)
        if unfolded is None
        else CpuOrder(unfolded, unsorted=True, brackets=brackets)
    )
    pieces = _pieces(ordered, scope, order)
    timers = {id(e) for e in vouched_events(ordered, scope) if e.key == TIMER_HANDLER}
    packets = _lab_packets(pieces, scope, order, timers, ordered)
    in_packets = {id(e) for p in packets for e in p.events}
    napi_threads = {e.pid for p in packets for e in p.events if e.comm.startswith("napi/")}
    tasks = scope.tasks | napi_threads
    loose = [
        e
        for e in ordered
        if e.skbaddr is None
        and not e.key.startswith(VOUCHED)
        and not is_softirq_mark(e)
        and scope.since <= e.timestamp <= scope.until
        and e.pid in tasks
        and (not e.devices or not scope.devices.isdisjoint(e.devices))
    ]
    vouched = vouched_events(ordered, scope, skb_owners(pieces, packets, scope.tasks))
    drops = [p for p in timer_drops(ordered, scope, vouched) if id(p.events[0]) not in in_packets]
    packets += drops
    chosen = [e for p in packets for e in p.events] + loose + vouched
    return tuple(packets), tuple(sorted(chosen, key=_TIMESTAMP))
