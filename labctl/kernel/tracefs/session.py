"""Tracepoints recorded into a private tracefs instance for a session's lifetime, read from its trace_pipe."""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping

from labctl.kernel.tracefs.catalog import resolve_events
from labctl.kernel.tracefs.event import TraceEvent
from labctl.kernel.tracefs.formats import EventFormat, read_format
from labctl.kernel.tracefs.instances import (
    INSTANCE_PREFIX,
    TraceError,
    _counter,
    _instances_dir,
    _read,
    _rmdir_instance,
    _write,
)
from labctl.kernel.tracefs.lines import (
    _LINE,
    _LOST,
    _STACK_HEADER,
    STACK_SKIP,
    LineCache,
    _from_match,
    parse_lines,
)
from labctl.kernel.tracefs.probe import hashing_off_breaks_strings
from labctl.kernel.tracefs.softirq import SOFTIRQ_EVENTS, softirq_filters

DEFAULT_BUFFER_KB = 8192
"""Per-CPU ring buffer.  Measured on 6.18 (~45 bytes per event): a burst landing on one CPU
lost 27k of 120k events with 4 MB, none of 150k with 8 MB.  The cost is this much memory per CPU."""

DEFAULT_EVENTS: tuple[str, ...] = (
    "skb:kfree_skb",
    "skb:consume_skb",
    "skb:skb_copy_datagram_iovec",
    "net:netif_rx",
    "net:netif_receive_skb",
    "net:napi_gro_receive_entry",
    "net:net_dev_queue",
    "net:net_dev_start_xmit",
    "net:net_dev_xmit",
    "bridge:br_fdb_update",
    "fib:fib_table_lookup",
    "qdisc:*",
    "neigh:*",
    "napi:napi_poll",
    *SOFTIRQ_EVENTS,
)


_READ_CHUNK = 1 << 20


_live_sessions: weakref.WeakSet[TraceSession] = weakref.WeakSet()


@atexit.register
def _stop_live_sessions() -> None:
    for session in list(_live_sessions):
        with contextlib.suppress(Exception):
            session.stop()


class TraceSession:
    """Tracepoints recorded into a private tracefs instance for the session's lifetime.

    Use as a context manager: the instance is removed on exit whatever
    happened in the body (exception, Ctrl-C).  ``events()`` consumes: each call
    returns what was recorded since the previous one; what is still buffered
    when the session stops is kept for the next ``events()`` call.
    """

    def __init__(
        self,
        events: Iterable[str] = DEFAULT_EVENTS,
        *,
        buffer_kb: int = DEFAULT_BUFFER_KB,
        filters: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.requested = list(events)
        self.buffer_kb = buffer_kb
        self.filters = dict(filters or {})
        self.overwrite = overwrite
        """False keeps the oldest events when the buffer fills (the start of a story)."""
        self.name = f"{INSTANCE_PREFIX}{os.getpid()}-{next(_counter)}"
        self.path = ""
        self.enabled: list[str] = []
        self.skipped: dict[str, str] = {}
        self.formats: dict[str, EventFormat] = {}
        self._by_name: dict[str, list[EventFormat]] = {}
        self._fd: int | None = None
        self._created = False
        self._partial = b""
        self._pending: list[TraceEvent] = []
        self._lines: LineCache = {}
        self._lost_lines = 0
        self._lost_at_stop: int | None = None
        self._lock = threading.RLock()
        self.hashed = False
        """Pointers are hashed in this session's output (see hashing_off_breaks_strings)."""
        self._stack_trigger = False
        self._last_drop: dict[int, TraceEvent] = {}
        """Per CPU, the kfree_skb whose stack trace (the drop's location) is still to come."""
        self._stack_cpu: int | None = None

    # -- lifecycle

    def __enter__(self) -> TraceSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._fd is not None

    def start(self) -> None:
        """Create and configure the instance, then turn recording on."""
        if self.running:
            return
        self.path = os.path.join(_instances_dir(), self.name)
        # marked before mkdir: an interrupt landing just after it must still remove the instance
        self._created = True
        _live_sessions.add(self)
        try:
            try:
                os.mkdir(self.path)
            except OSError:
                self._created = False
                raise
            self._configure()
            self._fd = os.open(os.path.join(self.path, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
            self._set("tracing_on", "1")
        except BaseException:
            self._teardown()
            raise

    def stop(self) -> None:
        """Stop recording, keep what was buffered, and remove the instance."""
        with self._lock:
            try:
                if self._created and self._fd is not None:
                    with contextlib.suppress(OSError):
                        self._set("tracing_on", "0")
                    self._pending.extend(self._drain())
                    self._lost_at_stop = self._stats_lost()
            finally:
                self._teardown()

    def _teardown(self) -> None:
        """Close the pipe and remove the instance, even if Ctrl-C/SIGTERM lands meanwhile.

        A signal handler that raises (KeyboardInterrupt) can interrupt any
        bytecode, including the rmdir retry loop; the instance would then
        outlive the process with its buffers allocated.  Each step is
        idempotent, so an interrupted teardown simply runs again, and the
        interrupt is re-raised once the instance is gone.
        """
        interrupted: BaseException | None = None
        while True:
            try:
                self._teardown_steps()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _teardown_steps(self) -> None:
        if self._fd is not None:  # closed before forgotten: a lost open fd would keep rmdir at EBUSY
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._created:
            if self._stack_trigger:
                with contextlib.suppress(OSError):
                    _write(os.path.join(self.path, self._event_file("skb:kfree_skb", "trigger")), "!stacktrace")
                self._stack_trigger = False
            _rmdir_instance(self.path)
            self._created = False
        _live_sessions.discard(self)

    def _set(self, relpath: str, value: str) -> None:
        path = os.path.join(self.path, relpath)
        try:
            _write(path, value)
        except OSError as exc:
            raise TraceError(f"tracefs refused {value!r} for {relpath}: {exc.strerror}{self._error_log()}") from exc

    def _error_log(self) -> str:
        with contextlib.suppress(OSError):
            lines = _read(os.path.join(self.path, "error_log")).strip().splitlines()
            if lines:
                return " (" + " ".join(line.strip() for line in lines[-3:]) + ")"
        return ""

    def _configure(self) -> None:
        self._set("tracing_on", "0")
        self._set("buffer_size_kb", str(self.buffer_kb))
        # mono: timestamps comparable with time.monotonic() and across CPUs
        self._set("trace_clock", "mono")
        # real addresses, so skbaddr links events and can be shown as the kernel's pointer -- unless that
        # empties every %s on this kernel (hashing_off_breaks_strings): hashed addresses still link an skb's
        # events (one key per boot), and a drop's location then comes from a stack trace of kfree_skb
        self.hashed = hashing_off_breaks_strings()
        self._set("trace_options", "hash-ptr" if self.hashed else "nohash-ptr")
        self._set("trace_options", "overwrite" if self.overwrite else "nooverwrite")
        with contextlib.suppress(TraceError, FileNotFoundError):
            self._set("buffer_percent", "0")  # wake trace_pipe pollers on any data
        self.enabled, self.skipped = resolve_events(self.requested)
        for event in self.enabled:
            fmt = read_format(event)
            self.formats[event] = fmt
            self._by_name.setdefault(fmt.name, []).append(fmt)
        for event, expression in {**softirq_filters(self.enabled), **self.filters}.items():
            if event in self.formats:
                self._set(self._event_file(event, "filter"), expression)
            elif event not in self.skipped:
                raise TraceError(f"filter for {event}, which is not among the session's events")
        if (
            self.hashed
            and "skb:kfree_skb" in self.formats
            and "location=%pS" not in self.formats["skb:kfree_skb"].print_fmt
        ):
            self._set(self._event_file("skb:kfree_skb", "trigger"), "stacktrace")
            self._stack_trigger = True
        for event in self.enabled:
            self._set(self._event_file(event, "enable"), "1")

    @staticmethod
    def _event_file(event: str, name: str) -> str:
        system, _, event_name = event.partition(":")
        return os.path.join("events", system, event_name, name)

    # -- reading

    def _read_available(self) -> bytes:
        chunks = []
        while self._fd is not None:
            try:
                data = os.read(self._fd, _READ_CHUNK)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def _drain(self) -> list[TraceEvent]:
        """Parse everything the kernel has buffered (trace_pipe consumes it)."""
        with self._lock:
            data = self._partial + self._read_available()
            end = data.rfind(b"\n") + 1
            self._partial = data[end:]
        lines = data[:end].decode("utf-8", "backslashreplace").split("\n")
        if not self._stack_trigger:
            events, gaps = parse_lines(lines, self._by_name, self._lines)
            self._lost_lines += gaps
            return events
        parsed: list[TraceEvent] = []
        append = parsed.append
        cache, formats = self._lines, self._by_name
        match_line = _LINE.match
        for line in lines:
            if self._stack_line(line):
                continue
            match = match_line(line)
            if match is None:
                if line.startswith("CPU:") and (lost := _LOST.match(line)) is not None:
                    self._lost_lines += int(lost.group("count"))
                continue
            # share=False: the stack trace of a drop writes its location into that event's own fields
            event = _from_match(match, formats, cache, False)
            append(event)
            if event.system == "skb" and event.name == "kfree_skb":
                self._last_drop[event.cpu] = event
        return parsed

    def _stack_line(self, line: str) -> bool:
        """A line of a kfree_skb stack trace: the first frame that is not the free itself is the location.

        Only used when pointers are hashed and kfree_skb prints its location with ``%p`` (6.1): the stack
        trace entry follows its kfree_skb on the same CPU, its frames on the lines after its header.
        """
        header = _STACK_HEADER.match(line)
        if header is not None:
            self._stack_cpu = int(header.group("cpu"))
            return True
        if not line.startswith(" => "):
            self._stack_cpu = None
            return False
        drop = self._last_drop.get(self._stack_cpu) if self._stack_cpu is not None else None
        frame = line[4:].strip()
        if drop is not None and not STACK_SKIP.match(frame):
            drop.fields["location"] = frame
            del self._last_drop[drop.cpu]
        return True

    def events(self) -> list[TraceEvent]:
        """Events recorded since the previous call (all of them the first time)."""
        with self._lock:
            if self.running:
                self._pending.extend(self._drain())
            taken, self._pending = self._pending, []
        return taken

    def wait(self, timeout: float) -> bool:
        """Block until the kernel has events to read (True) or ``timeout`` seconds passed."""
        if self._fd is None:
            return False
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def follow(self, stop_event: threading.Event | None = None, *, poll_interval: float = 0.2) -> Iterator[TraceEvent]:
        """Yield events as they arrive until ``stop_event`` is set or the session stops."""
        poller = select.poll()
        if self._fd is not None:
            poller.register(self._fd, select.POLLIN)
        while True:
            yield from self.events()
            if (stop_event is not None and stop_event.is_set()) or not self.running:
                break
            poller.poll(int(poll_interval * 1000))
        yield from self.events()

    # -- loss accounting

    def _stats_lost(self) -> int:
        total = 0
        per_cpu = os.path.join(self.path, "per_cpu")
        for cpu in os.listdir(per_cpu):
            with contextlib.suppress(OSError):
                total += _lost_in_stats(_read(os.path.join(per_cpu, cpu, "stats")))
        return total

    def lost_events(self) -> int:
        """Events the kernel could not keep (buffer full); non-zero means the evidence is incomplete."""
        stats = self._stats_lost() if self.running else (self._lost_at_stop or 0)
        return max(stats, self._lost_lines)


def _lost_in_stats(text: str) -> int:
    total = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("overrun", "commit overrun", "dropped events"):
            with contextlib.suppress(ValueError):
                total += int(value)
    return total
