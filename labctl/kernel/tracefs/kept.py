"""A tracefs instance that pauses between observation windows and resumes with another event set.

Why: making an instance is ~45 ms of waiting (``trace_clock`` and ``buffer_size_kb`` each reset the new ring
buffer behind a ``synchronize_rcu``) and removing it as much again (``rmdir``); pausing and resuming is a few
writes.  What a resume guarantees -- nothing of the window before is read as the new one's -- is here, next to
the session state it resets; when an instance is kept and for how long is the evidence layer's policy
(:mod:`labctl.evidence.kept_trace`).
"""

from __future__ import annotations

from collections.abc import Sequence

from labctl.kernel.tracefs.catalog import resolve_events
from labctl.kernel.tracefs.formats import read_format
from labctl.kernel.tracefs.session import TraceSession
from labctl.kernel.tracefs.softirq import softirq_filters


class KeptSession(TraceSession):
    """A :class:`TraceSession` that can pause and resume with another event set."""

    _lost_base = 0
    """The kernel's lost-event count when recording last resumed: the window's own losses are above it."""
    _trigger_paused = False
    """The drop-location stack trigger is off while paused: an unconditional trigger runs on every hit of its
    event whether the instance records or not (``trace_trigger_soft_disabled``), so an armed one would unwind
    the stack of every ``kfree_skb`` on the host -- other labs' bursts too -- between this lab's windows."""

    def pause(self) -> None:
        """Stop recording and keep the instance; what was buffered stays readable with ``events()``."""
        with self._lock:
            if self._fd is None:
                return
            self._set("tracing_on", "0")
            if self._stack_trigger and not self._trigger_paused:
                self._set(self._event_file("skb:kfree_skb", "trigger"), "!stacktrace")
                self._trigger_paused = True
            self._pending.extend(self._drain())

    def resume(self, events: Sequence[str]) -> None:
        """Record ``events`` (exactly those) from now on, with nothing left of the previous window."""
        with self._lock:
            self._set("tracing_on", "0")
            self._drain()  # read and thrown away: events of the previous window, or of nobody's window
            self._pending, self._partial, self._lines = [], b"", {}
            self._last_drop, self._stack_cpu, self._lost_lines = {}, None, 0
            wanted, skipped = resolve_events(events)
            for event in self.enabled:
                if event not in wanted:
                    self._set(self._event_file(event, "enable"), "0")
            self.requested, self.skipped = list(events), skipped
            self.formats = {event: read_format(event) for event in wanted}
            self._by_name = {}
            for fmt in self.formats.values():
                self._by_name.setdefault(fmt.name, []).append(fmt)
            filters = softirq_filters(wanted)  # a fresh instance's: kept on the event once set
            for event in wanted:
                if event not in self.enabled:
                    if event in filters:
                        self._set(self._event_file(event, "filter"), filters[event])
                    self._set(self._event_file(event, "enable"), "1")
            self.enabled = wanted
            if self._trigger_paused:  # suits() kept kfree_skb in the set: re-armed as a fresh instance has it
                self._set(self._event_file("skb:kfree_skb", "trigger"), "stacktrace")
                self._trigger_paused = False
            self._lost_base = self._stats_lost()
            self._set("tracing_on", "1")

    def suits(self, events: Sequence[str], buffer_kb: int) -> bool:
        """Whether this instance can serve a window of ``events``: the same buffer, and the drop-location
        stack trigger (set up with ``skb:kfree_skb``) as a fresh instance would have it."""
        kfree = "skb:kfree_skb"
        wanted, _ = resolve_events(events)  # a spec may be a glob (skb:*): compare what it enables
        return self.running and self.buffer_kb == buffer_kb and (kfree in wanted) == (kfree in self.enabled)

    def lost_events(self) -> int:
        stats = self._stats_lost() if self.running else (self._lost_at_stop or 0)
        return max(stats - self._lost_base, self._lost_lines)
