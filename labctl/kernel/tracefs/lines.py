"""Lines of ``trace``/``trace_pipe`` → :class:`TraceEvent` (with a cache of lines seen but for their time)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from labctl.kernel.tracefs.event import Tail, TraceEvent, _event, _event_at, _tail
from labctl.kernel.tracefs.formats import EventFormat

STACK_SKIP = re.compile(r"^(trace_event_raw_event_|perf_trace_|kfree_skb|__kfree_skb|sk_skb_reason_drop)")
"""Frames of a kfree_skb stack trace that are the tracepoint and the free itself, not who dropped it."""


_LINE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*(?:\d+|-+)\)\s+)?\[(?P<cpu>\d+)\]\s+(?:(?P<flags>\S+)\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>[\w.-]+):\s?(?P<body>.*)$"
)
_STACK_HEADER = re.compile(r"^\s*.*?-\d+\s+(?:\(\s*(?:\d+|-+)\)\s+)?\[(?P<cpu>\d+)\].*<stack trace>\s*$")
_LOST = re.compile(r"^CPU:(?P<cpu>\d+) \[LOST (?P<count>\d+) EVENTS\]")


LineCache = dict[str | tuple[str, ...], Tail]
"""A line but its timestamp → what it says but when (:func:`~labctl.kernel.tracefs.event._tail`).  A burst
repeats a few dozen such lines hundreds of thousands of times (skb addresses are recycled): 99.8 % of the
1.27 million lines of a 100k-frame burst with the rich events were seen before.  Keyed by the line's text
around its timestamp (:func:`parse_lines`) or, for a line read by :data:`_LINE`, by its groups."""
MAX_CACHED_LINES = 1 << 14
"""Lines remembered per session (~1 KiB each); the cache starts afresh when full (a flood of distinct lines)."""

TS_COLUMN = 37
"""Where the kernel writes an event's timestamp: its header is ``%16s-%-7d [%03d] %5s `` (task name right-aligned,
pid, CPU, the five context flags), then ``%5llu.%06lu: `` and the event's name (kernel/trace/trace_output.c)."""


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
    known = _known(match, formats, cache)
    timestamp = match["ts"]
    if share:
        return _event_at(float(timestamp), known)
    cpu_id, pid_id, comm, system, event, values, flags = known[:7]
    return _event(float(timestamp), cpu_id, pid_id, comm, system, event, dict(values), flags)


def _known(match: re.Match[str], formats: Mapping[str, Sequence[EventFormat]], cache: LineCache) -> Tail:
    """What a line read by :data:`_LINE` says but when, parsed once per distinct line."""
    comm, pid, cpu, flags, _, event, body = match.groups()
    key = (comm, pid, cpu, flags, event, body)
    known = cache.get(key)
    if known is None:
        known = _remember(cache, key, _tail_of(match, formats))
    return known


def _tail_of(match: re.Match[str], formats: Mapping[str, Sequence[EventFormat]]) -> Tail:
    comm, pid, cpu, flags, _, event, body = match.groups()
    system, values = _parse_body(event, body, formats)
    return _tail(int(cpu), int(pid), comm, system, event, values, flags or "")


def _remember(cache: LineCache, key: str | tuple[str, ...], tail: Tail) -> Tail:
    if len(cache) >= MAX_CACHED_LINES:
        cache.clear()
    cache[key] = tail
    return tail


def parse_lines(
    lines: Iterable[str], formats: Mapping[str, Sequence[EventFormat]], cache: LineCache
) -> tuple[list[TraceEvent], int]:
    """The events of many lines of ``trace_pipe`` (as :func:`parse_line` with ``share``), and the number of
    events the kernel said it lost (``CPU:1 [LOST 7 EVENTS]`` lines).

    A burst's 1.27 million lines cost 4 µs each through :data:`_LINE`, a tuple key and the event's
    constructor.  Here a line seen before but for its timestamp is found by its text around
    :data:`TS_COLUMN` -- two slices, one dict look-up, one ``float``, the event's slots set from the
    cached tail.  A new line is read by :data:`_LINE`, and cached under that key only when the regex
    found its timestamp there, after nothing but padding (the kernel's layout): a line of another layout
    (a recorded tgid column) takes the regex every time, and says the same.
    """
    parsed: list[TraceEvent] = []
    append = parsed.append
    known = cache.get
    make = object.__new__
    lost = 0
    at = TS_COLUMN
    for line in lines:
        end = line.find(": ", at)
        if end > 0:
            tail = known(line[:at] + line[end:])
            if tail is not None:
                try:
                    timestamp = float(line[at:end])
                except ValueError:  # not a timestamp there after all: the regex decides
                    tail = None
            if tail is not None:
                event = make(TraceEvent)  # event._event_at, inline: this runs for every line
                event.timestamp = timestamp
                (
                    event.cpu,
                    event.pid,
                    event.comm,
                    event.system,
                    event.name,
                    event.fields,
                    event.flags,
                    event.key,
                    event.devices,
                    event.device,
                    event.skbaddr,
                    event.in_interrupt,
                ) = tail
                append(event)
                continue
        match = _LINE.match(line)
        if match is None:
            if line.startswith("CPU:") and (gap := _LOST.match(line)) is not None:
                lost += int(gap.group("count"))
            continue
        start = match.start("ts")
        padding = line[at:start] if start >= at else "-"  # only spaces before a short timestamp
        if end > 0 and match.end("ts") == end and match.start("event") == end + 2 and not padding.strip():
            # only under its text: a flood of other labs' distinct lines fills the cache half as fast
            tail = _remember(cache, line[:at] + line[end:], _tail_of(match, formats))
        else:
            tail = _known(match, formats, cache)
        append(_event_at(float(match["ts"]), tail))
    return parsed, lost


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
