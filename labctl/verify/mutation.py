"""What a mutation is: one named edit of one check of a lab file, applied to the file's data, and the
catalogue that lists them.  labctl/verify/mutate.py runs them against the kernel.

A *mutation* is one small, named edit of one check of a lab file -- of what the
check expects (an exact count + 1, another drop reason, a walk reordered) or of
the stage it sets (the rule removed, the sysctl flipped, the listener moved).
Each simulates a world where the claim is false, or an expectation that no
longer states what the kernel does; a check that still PASSes under it proves
less than it says.

The edit is data (``path`` is a list of keys and indices, because expectation
keys contain dots and colons), applied to the check as written in the YAML, not
to the parsed model with its defaults: a path that no longer exists -- the lab
was rewritten under the catalogue -- is an error, never a mutation that
silently tests nothing.  The mutated lab file is validated exactly as a lab file
is (``load_lab``), so a mutation the schema rejects is reported as invalid and
does not count as a kill.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from labctl.errors import KernelLacksError, LabctlError, LabFileError
from labctl.lab.labfile import load_lab
from labctl.topology.checks import LabFile
from labctl.topology.loader import parse_model, read_yaml

Op = Literal["set", "add", "delete", "append", "remove-item", "replace", "reverse", "swap", "shorten"]
PathPart = str | int


class MutationError(LabctlError):
    """A mutation that cannot be applied: its path or its value no longer fits the check (stale)."""


class InvalidMutation(MutationError):
    """The mutated lab file is not a valid lab file: the mutation tests the schema, not the check."""


class Mutation(BaseModel):
    """One claim-breaking edit of one check.

    Ops, all on the value at ``path`` inside the check:

    - ``set``: replace an existing value with ``value``.
    - ``add``: add a key that is absent (missing mappings on the way are created,
      e.g. ``[setup, sysctls, r1, net.ipv4.ip_forward]``); an existing key is an
      error, since the mutation would then mean something else.
    - ``delete``: remove a key of a mapping, or the item at an index of a list.
    - ``append``: append ``value`` to a list.
    - ``remove-item``: remove the item equal to ``value`` from a list (a rule by
      its text, so a rewritten rule makes the mutation stale instead of removing
      another one).
    - ``replace``: in a string, replace ``value.old`` (which must occur) by ``value.new``
      (an injected packet's port, a filter's address).
    - ``reverse``: reverse a list; ``shorten``: drop a list's last item.
    - ``swap``: exchange two items of a list, named by ``value`` = [i, j] (indices)
      or by the items themselves (``[filter:INPUT, nat:INPUT]``, each present
      once) -- by item is what survives a step being inserted into the list.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    check: str
    op: Op
    path: list[PathPart] = Field(min_length=1)
    value: Any = None
    why: str = Field(min_length=1)
    """One line: which claim-breaking change this simulates."""
    known_survivor: str | None = None
    """Why this mutation still PASSes today; the suite expects it to survive (strict: once it dies, remove this)."""

    @field_validator("why", "known_survivor")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and "\n" in value.strip():
            raise ValueError("one line, please")
        return value.strip() if value is not None else None

    def label(self) -> str:
        """A short, stable id: op and path (``set expect.counters.server[Udp.NoPorts]``)."""
        return f"{self.op} {format_path(self.path)}"


def format_path(path: Sequence[PathPart]) -> str:
    """``[expect, counters, server, Udp.NoPorts]`` -> ``expect.counters.server[Udp.NoPorts]``.

    Keys that contain dots or colons are bracketed so the text stays unambiguous.
    """
    text = ""
    for part in path:
        if isinstance(part, int) or any(c in part for c in ".:@[] "):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + part
    return text


def _describe(node: Any) -> str:
    if isinstance(node, dict):
        return f"a mapping with keys {sorted(node)}" if node else "an empty mapping"
    if isinstance(node, list):
        return f"a list of {len(node)} items"
    return f"the value {node!r}"


def _step(node: Any, part: PathPart, done: Sequence[PathPart], mutation: Mutation) -> Any:
    where = format_path(done) or "the check"
    if isinstance(node, dict):
        if not isinstance(part, str) or part not in node:
            raise MutationError(f"{_name(mutation)}: {where} has no key {part!r}; it is {_describe(node)}")
        return node[part]
    if isinstance(node, list):
        if not isinstance(part, int) or isinstance(part, bool) or not -len(node) <= part < len(node):
            raise MutationError(f"{_name(mutation)}: {where} has no index {part!r}; it is {_describe(node)}")
        return node[part]
    raise MutationError(f"{_name(mutation)}: cannot go into {where} for {part!r}: it is {_describe(node)}")


def _name(mutation: Mutation) -> str:
    return f"mutation of {mutation.check} ({mutation.label()})"


def _list_at(target: Any, mutation: Mutation, at_least: int) -> list[Any]:
    if not isinstance(target, list):
        raise MutationError(f"{_name(mutation)}: {mutation.op} needs a list, found {_describe(target)}")
    if len(target) < at_least:
        raise MutationError(f"{_name(mutation)}: {mutation.op} needs {at_least} items or more, found {len(target)}")
    return target


def apply(check: dict[str, Any], mutation: Mutation) -> dict[str, Any]:
    """The check (as written in YAML) with ``mutation`` applied; ``check`` is not modified.

    Raises MutationError when the path does not exist (or, for ``add``, already
    does), when the op does not fit the value found there, or when the result
    equals the original: each of those means the catalogue is stale.
    """
    result = copy.deepcopy(check)
    *parents, last = mutation.path
    node: Any = result
    for i, part in enumerate(parents):
        if mutation.op == "add" and isinstance(node, dict) and isinstance(part, str) and part not in node:
            node[part] = {}
        node = _step(node, part, mutation.path[:i], mutation)
    op = mutation.op
    if op == "add":
        if not isinstance(node, dict) or not isinstance(last, str):
            raise MutationError(f"{_name(mutation)}: add needs a mapping to add to, found {_describe(node)}")
        if last in node:
            raise MutationError(f"{_name(mutation)}: {format_path(mutation.path)} exists already; use set")
        node[last] = copy.deepcopy(mutation.value)
    else:
        target = _step(node, last, parents, mutation)
        if op == "set":
            node[last] = copy.deepcopy(mutation.value)
        elif op == "delete":
            del node[last]
        elif op == "append":
            _list_at(target, mutation, 0).append(copy.deepcopy(mutation.value))
        elif op == "remove-item":
            items = _list_at(target, mutation, 1)
            if mutation.value not in items:
                raise MutationError(f"{_name(mutation)}: {mutation.value!r} is not in {items!r}")
            items.remove(mutation.value)
        elif op == "replace":
            old, new = _old_new(mutation)
            if not isinstance(target, str) or old not in target:
                raise MutationError(f"{_name(mutation)}: {old!r} does not occur in {_describe(target)}")
            node[last] = target.replace(old, new)
        elif op == "reverse":
            _list_at(target, mutation, 2).reverse()
        elif op == "swap":
            items = _list_at(target, mutation, 2)
            i, j = _indices(mutation, items)
            items[i], items[j] = items[j], items[i]
        elif op == "shorten":
            _list_at(target, mutation, 1).pop()
    if result == check:
        raise MutationError(f"{_name(mutation)}: the edit leaves the check unchanged")
    return result


def _old_new(mutation: Mutation) -> tuple[str, str]:
    value = mutation.value
    if not isinstance(value, dict) or set(value) != {"old", "new"}:
        raise MutationError(f"{_name(mutation)}: replace needs value {{old: TEXT, new: TEXT}}, got {value!r}")
    return str(value["old"]), str(value["new"])


def _indices(mutation: Mutation, items: list[Any]) -> tuple[int, int]:
    value = mutation.value
    length = len(items)
    if not (isinstance(value, list) and len(value) == 2):
        raise MutationError(f"{_name(mutation)}: swap needs value [i, j] or [item, item], got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        for v in value:
            if items.count(v) != 1:
                raise MutationError(f"{_name(mutation)}: swap: {v!r} is not once in {items!r}")
        value = [items.index(v) for v in value]
    i, j = value
    if not (-length <= i < length and -length <= j < length) or i % length == j % length:
        raise MutationError(f"{_name(mutation)}: swap indices {value} do not name two items of {length}")
    return i, j


def read_lab_data(file: str) -> dict[str, Any]:
    """The lab file as plain data, as written (no defaults filled in)."""
    data, _ = read_yaml(Path(file).read_text(encoding="utf-8"), file)
    if not isinstance(data, dict):
        raise MutationError(f"{file}: not a lab file (a mapping)")
    return data


def check_index(data: dict[str, Any], name: str) -> int:
    for i, check in enumerate(data.get("checks") or []):
        if isinstance(check, dict) and check.get("name") == name:
            return i
    known = [c.get("name") for c in data.get("checks") or [] if isinstance(c, dict)]
    raise MutationError(f"the lab has no check {name!r} (checks: {', '.join(map(str, known))})")


def mutated_lab_data(data: dict[str, Any], mutation: Mutation) -> dict[str, Any]:
    """The whole lab file's data with one check mutated (the other checks as they are)."""
    index = check_index(data, mutation.check)
    result = dict(data)
    result["checks"] = list(data["checks"])
    result["checks"][index] = apply(data["checks"][index], mutation)
    return result


def validate(data: dict[str, Any], file: str) -> LabFile:
    """Validate lab data exactly as a lab file on disk is (schema, cross references, this machine).

    ``load_lab`` reads a file, so the data goes through a temporary copy next
    to nothing of the project's; the kernel-dependent checks (drop reason names,
    rule syntax, sysctls) are the ones a mutation most often trips.
    """
    fd, tmp = tempfile.mkstemp(prefix="labctl-mutant-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        lab, _ = load_lab(tmp)
    except KernelLacksError:
        # valid, but its topology needs what this kernel lacks: its checks are skipped here, not invalid
        from labctl.topology.checks import LabFile as LabFileModel
        from labctl.topology.loader import load_file

        lab = load_file(tmp, LabFileModel)[0]
    except LabctlError as exc:
        raise InvalidMutation(f"{os.path.basename(file)}: {str(exc).replace(tmp, '<mutant>')}") from exc
    finally:
        os.unlink(tmp)
    return lab


# -- the catalogue -----------------------------------------------------------


class LabMutations(BaseModel):
    """The mutations of one lab file, by check name (the catalogue's ``check`` is the key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fresh: list[str] = []
    """Checks whose own run changes state it depends on: the lab is rebuilt before each run of them."""
    alone: bool = False
    """Run while no other lab of the suite runs: the lab changes host-wide state, or some of its
    evidence is matched by time only, so another lab running at the same time could decide a verdict."""
    checks: dict[str, list[dict[str, Any]]] = {}

    def mutations(self) -> list[Mutation]:
        return [
            Mutation.model_validate({"check": name, **spec}) for name, specs in self.checks.items() for spec in specs
        ]


class Catalogue(BaseModel):
    """Mutations grouped by lab file (its file name in labs/, e.g. ``rx-path.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labs: dict[str, LabMutations]


def load_catalogue(file: str) -> Catalogue:
    """Read and validate a catalogue file; a malformed mutation is an error naming its key and line."""
    data, source = read_yaml(Path(file).read_text(encoding="utf-8"), file)
    catalogue = parse_model(data, source, Catalogue)
    problems = []
    for lab_file, group in catalogue.labs.items():
        for name, specs in group.checks.items():
            for i, spec in enumerate(specs):
                path: tuple[str | int, ...] = ("labs", lab_file, "checks", name, i)
                try:
                    Mutation.model_validate({"check": name, **spec})
                except ValidationError as exc:
                    problems += [
                        source.problem(path, f"{'.'.join(map(str, e['loc']))}: {e['msg']}") for e in exc.errors()
                    ]
    if problems:
        raise LabFileError(problems)
    return catalogue
