"""Which softirq a CPU was serving: the entries and exits of the timer vectors.

Why.  A softirq runs in whichever task is current, so an skb first seen there carries the pid of a task
that only lent its context.  A NET_RX softirq on a lab sender's CPU works for the lab (its own frames'
receive, the answers made to them) or visibly for someone else (labctl/evidence/cpuorder.py).  A timer
softirq works for whoever armed the timer -- another namespace's TCP retransmission, its neighbour's
probe -- and nothing in the skb's events says whose.  ``irq:softirq_entry`` and ``irq:softirq_exit``
bracket each vector's run on its CPU, so an event between a timer vector's entry and exit was made by a
timer.

Only the timer vectors are recorded (a filter on both events): NET_RX runs for every batch of packets
on the host, and nothing asks about it.  Their numbers are read from the running kernel's format file
(``__print_symbolic`` names each vector), not assumed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from labctl.kernel.tracefs.event import TraceEvent
from labctl.kernel.tracefs.formats import read_format
from labctl.kernel.tracefs.instances import TraceError

SOFTIRQ_ENTRY = "irq:softirq_entry"
SOFTIRQ_EXIT = "irq:softirq_exit"
SOFTIRQ_EVENTS = (SOFTIRQ_ENTRY, SOFTIRQ_EXIT)

TIMER_ACTIONS = ("TIMER", "HRTIMER")
"""The vectors that run timers (``timer_list`` and soft hrtimers: TCP's retransmission, delayed-ACK and
pacing timers, neighbour timers), for any namespace."""


@functools.cache
def timer_vectors() -> tuple[int, ...]:
    """The timer vectors' numbers on this kernel, from ``irq:softirq_entry``'s ``__print_symbolic`` table
    (empty when the kernel has no such tracepoint or table: the entries are then recorded unfiltered)."""
    try:
        table = read_format(SOFTIRQ_ENTRY).symbols.get("vec", {})
    except (TraceError, OSError):
        return ()
    named = {name: int(number) for number, name in table.items() if number.isdigit()}
    return tuple(named[action] for action in TIMER_ACTIONS if action in named)


def softirq_filters(enabled: Iterable[str]) -> dict[str, str]:
    """The filter each enabled softirq event is recorded with: the timer vectors only."""
    vectors = timer_vectors()
    if not vectors:
        return {}
    expression = " || ".join(f"vec == {number}" for number in vectors)
    return {event: expression for event in enabled if event in SOFTIRQ_EVENTS}


def is_softirq_mark(event: TraceEvent) -> bool:
    """A softirq entry or exit: a mark of the CPU's context, not an event of any packet or lab."""
    return event.system == "irq" and event.key in SOFTIRQ_EVENTS


def of_a_timer_vector(mark: TraceEvent) -> bool:
    """Whether a softirq entry or exit is a timer vector's.  The parsed ``vec`` holds the number and the
    vector's name (``1 [action=TIMER``: both conversions print ``REC->vec``); a bare number is looked up."""
    vec = mark.fields.get("vec")
    if isinstance(vec, int):
        return vec in timer_vectors()
    named = _ACTION.search(str(vec))
    return named is not None and named.group(1) in TIMER_ACTIONS


_ACTION = re.compile(r"action=(\w+)")
