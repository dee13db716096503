"""What a CPU's trace order shows about the skbs first seen in softirq: the call they were made in.

Softirq work runs in whichever task is current, so the pid of an skb's first event proves nothing when
that event ran in softirq: the lab task may only have lent its context to another namespace's timer,
backlog or forward.  Each CPU's events come out of its ring buffer in the order they happened, so what ran
just before an event on its CPU, in the same call, says what it was made for.  The rules here are used by
rule 1 of labctl/evidence/attribution.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from labctl.kernel.tracefs import TRANSMIT_EVENTS, TraceEvent, is_softirq_mark, of_a_timer_vector
from labctl.kernel.tracefs.softirq import SOFTIRQ_ENTRY

TIMER_HANDLER = "neigh:neigh_timer_handler"
RECEIVE = "net:netif_receive_skb"
DRIVER_RECEIVES = frozenset({"net:netif_rx", "net:napi_gro_receive_entry"})
"""Entry points a driver calls for a frame it received: on veth, from the peer's transmit."""
LEARN_GAP = 0.01
"""Seconds at most between two events of one call on one CPU (a receive and the fdb update its rx handler
made, a receive and the answer made to it): microseconds, with room for a loaded machine."""
TIMER_GAP = 0.005
"""Seconds between a neighbour's purged-queue drops (or its probe) and its timer tracepoint on the same CPU."""


class CpuOrder:
    """Each CPU's events in the order its ring buffer kept them: what ran just before or after an event.

    Hard-irq events are skipped: a hard irq interrupts whatever ran, it is not part of its call.
    Built on first use: most windows ask nothing of it (only skbs first seen in softirq do), and a
    folded burst's whole trace is hundreds of thousands of events.  The timer runs (:meth:`timer_run`,
    asked of every transmit in softirq) are numbered in a pass of their own.  ``events`` in time order, or
    ``unsorted`` to have them sorted then (stably: each CPU's events keep the kernel's order).
    """

    def __init__(self, events: Sequence[TraceEvent], unsorted: bool = False, brackets: bool = True) -> None:
        self._events = events
        self._unsorted = unsorted
        self._brackets = brackets
        self._built = False
        self._by_cpu: dict[int, list[TraceEvent]] = {}
        self._at: dict[int, int] = {}
        self._runs: dict[int, int] | None = None

    def _build(self) -> None:
        self._built = True
        events = sorted(self._events, key=lambda e: e.timestamp) if self._unsorted else self._events
        by_cpu, at = self._by_cpu, self._at  # locals: this runs for every event of a window
        for event in events:
            flags = event.flags
            if (len(flags) >= 3 and flags[2] in "hH") or event.system == "irq":
                continue  # a hard irq is not part of the call it interrupts; a softirq mark is no call at all
            line = by_cpu.get(event.cpu)
            if line is None:
                line = by_cpu[event.cpu] = []
            at[id(event)] = len(line)
            line.append(event)

    def _number_runs(self) -> dict[int, int]:
        """Per event (``id``) that ran in a timer vector's softirq run, that run's number.

        One pass, apart from :meth:`_build` (whose per-event index costs a window of a million events a
        second): each CPU's events keep the kernel's order in ``events`` whether or not it was sorted by
        time, and only the events inside a run are kept.  Nothing when the trace lost events: a lost exit
        would leave the CPU's later softirq work -- the lab's own receives -- looking like a timer's."""
        runs: dict[int, int] = {}
        if not self._brackets:
            return runs
        serving: dict[int, int] = {}  # per CPU inside a timer vector's run, its number
        number = 0
        for event in self._events:
            if event.system == "irq":
                if is_softirq_mark(event):
                    if event.key == SOFTIRQ_ENTRY and of_a_timer_vector(event):
                        number += 1
                        serving[event.cpu] = number
                    else:
                        serving.pop(event.cpu, None)
                continue
            if serving:
                run = serving.get(event.cpu)
                flags = event.flags
                if run is not None and len(flags) >= 3 and flags[2] == "s":
                    runs[id(event)] = run
        return runs

    def timer_run(self, event: TraceEvent) -> int | None:
        """The number of the timer vector's softirq run ``event`` ran in on its CPU (a timer made what it
        did), or None."""
        if self._runs is None:
            self._runs = self._number_runs()
        return self._runs.get(id(event))

    def in_timer_softirq(self, event: TraceEvent) -> bool:
        return self.timer_run(event) is not None

    def before(self, event: TraceEvent) -> TraceEvent | None:
        if not self._built:
            self._build()
        at = self._at.get(id(event), 0)
        return self._by_cpu[event.cpu][at - 1] if at > 0 else None

    def after_its_skb(self, event: TraceEvent) -> TraceEvent | None:
        """The first event after ``event`` on its CPU that is not of the same skb (its own transmit path)."""
        if not self._built:
            self._build()
        at = self._at.get(id(event))
        line = self._by_cpu.get(event.cpu, [])
        for later in line[at + 1 :] if at is not None else ():
            if later.skbaddr != event.skbaddr:
                return later
        return None


Ours = Callable[[TraceEvent], bool]
"""Whether an event is of one of the lab's packets -- or of an injected frame folded away, which its group's
representative stands for (labctl/lab/trace/burst.py): those are the lab's too."""


def probing_timer(first: TraceEvent, order: CpuOrder) -> TraceEvent | None:
    """The ``neigh:neigh_timer_handler`` event whose probe ``first`` is, or None: a neighbour timer's
    transmit is followed, in the same call on the same CPU, by the timer's tracepoint on that device."""
    timer = order.after_its_skb(first)
    if (
        timer is not None
        and timer.key == TIMER_HANDLER
        and timer.device == first.device
        and timer.timestamp - first.timestamp <= TIMER_GAP
    ):
        return timer
    return None


def made_elsewhere(first: TraceEvent, order: CpuOrder, ours: Ours, timers: set[int], since: float) -> bool:
    """Whether an skb first seen in softirq was made for someone else than the task whose context lent it.

    Calls make skbs in softirq without the current task's say, and the
    CPU's order shows them.  A neighbour timer's ARP probe: its transmit is
    followed, in the same call, by ``neigh:neigh_timer_handler`` on the same
    device -- the skb is the lab's only if the lab's namespace vouched for
    that timer event (rule 4).  Any other timer's skb (a TCP retransmission,
    a delayed ACK): it ran between a timer vector's softirq entry and exit --
    never the lab's by its task, since nothing in it says which namespace
    armed the timer.  A reply made on receive (ARP reply, ICMP error): its
    transmit comes right after the receive it answers, in the same task and
    context -- the skb is the lab's only if that receive was.
    """
    timer = probing_timer(first, order)
    if timer is not None:
        return id(timer) not in timers
    if order.in_timer_softirq(first):
        return True  # whoever armed the timer: a TCP retransmission, a delayed ACK -- any namespace's
    cause = order.before(first)
    return (
        cause is not None
        and cause.key == RECEIVE
        and cause.pid == first.pid
        and cause.in_interrupt == first.in_interrupt
        and since <= cause.timestamp
        and 0 <= first.timestamp - cause.timestamp <= LEARN_GAP
        and not ours(cause)
    )


def crossed_from_elsewhere(first: TraceEvent, before: TraceEvent | None, devices: set[str]) -> bool:
    """Whether a chain first seen in softirq is a foreign skb arriving on a device only named like the lab's.

    A chain is cut where its address moves from a device not named like the lab's onto one that is, since
    one skb never crosses from a foreign namespace into a lab's -- but names repeat: another namespace's
    router forwarding out of its ``eth1`` hands the skb to a peer called ``eth0``, in softirq, perhaps
    while a lab task is current; the peer's receive (``netif_rx`` in the transmit's own call, or
    ``netif_receive_skb`` later, from the backlog, after the foreign ``net_dev_xmit``) starts a chain of
    its own.  ``before`` is the address's last event before ``first`` (the end of its previous chain):
    when that is a transmit on foreign devices only, the skb was handed on, not freed, and this chain is
    its continuation.  (An address freed untraced -- a GRO-merged segment -- ends on a receive, never on
    a transmit.)
    """
    return (
        before is not None
        and before.key in TRANSMIT_EVENTS
        and bool(before.devices)
        and devices.isdisjoint(before.devices)
    )
