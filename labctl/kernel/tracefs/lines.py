"""Lines of ``trace``/``trace_pipe`` → :class:`TraceEvent` (with a cache of lines seen but for their time)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from labctl.kernel.tracefs.event import TraceEvent, _event
from labctl.kernel.tracefs.formats import EventFormat

STACK_SKIP = re.compile(r"^(trace_event_raw_event_|perf_trace_|kfree_skb|__kfree_skb|sk_skb_reason_drop)")
"""Frames of a kfree_skb stack trace that are the tracepoint and the free itself, not who dropped it."""


_LINE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*(?:\d+|-+)\)\s+)?\[(?P<cpu>\d+)\]\s+(?:(?P<flags>\S+)\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>[\w.-]+):\s?(?P<body>.*)$"
)
_STACK_HEADER = re.compile(r"^\s*.*?-\d+\s+(?:\(\s*(?:\d+|-+)\)\s+)?\[(?P<cpu>\d+)\].*<stack trace>\s*$")
_LOST = re.compile(r"^CPU:(?P<cpu>\d+) \[LOST (?P<count>\d+) EVENTS\]")


LineCache = dict[tuple[str, ...], tuple[int, int, str, str, str, "dict[str, str | int]", str]]
"""A line but its timestamp (comm, pid, cpu, flags, event, body) → what it says but when.  A burst
repeats a few dozen such lines hundreds of thousands of times (skb addresses are recycled)."""
MAX_CACHED_LINES = 1 << 14
"""Lines remembered per session (~1 KiB each); the cache starts afresh when full (a flood of distinct lines)."""


def parse_line(
    line: str,
    formats: Mapping[str, Sequence[EventFormat]],
    cache: LineCache | None = None,
    *,
    share: bool = False,
) -> TraceEvent | None:
    """Parse one line of ``trace``/``trace_pipe``; ``formats`` maps event name → candidate formats.

    A body that matches none of the formats is kept as ``fields={"raw": body}``
    rather than lost, so a kernel that renders differently degrades visibly.
    ``cache`` remembers parsed lines: the format's regex and the conversions
    run once per distinct line.  With ``share``, events of one cached line
    share one ``fields`` dict (nobody may change it): two events whose fields
    are the same object said the same thing but when (:func:`same_but_time`).
    """
    match = _LINE.match(line)
    if match is None:
        return None
    return _from_match(match, formats, cache if cache is not None else {}, share)


def _from_match(
    match: re.Match[str], formats: Mapping[str, Sequence[EventFormat]], cache: LineCache, share: bool
) -> TraceEvent:
    comm, pid, cpu, flags, timestamp, event, body = match.groups()
    key = (comm, pid, cpu, flags, event, body)
    known = cache.get(key)
    if known is None:
        if len(cache) >= MAX_CACHED_LINES:
            cache.clear()
        system, values = _parse_body(event, body, formats)
        known = cache[key] = (int(cpu), int(pid), comm, system, event, values, flags or "")
    cpu_id, pid_id, comm, system, event, values, flags = known
    return _event(float(timestamp), cpu_id, pid_id, comm, system, event, values if share else dict(values), flags)


def same_but_time(event: TraceEvent) -> int:
    """A token equal for two events of one session that differ only in their timestamp.

    Events parsed with a shared line cache share their ``fields`` dict; the
    token is that dict's identity (alive as long as the events are, so never
    reused meanwhile).  Events made otherwise get tokens of their own: they
    are never taken for one another.
    """
    return id(event.fields)


def _parse_body(
    event: str, body: str, formats: Mapping[str, Sequence[EventFormat]]
) -> tuple[str, dict[str, str | int]]:
    system = ""
    for fmt in formats.get(event, ()):
        system = fmt.system
        values = fmt.parse_body(body)
        if values is not None:
            return system, values
    return system, {"raw": body}
