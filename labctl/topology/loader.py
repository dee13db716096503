"""Read a lab file (YAML) into the model, keeping line numbers for errors.

PyYAML's composer gives every node a start mark; walking the node tree once
yields both the plain data and a map from key path to line, which is how a
pydantic or cross-reference error is reported as ``file:line: key: message``.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from labctl.errors import KeyPath, LabFileError, Problem
from labctl.names import has_control, shorten

ModelT = TypeVar("ModelT", bound=BaseModel)


class SourceMap:
    """Line numbers (1-based) of every key path in one YAML document."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[KeyPath, int] = {}

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its closest ancestor present in the file."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(path=path, message=message, file=self.file, line=self.line_of(path))


MAX_FILE_BYTES = 4 * 1024 * 1024
"""A lab file is a few kB; 4 MiB holds a 10 000-node lab and still parses in well under a second."""
MAX_DEPTH = 64
"""The deepest real lab is about 10 levels; deeper is a mistake or an attack on the parser."""
MAX_VALUES = 500_000
"""Values after alias expansion (a billion-laughs file expands to 10^9): the cap bounds time and memory."""
MAX_PROBLEMS = 30
"""Problems shown per file: a file that is not a lab at all must not be echoed back line by line."""

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML has it (10x faster); its events carry the same line marks."""
_SCALAR_LOADER = yaml.SafeLoader("")
_RESOLVER = yaml.resolver.Resolver()
_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "timestamp")
)
"""What a lab file's scalars may be: no !!binary (bytes pass for text), no !!python/..."""
_PLAIN_COLLECTION_TAGS = (None, "!", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_MULTILINE_KEYS = ("description", "nftables")
"""Keys whose text may span lines (and hold tabs); everything else is a name, a value or a rule."""


def _multiline(path: KeyPath) -> bool:
    """A description, or an nft ruleset: a node's ``nftables`` (text or list) or a check's ``nftables: {node: }``."""
    return bool(path) and (path[-1] in _MULTILINE_KEYS or (len(path) >= 2 and path[-2] == "nftables"))


def _fail(file: str, line: int | None, path: KeyPath, message: str) -> LabFileError:
    return LabFileError([Problem(path, message, file, line)])


class _Collection:
    """A mapping or sequence being built from parser events."""

    __slots__ = ("anchor", "key", "key_line", "path", "size", "value")

    def __init__(self, value: dict[str, Any] | list[Any], path: KeyPath, anchor: str | None) -> None:
        self.value = value
        self.path = path
        self.anchor = anchor
        self.key: str | None = None
        self.key_line = 0
        self.size = 1


class _Composer:
    """Plain data and a source map from libyaml events, without recursion and with caps.

    Building straight from events (instead of PyYAML's node graph) keeps
    memory proportional to the file, stops an alias bomb after MAX_VALUES
    values instead of after gigabytes, and refuses nesting deeper than
    MAX_DEPTH before any recursive code could see it.
    """

    def __init__(self, file: str, source: SourceMap) -> None:
        self.file = file
        self.source = source
        self.problems: list[Problem] = []
        self.stack: list[_Collection] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.open_anchors: set[str] = set()
        self.values = 0
        self.root: Any = None
        self.documents = 0

    def run(self, text: str) -> Any:
        for event in yaml.parse(text, Loader=_Loader):
            self.feed(event)
        return self.root

    def feed(self, event: yaml.Event) -> None:
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise _fail(self.file, line, (), "a lab file is one YAML document (found a second '---')")
        elif isinstance(event, yaml.ScalarEvent):
            self.scalar(event, line)
        elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            self.start(event, line)
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            done = self.stack.pop()
            if done.anchor is not None:
                self.anchors[done.anchor] = (done.value, done.size)
                self.open_anchors.discard(done.anchor)
            self.place(done.value, done.size, line, done.path)
        elif isinstance(event, yaml.AliasEvent):
            self.alias(event, line)

    def child_path(self, line: int) -> KeyPath | None:
        """The key path of the value that comes next; None when it is a mapping's key."""
        if not self.stack:
            return ()
        parent = self.stack[-1]
        if isinstance(parent.value, list):
            return (*parent.path, len(parent.value))
        if parent.key is None:
            return None
        return (*parent.path, parent.key)

    def count(self, size: int, line: int, path: KeyPath) -> None:
        self.values += size
        if self.values > MAX_VALUES:
            raise _fail(
                self.file, line, path, f"more than {MAX_VALUES} values once aliases are expanded (an alias bomb?)"
            )

    def scalar(self, event: yaml.ScalarEvent, line: int) -> None:
        path = self.child_path(line)
        if path is None:  # a mapping key: kept as written, like PyYAML's construct_scalar
            parent = self.stack[-1]
            key = event.value
            self.check_text(key, (*parent.path, key), line, multiline=False)
            if key in parent.value:
                self.problems.append(
                    Problem((*parent.path, key), "duplicate key (YAML keeps only the last one)", self.file, line)
                )
            parent.key, parent.key_line = key, line
            if event.anchor is not None:
                self.anchors[event.anchor] = (key, 1)
            return
        tag = event.tag
        if tag is None or tag == "!":
            tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _STR_TAG:
            value: Any = event.value
        elif tag not in _PLAIN_SCALAR_TAGS:
            raise _fail(self.file, line, path, f"not plain YAML: tag {shorten(tag)} is not allowed")
        else:
            node = yaml.ScalarNode(tag, event.value, style=event.style)
            try:
                value = _SCALAR_LOADER.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError, TypeError, OverflowError):  # e.g. !!int abc
                what = tag.rpartition(":")[2]
                raise _fail(self.file, line, path, f"not plain YAML: {shorten(event.value)} is not a {what}") from None
        if isinstance(value, str):
            self.check_text(value, path, line, multiline=_multiline(path))
        if event.anchor is not None:
            self.anchors[event.anchor] = (value, 1)
        self.place(value, 1, line, path)

    def start(self, event: yaml.CollectionStartEvent, line: int) -> None:
        path = self.child_path(line)
        if path is None:
            raise _fail(self.file, line, self.stack[-1].path, "keys must be plain strings")
        if event.tag not in _PLAIN_COLLECTION_TAGS:
            raise _fail(self.file, line, path, f"not plain YAML: tag {shorten(event.tag)} is not allowed")
        if len(self.stack) >= MAX_DEPTH:
            raise _fail(self.file, line, path, f"nested deeper than {MAX_DEPTH} levels")
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        self.source.lines.setdefault(path, line)
        value: dict[str, Any] | list[Any] = {} if isinstance(event, yaml.MappingStartEvent) else []
        self.stack.append(_Collection(value, path, event.anchor))

    def alias(self, event: yaml.AliasEvent, line: int) -> None:
        path = self.child_path(line)
        if path is None:
            raise _fail(self.file, line, self.stack[-1].path, "keys must be plain strings")
        name = event.anchor
        if name in self.open_anchors:
            raise _fail(self.file, line, path, f"alias *{name} refers to itself (recursive YAML)")
        if name not in self.anchors:
            raise _fail(self.file, line, path, f"alias *{name} has no anchor &{name} before it")
        value, size = self.anchors[name]
        self.place(value, size, line, path)

    def place(self, value: Any, size: int, line: int, path: KeyPath) -> None:
        """Put a finished value into its parent (or make it the document)."""
        self.count(size, line, path)
        self.source.lines.setdefault(path, line)
        if not self.stack:
            self.root = value
            return
        parent = self.stack[-1]
        parent.size += size
        if isinstance(parent.value, list):
            parent.value.append(value)
        else:
            assert parent.key is not None
            self.source.lines[(*parent.path, parent.key)] = parent.key_line
            parent.value[parent.key] = value
            parent.key = None

    def check_text(self, text: str, path: KeyPath, line: int, multiline: bool) -> None:
        if has_control(text, allow_newlines=multiline):
            what = "a newline" if "\n" in text else "a control character"
            self.problems.append(
                Problem(path, f"{what} is not allowed here (it would split a name, value or rule)", self.file, line)
            )


def read_lab_text(file: str) -> str:
    """The text of a lab file: a regular file of at most MAX_FILE_BYTES, in UTF-8.

    A FIFO would block forever and /dev/zero never ends, so the file is
    opened non-blocking and refused unless it is a regular file; then at most
    one byte more than the cap is read.
    """
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise _fail(file, None, (), f"cannot read: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES:
        os.close(fd)
        if info.st_size > MAX_FILE_BYTES and stat.S_ISREG(info.st_mode):
            raise _fail(file, None, (), f"{info.st_size} bytes is too large for a lab file (at most {MAX_FILE_BYTES})")
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
        raise _fail(file, None, (), f"not a regular file ({kind}); a lab file is a YAML file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _fail(file, None, (), f"too large for a lab file (at most {MAX_FILE_BYTES} bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(file, line, (), f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def read_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse YAML text into plain data plus its source map; syntax errors name the line."""
    source = SourceMap(file)
    if len(text) > MAX_FILE_BYTES:
        raise _fail(file, None, (), f"too large for a lab file (at most {MAX_FILE_BYTES} bytes)")
    composer = _Composer(file, source)
    try:
        data = composer.run(text)
    except yaml.reader.ReaderError as exc:
        line = text.encode("utf-8", "surrogatepass")[: exc.position].count(b"\n") + 1
        raise _fail(file, line, (), f"not valid YAML: {exc.reason} (character {chr(exc.character)!r})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or type(exc).__name__
        raise _fail(file, mark.line + 1 if mark is not None else None, (), f"not valid YAML: {reason}") from None
    if composer.documents == 0 or (data is None and not source.lines):
        raise _fail(file, 1, (), "the file is empty")
    if composer.problems:
        raise LabFileError(_capped(composer.problems))
    return data, source


def _capped(problems: list[Problem]) -> list[Problem]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    rest = len(problems) - MAX_PROBLEMS
    last = problems[MAX_PROBLEMS - 1]
    return [*problems[: MAX_PROBLEMS - 1], Problem((), f"... and {rest + 1} more problems", last.file, None)]


def _validation_problems(exc: ValidationError, source: SourceMap) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        # pydantic adds the union member or "[key]" to loc; keep only parts that are real keys
        path: KeyPath = tuple(p for p in loc if isinstance(p, int) or not _PYDANTIC_TAG.match(str(p)))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key {shorten(path[-1])}" if path else "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        problems.append(source.problem(path, message.removeprefix("Value error, ")))
    return problems


_PYDANTIC_TAG = re.compile(
    r"^(function-|json-or-python|union|tagged-union|\[|list\[|dict\[|IPv\d|int$|str$|bool$|float$|lax-|literal\[|constrained-)"
)


def parse_model(data: Any, source: SourceMap, model: type[ModelT]) -> ModelT:
    """Validate plain data against ``model`` and its own ``check()``, errors with lines."""
    if not isinstance(data, dict):
        raise LabFileError([source.problem((), "a lab file is a mapping with 'name' and 'topology'")])
    known = set(model.model_fields)
    # not a lab file at all (/etc/shadow, say): say so once instead of echoing each line as an unknown key
    if set(data) - known and not known & set(data) - {"name"}:
        raise LabFileError([source.problem((), f"not a lab file: it has none of the keys {', '.join(sorted(known))}")])
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise LabFileError(_capped(_validation_problems(exc, source))) from None
    check = getattr(parsed, "check", None)
    if check is not None:
        problems = [source.problem(p.path, p.message) for p in check()]
        if problems:
            raise LabFileError(_capped(problems))
    return parsed


def default_name(file: str) -> str:
    """A lab without ``name`` is named after its file, made safe for namespace names."""
    stem = os.path.splitext(os.path.basename(file))[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", stem).lstrip("-_") or "lab"


def load_file(file: str, model: type[ModelT]) -> tuple[ModelT, SourceMap]:
    data, source = read_yaml(read_lab_text(file), file)
    if isinstance(data, dict) and "name" not in data:
        data["name"] = default_name(file)
    return parse_model(data, source, model), source


def parse_topology(text: str, file: str = "<string>") -> Any:
    from labctl.topology.model import Topology

    data, source = read_yaml(text, file)
    if isinstance(data, dict) and "name" not in data:
        data["name"] = default_name(file)
    return parse_model(data, source, Topology)


def load_topology(file: str) -> Any:
    from labctl.topology.model import Topology

    return load_file(file, Topology)[0]
