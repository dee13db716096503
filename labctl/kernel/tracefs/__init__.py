"""Tracepoint sessions on tracefs, and the attribution of global events to a lab.

Kernel evidence for a packet's path comes from tracepoints (this machine has no kprobes and no function
tracer).  One module per job; this package re-exports the public names, so callers keep writing
``from labctl.kernel import tracefs`` / ``tracefs.TraceSession``:

- :mod:`.instances` -- the tracefs mount and labctl's instances in it (names, listing, stale removal);
- :mod:`.probe` -- whether this kernel empties ``%s`` once pointer hashing is off (probed once per boot);
- :mod:`.catalog` -- which tracepoints this kernel has, and ``sys:*`` specs expanded into them;
- :mod:`.formats` -- format files, and the parser of each event's text derived from its ``print fmt``;
- :mod:`.event` -- :class:`TraceEvent`, one tracepoint hit, and :func:`stage_of`;
- :mod:`.lines` -- lines of ``trace_pipe`` parsed into events;
- :mod:`.session` -- :class:`TraceSession`, a private instance recording for a session's lifetime;
- :mod:`.softirq` -- the timer vectors' softirq entries and exits (what a timer made, in whoever's context);
- :mod:`.kept` -- :class:`~.kept.KeptSession`, one that pauses between windows and resumes with other events;
- :mod:`.chains` -- per-skb chains, and the ones seen on a lab's devices (:func:`chains`).
"""

from labctl.kernel.tracefs.catalog import available_events, resolve_events
from labctl.kernel.tracefs.chains import (
    MAX_CHAIN_EVENTS,
    ChainBuilder,
    SkbChain,
    all_chains,
    chains,
)
from labctl.kernel.tracefs.event import TERMINAL_EVENTS, TRANSMIT_EVENTS, TraceEvent, stage_of
from labctl.kernel.tracefs.formats import EventFormat, drop_reason_names, parse_format, read_format
from labctl.kernel.tracefs.instances import (
    INSTANCE_PREFIX,
    TRACEFS,
    TraceError,
    ensure_mounted,
    list_instances,
    remove_stale_instances,
)
from labctl.kernel.tracefs.lines import LineCache, parse_line, parse_lines, same_but_time
from labctl.kernel.tracefs.probe import PROBES_FILE
from labctl.kernel.tracefs.session import DEFAULT_BUFFER_KB, DEFAULT_EVENTS, TraceSession
from labctl.kernel.tracefs.softirq import SOFTIRQ_EVENTS, is_softirq_mark, of_a_timer_vector

__all__ = [
    "DEFAULT_BUFFER_KB",
    "DEFAULT_EVENTS",
    "INSTANCE_PREFIX",
    "MAX_CHAIN_EVENTS",
    "PROBES_FILE",
    "SOFTIRQ_EVENTS",
    "TERMINAL_EVENTS",
    "TRACEFS",
    "TRANSMIT_EVENTS",
    "ChainBuilder",
    "EventFormat",
    "LineCache",
    "SkbChain",
    "TraceError",
    "TraceEvent",
    "TraceSession",
    "all_chains",
    "available_events",
    "chains",
    "drop_reason_names",
    "ensure_mounted",
    "is_softirq_mark",
    "list_instances",
    "of_a_timer_vector",
    "parse_format",
    "parse_line",
    "parse_lines",
    "read_format",
    "remove_stale_instances",
    "resolve_events",
    "same_but_time",
    "stage_of",
]
