"""Read a lab file (YAML) into the model, keeping line numbers for errors.

PyYAML's composer gives every node a start mark; walking the node tree once
yields both the plain data and a map from key path to line, which is how a
pydantic or cross-reference error is reported as ``file:line: key: message``.
"""

from __future__ import annotations

import os
import re
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from labctl.errors import KeyPath, LabFileError, Problem

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


def _construct(node: yaml.Node, path: KeyPath, source: SourceMap, problems: list[Problem]) -> Any:
    source.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = (
                yaml.SafeLoader.construct_scalar(_SCALAR_LOADER, key_node)
                if isinstance(key_node, yaml.ScalarNode)
                else None
            )
            if not isinstance(key, str):
                problems.append(Problem(path, "keys must be plain strings", source.file, key_node.start_mark.line + 1))
                continue
            child = (*path, key)
            if key in result:
                problems.append(
                    Problem(
                        child, "duplicate key (YAML keeps only the last one)", source.file, key_node.start_mark.line + 1
                    )
                )
            source.lines[child] = key_node.start_mark.line + 1
            result[key] = _construct(value_node, child, source, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), source, problems) for i, item in enumerate(node.value)]
    return _SCALAR_LOADER.construct_object(node, deep=True)


_SCALAR_LOADER = yaml.SafeLoader("")


def read_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse YAML text into plain data plus its source map; syntax errors name the line."""
    source = SourceMap(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise LabFileError([Problem((), f"not valid YAML: {reason}", file, line)]) from exc
    if root is None:
        raise LabFileError([Problem((), "the file is empty", file, 1)])
    problems: list[Problem] = []
    try:
        data = _construct(root, (), source, problems)
    except yaml.YAMLError as exc:  # e.g. a !!python/... tag: plain YAML only
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise LabFileError([Problem((), f"not plain YAML: {reason}", file, line)]) from exc
    except RecursionError as exc:
        raise LabFileError([Problem((), "an alias refers to itself (recursive YAML)", file, None)]) from exc
    if problems:
        raise LabFileError(problems)
    return data, source


def _validation_problems(exc: ValidationError, source: SourceMap) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        # pydantic adds the union member or "[key]" to loc; keep only parts that are real keys
        path: KeyPath = tuple(p for p in loc if isinstance(p, int) or not _PYDANTIC_TAG.match(str(p)))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key {path[-1]!r}" if path else "unknown key"
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
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise LabFileError(_validation_problems(exc, source)) from exc
    check = getattr(parsed, "check", None)
    if check is not None:
        problems = [source.problem(p.path, p.message) for p in check()]
        if problems:
            raise LabFileError(problems)
    return parsed


def default_name(file: str) -> str:
    """A lab without ``name`` is named after its file, made safe for namespace names."""
    stem = os.path.splitext(os.path.basename(file))[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", stem).lstrip("-_") or "lab"


def load_file(file: str, model: type[ModelT]) -> tuple[ModelT, SourceMap]:
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise LabFileError([Problem((), f"cannot read: {exc.strerror}", file)]) from exc
    data, source = read_yaml(text, file)
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
