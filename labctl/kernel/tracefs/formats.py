"""Tracepoint format files, and the parser of each event's text rendering derived from them.

The kernel itself renders symbols (``%pS`` → ``ip_rcv_core+0x1b/0x2a0``) and drop-reason names, which are
exactly what a lab wants to show.  The parser for each event is derived from that event's ``format`` file --
its ``print fmt`` and its ``REC->field`` arguments -- so field names are the kernel's and no event is
special-cased.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from labctl.kernel.tracefs.instances import TraceError, _read, ensure_mounted


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
    regex: str = field(repr=False, default="")
    """The source of :attr:`pattern`, compiled when the first event of this kind is parsed: a one-packet
    trace enables some 24 events and sees a few, and compiling them all was 46 ms of its start."""

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.regex, re.DOTALL)

    @property
    def key(self) -> str:
        return f"{self.system}:{self.name}"

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields if not f.name.startswith("common_")]

    def parse_body(self, body: str) -> dict[str, str | int] | None:
        """Fields of one rendered event, or None if the text does not follow the format."""
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


def _build_parser(fmt: str, args: Sequence[str], field_names: set[str]) -> tuple[tuple[_Capture, ...], str]:
    """Turn a print fmt and its arguments into a regex (its source) whose groups are named by field.

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


def _merge_and_compile(items: list[str | _Capture]) -> tuple[tuple[_Capture, ...], str]:
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
    return tuple(captures), "".join(parts)


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
    captures, regex = _build_parser(fmt, args, names)
    return EventFormat(system, name, event_id, tuple(fields), fmt, tuple(args), symbols, captures, regex)


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
