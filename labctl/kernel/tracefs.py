"""Tracepoint sessions on tracefs, and the attribution of global events to a lab.

Kernel evidence for a packet's path comes from tracepoints (this machine has no
kprobes and no function tracer).  Each session gets a private tracefs instance
so that its buffer, clock, filters and enabled events never disturb another
session or a human running ``trace-cmd``; the instance is named
``labctl-<pid>-<n>`` so that ``labctl clean`` can remove the ones a killed
process left behind.

Events are parsed from the instance's text output: the kernel itself renders
symbols (``%pS`` → ``ip_rcv_core+0x1b/0x2a0``) and drop-reason names, which
are exactly what a lab wants to show.  The parser for each event is derived
from that event's ``format`` file -- its ``print fmt`` and its ``REC->field``
arguments -- so field names are the kernel's and no event is special-cased.

Tracepoints fire for every namespace on the host.  :func:`chains` and
:func:`attribute` keep only the skbs that were seen on a lab's devices.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fnmatch
import functools
import itertools
import os
import re
import select
import subprocess
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from labctl.errors import KernelError, UnsafePathError
from labctl.kernel import procs

TRACEFS = "/sys/kernel/tracing"
INSTANCE_PREFIX = "labctl-"
"""Every tracefs instance labctl creates starts with this; ``clean`` relies on it."""

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
)

TERMINAL_EVENTS = frozenset({"skb:kfree_skb", "skb:consume_skb"})
"""Events after which an skb no longer exists (its address may be reused)."""
TERMINAL_NAMES = frozenset(key.partition(":")[2] for key in TERMINAL_EVENTS)
"""Their names (all in the ``skb`` system): a comparison per event cheaper than building the key."""

DEVICE_FIELDS = ("name", "dev", "dev_name", "br_dev")
"""Fields that hold a device name: ``name`` in net:*, ``dev`` in bridge/neigh/qdisc, ``dev_name`` in napi."""

_READ_CHUNK = 1 << 20
_RMDIR_ATTEMPTS = 20


class TraceError(KernelError, RuntimeError):
    """tracefs is unusable, or refused a setting (bad filter, buffer size …): a message, never a traceback."""


# --------------------------------------------------------------------------- tracefs


def ensure_mounted(root: str = TRACEFS) -> str:
    """Mount tracefs if absent; it stays mounted (a pseudo-fs, the one host change we make)."""
    if os.path.isdir(os.path.join(root, "instances")):
        return root
    try:
        _mount_tracefs(root)
    except OSError as exc:
        raise TraceError(f"cannot mount tracefs at {root}: {exc}") from exc
    if not os.path.isdir(os.path.join(root, "instances")):
        raise TraceError(f"tracefs at {root} has no instances directory")
    return root


def _mount_tracefs(root: str) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"nodev", root.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            raise OSError(err, os.strerror(err), root)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _instances_dir() -> str:
    return os.path.join(ensure_mounted(), "instances")


def _instance_pid(name: str) -> int | None:
    match = re.fullmatch(re.escape(INSTANCE_PREFIX) + r"(\d+)-\d+", name)
    return int(match.group(1)) if match else None


def _rmdir_instance(path: str) -> None:
    """rmdir an instance; the kernel says EBUSY while a reader still has a file open."""
    for attempt in range(_RMDIR_ATTEMPTS):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == _RMDIR_ATTEMPTS - 1:
                raise TraceError(f"cannot remove tracefs instance {path}: {exc}") from exc
            time.sleep(0.05)


def list_instances() -> list[str]:
    """Names of the labctl tracefs instances that exist now (any process)."""
    return sorted(n for n in os.listdir(_instances_dir()) if n.startswith(INSTANCE_PREFIX))


def remove_stale_instances() -> list[str]:
    """Remove labctl instances whose process is gone.

    A ``kill -9`` leaves the instance and its buffers allocated; this is what
    ``labctl clean`` calls.  Names that do not carry a pid, and instances of
    live processes (other labs tracing beside this one), are left alone.
    """
    removed = []
    for name in list_instances():
        pid = _instance_pid(name)
        stale = pid is not None and not procs.alive(pid)
        if not stale:
            continue
        try:
            _rmdir_instance(os.path.join(_instances_dir(), name))
        except TraceError:
            continue
        removed.append(name)
    return removed


PROBES_FILE = "tracefs-probes.json"
"""Answers of :func:`hashing_off_breaks_strings` per boot, in labctl's state directory (/run/labctl)."""


@functools.cache
def hashing_off_breaks_strings() -> bool:
    """Whether this kernel prints every ``%s`` of trace output empty once pointer hashing is off.

    Kernels 5.11 to 6.12 without Steven Rostedt's fix "tracing: Fix trace output when pointer hash is
    disabled" (Dec 2024, Fixes: efbbdaa22bb78; Debian's 6.1.176 among them): with ``nohash-ptr``,
    trace_event_format() writes the ``%px`` copy of the format into ``iter->fmt``, and trace_check_vprintf()
    then uses that same buffer as scratch for each ``%s`` -- ``dev=`` and ``reason:`` come out empty.  Probed
    (a fork traced in a throw-away instance), never assumed from a version.

    The answer belongs to the running kernel, so it is kept for this boot (keyed by its boot_id) in
    /run/labctl: the probe's instance costs 0.04-0.06 s of wall time (its rmdir waits for the kernel),
    a tenth of a one-packet ``labctl trace`` in a new process.
    """
    boot = _boot_id()
    known = _recorded_probe(boot)
    if known is not None:
        return known
    answer = _probe_hashing_off_breaks_strings()
    _record_probe(boot, answer)
    return answer


def _boot_id() -> str:
    try:
        return _read("/proc/sys/kernel/random/boot_id").strip()
    except OSError:
        return ""


def _recorded_probe(boot: str) -> bool | None:
    """The answer recorded during this boot, or None (none yet, another boot's, or unreadable)."""
    import json

    from labctl.kernel import registry

    if not boot:
        return None
    try:
        dir_fd = registry.open_dir(registry.STATE_DIR)
    except (OSError, UnsafePathError):
        return None
    try:
        data = json.loads(registry.read_text(dir_fd, PROBES_FILE) or "{}")
    except (OSError, UnsafePathError, ValueError):
        return None
    finally:
        os.close(dir_fd)
    answer = data.get("hashing_off_breaks_strings") if isinstance(data, dict) and data.get("boot_id") == boot else None
    return answer if isinstance(answer, bool) else None


def _record_probe(boot: str, answer: bool) -> None:
    """Keep the answer for this boot; a state directory that cannot be written only costs the next probe."""
    import json

    from labctl.kernel import registry

    if not boot:
        return
    with contextlib.suppress(OSError, UnsafePathError):
        dir_fd = registry.open_dir(registry.STATE_DIR)
        try:
            text = json.dumps({"boot_id": boot, "hashing_off_breaks_strings": answer})
            registry.write_atomically(dir_fd, PROBES_FILE, text)
        finally:
            os.close(dir_fd)


def _probe_hashing_off_breaks_strings() -> bool:
    """Trace a fork with ``nohash-ptr`` in a throw-away instance: are its ``%s`` strings empty?"""
    path = os.path.join(_instances_dir(), f"{INSTANCE_PREFIX}{os.getpid()}-{next(_counter)}")
    event = os.path.join(path, "events", "sched", "sched_process_fork", "enable")
    os.mkdir(path)
    try:
        if not os.path.exists(event):
            return False
        _write(os.path.join(path, "trace_options"), "nohash-ptr")
        _write(event, "1")
        subprocess.run(["true"], check=False)
        _write(event, "0")
        text = _read(os.path.join(path, "trace"))
    finally:
        _rmdir_instance(path)
    return "sched_process_fork: comm= " in text and not re.search(r"sched_process_fork: comm=\S", text)


STACK_SKIP = re.compile(r"^(trace_event_raw_event_|perf_trace_|kfree_skb|__kfree_skb|sk_skb_reason_drop)")
"""Frames of a kfree_skb stack trace that are the tracepoint and the free itself, not who dropped it."""


def available_events() -> dict[str, list[str]]:
    """Every tracepoint of this kernel, by subsystem (a copy: callers may change it)."""
    return {system: list(names) for system, names in _available_events(ensure_mounted()).items()}


@functools.cache
def _available_events(tracefs_root: str) -> dict[str, list[str]]:
    """Read once per process: walking events/ costs 60 ms a check, and the set of tracepoints
    of a kernel without module loading never changes while it runs (this one has none)."""
    root = os.path.join(tracefs_root, "events")
    result: dict[str, list[str]] = {}
    for system in sorted(os.listdir(root)):
        names = _system_events(tracefs_root, system)
        if names:
            result[system] = names
    return result


@functools.cache
def _system_events(tracefs_root: str, system: str) -> list[str]:
    """The tracepoints of one subsystem ([] when there is no such subsystem), read once per process."""
    sysdir = os.path.join(tracefs_root, "events", system)
    if not os.path.isdir(sysdir):
        return []
    return [n for n in sorted(os.listdir(sysdir)) if os.path.isfile(os.path.join(sysdir, n, "format"))]


def resolve_events(specs: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Expand ``sys:name`` / ``sys:*`` specs into existing events.

    Returns (``sys:name`` list in request order, {spec: why it was skipped}).
    Tracepoints come and go between kernel releases; a lab asks for what it
    would like and reports what this kernel could not give.
    """
    root = ensure_mounted()
    enabled: list[str] = []
    skipped: dict[str, str] = {}
    for spec in specs:
        system, sep, pattern = spec.partition(":")
        if not sep or not system or not pattern:
            skipped[spec] = "not of the form system:event"
            continue
        # only the named subsystems are listed: walking all ~100 of events/ cost a one-packet trace 15 ms
        known = _system_events(root, system) if "/" not in system and system not in (".", "..") else []
        if not known:
            skipped[spec] = f"no tracepoint subsystem {system!r} on this kernel"
            continue
        names = fnmatch.filter(known, pattern)
        if not names:
            skipped[spec] = f"no tracepoint {spec} on this kernel"
            continue
        for name in names:
            key = f"{system}:{name}"
            if key not in enabled:
                enabled.append(key)
    return enabled, skipped


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class FieldDef:
    """One field of a tracepoint record, as its format file declares it."""

    name: str
    type: str
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class _Capture:
    field: str
    kind: str  # int | hex | oct | ptr | str
    pattern: str


_CONVERSION = re.compile(
    r"%(?P<flags>[-+ #0]*)(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d+))?"
    r"(?P<length>hh|h|ll|l|L|z|Z|j|t)?(?P<conv>[diouxXcsp%])"
)
_ARG_FIELD = re.compile(r"__get_\w+\(\s*(\w+)\s*\)|REC->(\w+)")
_SYMBOL_PAIR = re.compile(r'\{\s*([^,{}]+?)\s*,\s*"((?:[^"\\]|\\.)*)"\s*\}')
_FIELD_LINE = re.compile(
    r"^\s*field:(?P<decl>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>-?\d+);"
)
_POINTER_EXT = re.compile(r"[A-Za-z0-9]*")
_DECL = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>\w+)\s*(?P<array>\[[^\]]*\])?$")

_INT_PATTERNS = {"d": r"-?\d+", "i": r"-?\d+", "u": r"-?\d+", "o": r"[0-7]+"}
_POINTER_PATTERNS = [
    (re.compile(r"[SsBFf]"), r"\S+(?: \[\S+\])?"),  # a symbol in a module: "nft_do_chain+0x40f/0x630 [nf_tables]"
    (re.compile(r"[Ii]4"), r"[0-9.]+"),
    (re.compile(r"[Ii]6"), r"[0-9a-fA-F:.]+"),
    (re.compile(r"[Mm]"), r"[0-9a-fA-F:-]+"),
]


@dataclass(frozen=True)
class EventFormat:
    """A tracepoint's format file, and the parser of its text rendering derived from it."""

    system: str
    name: str
    id: int
    fields: tuple[FieldDef, ...]
    print_fmt: str
    args: tuple[str, ...]
    symbols: Mapping[str, Mapping[str, str]]
    """Per field, the ``__print_symbolic`` table: value as written in the format → name."""
    captures: tuple[_Capture, ...] = field(repr=False, default=())
    pattern: re.Pattern[str] | None = field(repr=False, default=None)

    @property
    def key(self) -> str:
        return f"{self.system}:{self.name}"

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields if not f.name.startswith("common_")]

    def parse_body(self, body: str) -> dict[str, str | int] | None:
        """Fields of one rendered event, or None if the text does not follow the format."""
        if self.pattern is None:
            return None
        match = self.pattern.fullmatch(body)
        if match is None:
            return None
        values: dict[str, str | int] = {}
        for index, capture in enumerate(self.captures):
            values[capture.field] = _convert(match.group(f"g{index}"), capture.kind)
        return values


def _convert(text: str, kind: str) -> str | int:
    try:
        if kind == "int":
            return int(text)
        if kind == "hex":
            return int(text, 16)
        if kind == "oct":
            return int(text, 8)
        if kind == "ptr":
            return 0 if text.startswith("(") else int(text, 16)
    except ValueError:
        pass
    return text


def _c_string(text: str) -> tuple[str, str]:
    """Split a leading C string literal off ``text``: (unescaped literal, rest)."""
    start = text.index('"')
    out = []
    i = start + 1
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(escapes.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        if ch == '"':
            return "".join(out), text[i + 1 :]
        out.append(ch)
        i += 1
    raise ValueError("unterminated string in print fmt")


def _split_args(text: str) -> list[str]:
    """Split the print fmt arguments at top-level commas (not inside (), {}, [] or strings)."""
    args: list[str] = []
    depth = 0
    current: list[str] = []
    in_string = False
    i = 0
    while i < len(text):
        ch = text[i]
        if in_string:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            current.append(ch)
        elif ch in "([{":
            depth += 1
            current.append(ch)
        elif ch in ")]}":
            depth -= 1
            current.append(ch)
        elif ch == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    if "".join(current).strip():
        args.append("".join(current).strip())
    return args


def _arg_field(arg: str, field_names: set[str]) -> str | None:
    match = _ARG_FIELD.search(arg)
    if match is None:
        return None
    name = match.group(1) or match.group(2)
    return name if name in field_names else None


def _symbol_table(arg: str) -> dict[str, str] | None:
    if not arg.startswith("__print_symbolic("):
        return None
    return {key.strip(): name for key, name in _SYMBOL_PAIR.findall(arg)}


def _pattern_for(conv: str, ext: str) -> tuple[str, str]:
    """(regex, kind) for one printf conversion as the kernel's vsprintf renders it."""
    if conv in _INT_PATTERNS:
        return _INT_PATTERNS[conv], "oct" if conv == "o" else "int"
    if conv in "xX":
        return r"(?:0[xX])?[0-9a-fA-F]+", "hex"
    if conv == "c":
        return r".?", "str"
    if conv == "s":
        return r".*?", "str"
    if not ext:
        return r"[0-9a-fA-F]+|\(null\)|\(_*ptrval_*\)", "ptr"
    for prefix, pattern in _POINTER_PATTERNS:
        if prefix.match(ext):
            return pattern, "str"
    return r".*?", "str"


def _tokenize_fmt(fmt: str) -> list[str | tuple[str, str, int]]:
    """Literal strings and (conv, pointer extension, ``*`` arguments consumed first), in order."""
    tokens: list[str | tuple[str, str, int]] = []
    pos = 0
    literal: list[str] = []
    while (match := _CONVERSION.search(fmt, pos)) is not None:
        literal.append(fmt[pos : match.start()])
        pos = match.end()
        conv = match.group("conv")
        if conv == "%":
            literal.append("%")
            continue
        ext = ""
        if conv == "p":  # vsprintf skips every alphanumeric after %p
            ext_match = _POINTER_EXT.match(fmt, pos)
            ext = ext_match.group(0) if ext_match else ""
            pos += len(ext)
        stars = (match.group("width") == "*") + (match.group("prec") == "*")
        tokens.append("".join(literal))
        literal = []
        tokens.append((conv, ext, stars))
    literal.append(fmt[pos:])
    tokens.append("".join(literal))
    return tokens


def _build_parser(fmt: str, args: Sequence[str], field_names: set[str]) -> tuple[tuple[_Capture, ...], re.Pattern[str]]:
    """Turn a print fmt and its arguments into a regex whose groups are named by field.

    Consecutive conversions of the same field (``REC->addr[0]``…``[5]``, or a
    qdisc parent split in major:minor) become one string capture.
    """
    items: list[str | _Capture] = []
    arg_index = 0
    for token in _tokenize_fmt(fmt):
        if isinstance(token, str):
            if token:
                items.append(token)
            continue
        conv, ext, stars = token
        arg_index += stars
        arg = args[arg_index] if arg_index < len(args) else ""
        name = _arg_field(arg, field_names) or f"arg{arg_index}"
        pattern, kind = _pattern_for(conv, ext)
        if _symbol_table(arg) is not None:
            kind = "str"
        items.append(_Capture(name, kind, pattern))
        arg_index += 1
    captures, regex = _merge_and_compile(items)
    return captures, regex


def _merge_and_compile(items: list[str | _Capture]) -> tuple[tuple[_Capture, ...], re.Pattern[str]]:
    merged: list[str | _Capture] = []
    for item in items:
        if isinstance(item, _Capture):
            prev = merged[-1] if merged else None
            sep = ""
            if isinstance(prev, str) and len(merged) >= 2 and isinstance(merged[-2], _Capture):
                sep, prev = prev, merged[-2]
            if isinstance(prev, _Capture) and prev.field == item.field:
                if sep:
                    merged.pop()
                merged[-1] = _Capture(item.field, "str", f"(?:{prev.pattern}){re.escape(sep)}(?:{item.pattern})")
                continue
        merged.append(item)
    captures: list[_Capture] = []
    seen: dict[str, int] = {}
    parts: list[str] = []
    for item in merged:
        if isinstance(item, str):
            parts.append(re.escape(item))
            continue
        count = seen.get(item.field, 0)
        seen[item.field] = count + 1
        name = item.field if count == 0 else f"{item.field}_{count + 1}"
        parts.append(f"(?P<g{len(captures)}>{item.pattern})")
        captures.append(_Capture(name, item.kind, item.pattern))
    return tuple(captures), re.compile("".join(parts), re.DOTALL)


def parse_format(text: str, system: str = "") -> EventFormat:
    """Parse the content of ``events/<system>/<name>/format``."""
    name = ""
    event_id = -1
    fields: list[FieldDef] = []
    fmt = ""
    args: list[str] = []
    head, marker, tail = text.partition("print fmt:")
    if marker:  # the format string may hold literal newlines: it runs to the end of the file
        fmt, rest = _c_string(tail)
        args = _split_args(rest.strip().removeprefix(","))
    for line in head.splitlines():
        if line.startswith("name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            event_id = int(line.split(":", 1)[1])
        else:
            fdef = _field_def(line)
            if fdef is not None:
                fields.append(fdef)
    names = {f.name for f in fields}
    symbols: dict[str, dict[str, str]] = {}
    for arg in args:
        table = _symbol_table(arg)
        field_name = _arg_field(arg, names)
        if table is not None and field_name is not None:
            symbols.setdefault(field_name, table)
    captures, pattern = _build_parser(fmt, args, names)
    return EventFormat(system, name, event_id, tuple(fields), fmt, tuple(args), symbols, captures, pattern)


def _field_def(line: str) -> FieldDef | None:
    match = _FIELD_LINE.match(line)
    if match is None:
        return None
    decl = _DECL.match(match.group("decl").strip())
    if decl is None:
        return None
    ftype = decl.group("type") + (decl.group("array") or "")
    return FieldDef(
        decl.group("name"), ftype, int(match.group("offset")), int(match.group("size")), match.group("signed") == "1"
    )


def read_format(event: str) -> EventFormat:
    """The format of ``sys:name`` on the running kernel (parsed once per process: it is immutable)."""
    return _read_format(ensure_mounted(), event)


@functools.lru_cache(maxsize=512)
def _read_format(tracefs_root: str, event: str) -> EventFormat:
    system, _, name = event.partition(":")
    path = os.path.join(tracefs_root, "events", system, name, "format")
    try:
        return parse_format(_read(path), system)
    except FileNotFoundError as exc:
        raise TraceError(f"no tracepoint {event} on this kernel") from exc


def drop_reason_names() -> set[str]:
    """Drop reasons this kernel can report, read from kfree_skb's ``__print_symbolic`` table.

    Numbers change between releases (and the table is already resolved to
    numbers on 6.18), so lab files name reasons and are checked against this.
    ``MAX`` is the enum's end marker, not a reason.
    """
    table = read_format("skb:kfree_skb").symbols.get("reason", {})
    return {name for name in table.values() if name != "MAX"}


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One tracepoint hit, with fields named as in the event's format file."""

    timestamp: float
    """CLOCK_MONOTONIC seconds (the session uses the ``mono`` trace clock): compare with time.monotonic()."""
    cpu: int
    pid: int
    comm: str
    system: str
    name: str
    fields: dict[str, str | int]
    flags: str = ""
    """The context column (``b.s1.``: BH off, serving a softirq, preempt depth 1), "" if absent."""

    @property
    def in_interrupt(self) -> bool:
        """Ran in a softirq or hard irq (the task only lent its context), not in the task's own call."""
        return len(self.flags) >= 3 and self.flags[2] != "."

    @property
    def key(self) -> str:
        return f"{self.system}:{self.name}"

    @property
    def device(self) -> str | None:
        """The device the event happened on, whichever field the event calls it."""
        for name in DEVICE_FIELDS:
            value = self.fields.get(name)
            if isinstance(value, str):
                return value
        return None

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device named by the event (a bridge fdb update names the bridge and the port)."""
        return tuple(v for n in DEVICE_FIELDS if isinstance(v := self.fields.get(n), str))

    @property
    def skbaddr(self) -> int | None:
        value = self.fields.get("skbaddr")
        return value if isinstance(value, int) and value else None

    @property
    def location(self) -> str | None:
        value = self.fields.get("location")
        return value if isinstance(value, str) else None

    @property
    def function(self) -> str | None:
        """Bare function name of ``location`` (``ip_rcv_core`` for ``ip_rcv_core+0x1b/0x2a0``)."""
        loc = self.location
        return loc.split("+", 1)[0] if loc else None

    @property
    def reason(self) -> str | None:
        value = self.fields.get("reason")
        return value if isinstance(value, str) else None

    @property
    def protocol(self) -> int | None:
        """The skb's ethertype, for events that record it (net_dev_start_xmit, *_entry, kfree_skb)."""
        value = self.fields.get("protocol")
        return value if isinstance(value, int) else None

    def names(self) -> tuple[str, ...]:
        """The forms an expectation may use: ``net:netif_rx`` and ``net:netif_rx@eth0``."""
        return (self.key, *(f"{self.key}@{dev}" for dev in self.devices))


_SETTERS = tuple(getattr(TraceEvent, name).__set__ for name in TraceEvent.__slots__)


def _event(
    timestamp: float, cpu: int, pid: int, comm: str, system: str, name: str, fields: dict[str, str | int], flags: str
) -> TraceEvent:
    """``TraceEvent(...)`` at a third less cost: the slots set directly, not through the frozen
    dataclass's ``__init__`` (a burst builds 400,000 of them; the class stays frozen for everyone else)."""
    event = object.__new__(TraceEvent)
    set_timestamp, set_cpu, set_pid, set_comm, set_system, set_name, set_fields, set_flags = _SETTERS
    set_timestamp(event, timestamp)
    set_cpu(event, cpu)
    set_pid(event, pid)
    set_comm(event, comm)
    set_system(event, system)
    set_name(event, name)
    set_fields(event, fields)
    set_flags(event, flags)
    return event


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


# --------------------------------------------------------------------------- sessions

_counter = itertools.count()
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
        for event, expression in self.filters.items():
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
        parsed: list[TraceEvent] = []
        append = parsed.append
        cache, formats = self._lines, self._by_name
        share = not self._stack_trigger  # the stack trace of a drop writes its location into the fields
        match_line = _LINE.match
        for line in data[:end].decode("utf-8", "backslashreplace").split("\n"):
            if self._stack_trigger and self._stack_line(line):
                continue
            match = match_line(line)
            if match is None:
                if line.startswith("CPU:") and (lost := _LOST.match(line)) is not None:
                    self._lost_lines += int(lost.group("count"))
                continue
            event = _from_match(match, formats, cache, share)
            append(event)
            if self._stack_trigger and event.system == "skb" and event.name == "kfree_skb":
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


# --------------------------------------------------------------------------- stages


_STAGES = {
    "net:netif_rx": "netif_rx → backlog",
    "net:netif_receive_skb": "netif_receive_skb",
    "net:napi_gro_receive_entry": "napi_gro_receive",
    "net:net_dev_queue": "dev_queue_xmit",
    "net:net_dev_start_xmit": "driver xmit",
    "skb:consume_skb": "consumed",
    "skb:skb_copy_datagram_iovec": "copied to user (recvmsg)",
    "bridge:br_fdb_update": "bridge fdb update",
    "fib:fib_table_lookup": "fib lookup",
    "qdisc:qdisc_enqueue": "qdisc enqueue",
    "qdisc:qdisc_dequeue": "qdisc dequeue",
    "napi:napi_poll": "napi poll",
}


def stage_of(event: TraceEvent) -> str:
    """The notes' name for the path stage an event proves."""
    if event.key == "skb:kfree_skb":
        return f"dropped: {event.reason or event.fields.get('reason', '?')} at {event.function or '?'}"
    if event.key == "net:net_dev_xmit":
        rc = event.fields.get("rc", 0)
        return "tx done" if rc == 0 else f"tx done (rc={rc})"
    return _STAGES.get(event.key, event.key)


# --------------------------------------------------------------------------- attribution


@dataclass
class SkbChain:
    """The events of one skb, from its first sighting to its free."""

    skbaddr: int
    events: list[TraceEvent]
    on_lab: bool | None = None
    """True once seen on a lab device, False once seen on another device, None before any device."""

    @property
    def start(self) -> float:
        return self.events[0].timestamp

    @property
    def end(self) -> float:
        return self.events[-1].timestamp

    @property
    def fate(self) -> str | None:
        """``dropped``, ``consumed``, or None when the skb was still alive at the end."""
        last = self.events[-1].key
        return {"skb:kfree_skb": "dropped", "skb:consume_skb": "consumed"}.get(last)

    @property
    def drop(self) -> TraceEvent | None:
        last = self.events[-1]
        return last if last.key == "skb:kfree_skb" else None

    @property
    def stages(self) -> list[str]:
        return [stage_of(e) for e in self.events]

    @property
    def devices(self) -> list[str]:
        seen: list[str] = []
        for event in self.events:
            for dev in event.devices:
                if dev not in seen:
                    seen.append(dev)
        return seen


def _windowed(events: Iterable[TraceEvent], since: float | None, until: float | None) -> list[TraceEvent]:
    kept = [e for e in events if (since is None or e.timestamp >= since) and (until is None or e.timestamp <= until)]
    kept.sort(key=lambda e: e.timestamp)  # stable: equal µs timestamps keep the kernel's order
    return kept


def _device_verdict(event: TraceEvent, devices: set[str]) -> bool | None:
    """True: the event names a device of ``devices``; False: only others; None: no device at all.

    Called for every event of a window (400,000 for a burst): written out rather than built on
    :attr:`TraceEvent.devices`.
    """
    fields = event.fields
    verdict = None
    for name in DEVICE_FIELDS:
        value = fields.get(name)
        if isinstance(value, str):
            if value in devices:
                return True
            verdict = False
    return verdict


MAX_CHAIN_EVENTS = 4096
"""A chain is cut at this many events.  A real skb's path is tens of events; an address recycled by an
untraced free under a machine-wide flood would otherwise collect events for as long as the flood lasts
(a live ``--follow`` grew to gigabytes that way)."""


MAX_CACHED_VERDICTS = 4096


class ChainBuilder:
    """Cuts an event stream into per-skb chains as the events arrive.

    An address is reused as soon as its skb is freed: a chain ends at
    kfree_skb/consume_skb.  Some frees are not traced (GRO-merged heads,
    ``kfree_skb_partial``), so a chain also ends when the address shows up on
    a device of the other side (lab vs non-lab): one skb never crosses from a
    lab namespace into a foreign one.

    The batch functions below use it on a whole window; a live view
    (``labctl trace --follow``) feeds it event by event and shows each chain
    as :meth:`add` reports it complete, or when :meth:`idle` gives it up.
    """

    def __init__(self, devices: set[str], *, keep: bool = False) -> None:
        self.devices = devices
        self.open: dict[int, SkbChain] = {}
        self.created: list[SkbChain] = []
        """Every chain in the order it started (only with ``keep``: a live view would grow forever)."""
        self._keep = keep
        self._verdicts: dict[int, tuple[dict[str, str | int], bool | None]] = {}
        """id(fields) → (fields, its device verdict): events of a burst share their fields (parse_line)."""

    def add(self, event: TraceEvent) -> list[SkbChain]:
        """Feed the next event (time order); returns the chains it completed (freed or cut)."""
        addr = event.fields.get("skbaddr")  # TraceEvent.skbaddr, inline: this runs for every event
        if not addr or not isinstance(addr, int):
            return []
        done: list[SkbChain] = []
        fields = event.fields
        known = self._verdicts.get(id(fields))
        if known is None:
            if len(self._verdicts) >= MAX_CACHED_VERDICTS:
                self._verdicts.clear()
            known = self._verdicts[id(fields)] = (fields, _device_verdict(event, self.devices))
        verdict = known[1]
        chain = self.open.get(addr)
        if chain is not None and verdict is not None and chain.on_lab is not None and chain.on_lab != verdict:
            done.append(chain)
            chain = None
        if chain is None:
            chain = SkbChain(addr, [])
            self.open[addr] = chain
            if self._keep:
                self.created.append(chain)
        chain.events.append(event)
        if chain.on_lab is None:
            chain.on_lab = verdict
        if (event.system == "skb" and event.name in TERMINAL_NAMES) or len(chain.events) >= MAX_CHAIN_EVENTS:
            del self.open[addr]
            done.append(chain)
        return done

    def idle(self, before: float) -> list[SkbChain]:
        """Give up the open chains whose last event is older than ``before`` (queued, merged, lost)."""
        stale = [c for c in self.open.values() if c.end < before]
        for chain in stale:
            del self.open[chain.skbaddr]
        return stale

    def flush(self) -> list[SkbChain]:
        """Every chain still open, oldest first; the builder is empty afterwards."""
        rest = sorted(self.open.values(), key=lambda c: c.start)
        self.open = {}
        return rest


def _all_chains(events: list[TraceEvent], devices: set[str]) -> list[SkbChain]:
    """Cut the (time-ordered) event stream into per-skb chains, in the order they started."""
    builder = ChainBuilder(devices, keep=True)
    for event in events:
        builder.add(event)
    return builder.created


def chains(
    events: Iterable[TraceEvent], devices: set[str], since: float | None = None, until: float | None = None
) -> list[SkbChain]:
    """The skbs seen on ``devices`` within the window, each with its whole story, ordered by start."""
    ordered = _windowed(events, since, until)
    return [c for c in _all_chains(ordered, devices) if c.on_lab]


def all_chains(
    events: Iterable[TraceEvent], devices: set[str], since: float | None = None, until: float | None = None
) -> list[SkbChain]:
    """Every skb chain of the window: on the lab (on_lab True), elsewhere (False) or on no device (None).

    Callers that can tell their own skbs apart by other means (the task that
    ran an event) use the deviceless ones too: a datagram dropped before it
    reached any device (OUTPUT drop) has no device event at all.
    """
    return _all_chains(_windowed(events, since, until), devices)
